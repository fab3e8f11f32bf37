"""Issue 16, item 1: nothing silently lost -- train --out refuses a directory holding a run,
--resume checks its settings against the checkpoint, each run's history is its own."""
import json

import pytest
import torch

from fcnfast import cli
from single_thread import one_intraop_thread  # noqa: F401 (autouse fixture)

TINY = ["--epochs", "1", "--train-images", "2", "--val-images", "1", "--image-size", "36",
        "--num-classes", "4", "--optimizer", "adam", "--batch-size", "2", "--quiet"]


def run(args, capsys):
    try:
        code = cli.main(args)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def run_dir(tmp_path, capsys):
    out = tmp_path / "run1"
    code, _, err = run(["train", *TINY, "--out", str(out)], capsys)
    assert code == 0, err
    return out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_refuses_a_directory_holding_a_run(run_dir, capsys):
    before = (run_dir / "checkpoint.pt").read_bytes()
    history = (run_dir / "history.jsonl").read_text()
    code, _, err = run(["train", *TINY, "--out", str(run_dir)], capsys)
    assert code == 2
    assert err.startswith("fcnfast: error: --out %s already holds a run" % run_dir)
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    # nothing touched
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert (run_dir / "history.jsonl").read_text() == history


def test_overwrite_replaces_the_run_and_its_history(run_dir, capsys):
    old_run = _lines(run_dir / "history.jsonl")[0]["run"]
    code, out, err = run(["train", *TINY, "--out", str(run_dir), "--overwrite"], capsys)
    assert code == 0, err
    assert "removed checkpoint.pt, history.jsonl" in err
    records = _lines(run_dir / "history.jsonl")
    assert len(records) == 1 and records[0]["run"] != old_run  # not appended to the old run


def test_resume_continues_the_same_run_and_history(run_dir, capsys):
    first = _lines(run_dir / "history.jsonl")
    code, out, err = run(["train", "--resume", str(run_dir / "checkpoint.pt"), "--epochs", "2",
                          "--quiet"], capsys)
    assert code == 0, err
    records = _lines(run_dir / "history.jsonl")  # --out defaults to the checkpoint's directory
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0] == first[0] and records[1]["run"] == first[0]["run"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_resume_lists_conflicting_settings_and_stops(run_dir, capsys):
    before = (run_dir / "checkpoint.pt").read_bytes()
    code, _, err = run(["train", "--resume", str(run_dir / "checkpoint.pt"), "--model", "fcn32s",
                        "--num-classes", "21", "--lr", "5", "--epochs", "2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "settings differ from the checkpoint" in err
    assert "model: checkpoint 'fcn8s', given 'fcn32s'" in err
    assert "num-classes: checkpoint 4, given 21" in err
    assert "lr" not in err.split("):", 1)[1]  # lr is a safe change, not a conflict
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    # the same value as the checkpoint is no conflict, even when given explicitly
    code, _, err = run(["train", "--resume", str(run_dir / "checkpoint.pt"), "--model", "fcn8s",
                        "--num-classes", "4", "--epochs", "1", "--quiet"], capsys)
    assert code == 0, err


def test_resume_applies_a_new_learning_rate(run_dir, capsys):
    code, out, err = run(["train", "--resume", str(run_dir / "checkpoint.pt"), "--lr", "0.25",
                          "--epochs", "2", "--quiet"], capsys)
    assert code == 0, err
    assert "learning rate changed to 0.25" in out
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["lr"] == 0.25
    assert all(g["lr"] == 0.25 for g in ckpt["optimizer"]["param_groups"])


def test_resume_into_a_directory_of_another_run_is_refused(run_dir, tmp_path, capsys):
    other = tmp_path / "run2"
    assert run(["train", *TINY, "--out", str(other)], capsys)[0] == 0
    code, _, err = run(["train", "--resume", str(run_dir / "checkpoint.pt"), "--epochs", "2",
                        "--out", str(other)], capsys)
    assert code == 2 and "already holds another run" in err


def test_train_prints_a_header(tmp_path, capsys):
    code, out, err = run(["train", *TINY, "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    header = out.splitlines()[0]
    for part in ("fcn8s/tiny", "4 classes", "data synthetic", "adam lr 0.001", "threads",
                 "1 epochs"):
        assert part in header, (part, header)


def test_help_shows_defaults(capsys):
    for command, expected in (("train", "(default: fcn8s)"), ("eval", "(default: 1)"),
                              ("predict", "(default: black)"), ("demo", "(default: demo_out)")):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        assert expected in " ".join(capsys.readouterr().out.split()), command

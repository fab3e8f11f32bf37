"""Issue 16, item 1: nothing silently lost -- train --out refuses a directory holding a run,
--resume checks its settings against the checkpoint, each run's history is its own."""

import json

import pytest
import torch
from conftest import TINY_TRAIN_ARGS
from single_thread import one_intraop_thread  # noqa: F401 (autouse fixture)

from fcnfast import cli


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
    code, _, err = run(["train", *TINY_TRAIN_ARGS, "--out", str(out)], capsys)
    assert code == 0, err
    return out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_refuses_a_directory_holding_a_run(run_dir, capsys):
    before = (run_dir / "checkpoint.pt").read_bytes()
    history = (run_dir / "history.jsonl").read_text()
    code, _, err = run(["train", *TINY_TRAIN_ARGS, "--out", str(run_dir)], capsys)
    assert code == 2
    assert err.startswith("fcnfast: error: --out %s already holds a run" % run_dir)
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    # nothing touched
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert (run_dir / "history.jsonl").read_text() == history


def test_overwrite_replaces_the_run_and_its_history(run_dir, capsys):
    old_run = _lines(run_dir / "history.jsonl")[0]["run"]
    code, out, err = run(["train", *TINY_TRAIN_ARGS, "--out", str(run_dir), "--overwrite"], capsys)
    assert code == 0, err
    assert "removed checkpoint.pt, history.jsonl" in err
    records = _lines(run_dir / "history.jsonl")
    assert len(records) == 1 and records[0]["run"] != old_run  # not appended to the old run


def test_resume_continues_the_same_run_and_history(run_dir, capsys):
    first = _lines(run_dir / "history.jsonl")
    code, out, err = run(
        ["train", "--resume", str(run_dir / "checkpoint.pt"), "--epochs", "2", "--quiet"], capsys
    )
    assert code == 0, err
    records = _lines(run_dir / "history.jsonl")  # --out defaults to the checkpoint's directory
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0] == first[0] and records[1]["run"] == first[0]["run"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_resume_lists_conflicting_settings_and_stops(run_dir, capsys):
    before = (run_dir / "checkpoint.pt").read_bytes()
    code, _, err = run(
        [
            "train",
            "--resume",
            str(run_dir / "checkpoint.pt"),
            "--model",
            "fcn32s",
            "--num-classes",
            "21",
            "--lr",
            "5",
            "--epochs",
            "2",
        ],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "settings differ from the checkpoint" in err
    assert "model: checkpoint 'fcn8s', given 'fcn32s'" in err
    assert "num-classes: checkpoint 4, given 21" in err
    assert "lr" not in err.split("):", 1)[1]  # lr is a safe change, not a conflict
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    # the same value as the checkpoint is no conflict, even when given explicitly
    code, _, err = run(
        [
            "train",
            "--resume",
            str(run_dir / "checkpoint.pt"),
            "--model",
            "fcn8s",
            "--num-classes",
            "4",
            "--epochs",
            "1",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err


def test_resume_applies_a_new_learning_rate(run_dir, capsys):
    code, out, err = run(
        [
            "train",
            "--resume",
            str(run_dir / "checkpoint.pt"),
            "--lr",
            "0.25",
            "--epochs",
            "2",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert "learning rate changed to 0.25" in out
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["lr"] == 0.25
    assert all(g["lr"] == 0.25 for g in ckpt["optimizer"]["param_groups"])


def test_resume_into_a_directory_of_another_run_is_refused(run_dir, tmp_path, capsys):
    other = tmp_path / "run2"
    assert run(["train", *TINY_TRAIN_ARGS, "--out", str(other)], capsys)[0] == 0
    code, _, err = run(
        ["train", "--resume", str(run_dir / "checkpoint.pt"), "--epochs", "2", "--out", str(other)],
        capsys,
    )
    assert code == 2 and "already holds another run" in err


def test_train_prints_a_header(tmp_path, capsys):
    code, out, err = run(["train", *TINY_TRAIN_ARGS, "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    header = out.splitlines()[0]
    for part in (
        "fcn8s/tiny",
        "4 classes",
        "data synthetic",
        "adam lr 0.001",
        "threads",
        "1 epochs",
    ):
        assert part in header, (part, header)


def test_help_shows_defaults(capsys):
    import re

    for command, expected in (
        ("train", "(default: fcn8s)"),
        ("eval", "(default: 1)"),
        ("predict", "(default: black)"),
        ("demo", "(default: demo_out)"),
        ("train", "(default: 0)"),  # a zero default is still shown
        ("bench", "(default: 0.5)"),
        ("hsi", "(default 64)"),
        ("finetune", "(default: 40)"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert expected in text, command
        # never twice for one option (a help text that names its default is left alone)
        assert not re.search(r"default[^-]*\(default: ", text), command


def test_resume_from_an_older_checkpoint_records_each_epoch_once(run_dir, capsys):
    """A checkpoint kept from epoch 1, resumed after the run went on to epoch 3: epochs 2-3
    are trained again, so their first records move to history.superseded.jsonl."""
    import shutil

    shutil.copy(run_dir / "checkpoint.pt", run_dir / "epoch1.pt")
    resume = ["train", "--epochs", "3", "--quiet", "--resume"]
    assert run([*resume, str(run_dir / "checkpoint.pt")], capsys)[0] == 0
    first_go = _lines(run_dir / "history.jsonl")
    assert [r["epoch"] for r in first_go] == [1, 2, 3]
    code, out, err = run([*resume, str(run_dir / "epoch1.pt")], capsys)
    assert code == 0, err
    assert "2 record(s) after epoch 1 moved to history.superseded.jsonl" in out
    records = _lines(run_dir / "history.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[0] == first_go[0]
    assert _lines(run_dir / "history.superseded.jsonl") == first_go[1:]  # nothing lost


# -- finetune and demo: the same guard ---------------------------------------------------


def _finetune_data(tmp_path):
    from test_camvid import _camvid_fixture  # a small CamVid-layout folder (list files)

    root = _camvid_fixture(tmp_path / "camvid", count=2, h=32, w=40)
    (root / "val.txt").write_text((root / "train.txt").read_text())
    return root


FINETUNE = [
    "--no-pretrained",
    "--epochs",
    "1",
    "--batch-size",
    "2",
    "--crop",
    "32",
    "32",
    "--warmup-steps",
    "1",
    "--num-workers",
    "0",
    "--threads",
    "1",
    "--quiet",
]


def test_finetune_out_guard_resume_settings_and_overwrite(tmp_path, capsys):
    data, out = str(_finetune_data(tmp_path)), tmp_path / "ft"
    base = ["finetune", "--data", data, *FINETUNE]
    assert run([*base, "--out", str(out)], capsys)[0] == 0
    before = (out / "last.pt").read_bytes()
    code, _, err = run([*base, "--out", str(out)], capsys)  # a second run into the same --out
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "already holds a finetune run (last.pt, best.pt, history.json)" in err
    assert (out / "last.pt").read_bytes() == before
    # --resume: the checkpoint's settings (not the defaults), --out its directory; a
    # conflicting setting is listed and nothing runs
    code, _, err = run(
        [
            "finetune",
            "--data",
            data,
            "--resume",
            str(out / "last.pt"),
            "--crop",
            "48",
            "48",
            "--batch-size",
            "2",
            "--epochs",
            "2",
        ],
        capsys,
    )
    assert code == 2 and "crop: checkpoint [32, 32], given [48, 48]" in err
    assert "batch-size" not in err  # the same value given again is no conflict
    code, _, err = run(
        ["finetune", "--data", data, "--resume", str(out / "last.pt"), "--epochs", "2", "--quiet"],
        capsys,
    )
    assert code == 0, err
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["epoch"] == 2 and state["config"]["crop"] == [32, 32]
    assert len(json.loads((out / "history.json").read_text())["history"]) == 2
    code, _, err = run([*base, "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and "removed last.pt, best.pt, history.json" in err
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 1


def test_demo_replaces_its_own_output_but_not_another_run(run_dir, tmp_path, capsys):
    small = [
        "demo",
        "--epochs",
        "1",
        "--images",
        "2",
        "--val-images",
        "1",
        "--size",
        "32",
        "--no-timing",
        "--quiet",
        "--threads",
        "1",
    ]
    before = (run_dir / "checkpoint.pt").read_bytes()
    code, _, err = run([*small, "--out", str(run_dir)], capsys)  # a train run lives there
    assert code == 2 and "holds a run that the demo did not write" in err
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    demo_dir = tmp_path / "demo"
    for _ in range(2):  # the README command can be run again: the demo replaces its output
        code, _, err = run([*small, "--out", str(demo_dir)], capsys)
        assert code == 0, err
        assert len(_lines(demo_dir / "history.jsonl")) == 1  # not appended to the last demo
    assert "mean_iu" in json.loads((demo_dir / "demo.json").read_text())["scores"]
    assert run([*small, "--out", str(run_dir), "--overwrite"], capsys)[0] == 0

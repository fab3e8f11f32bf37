"""The ``fcnfast`` command line end to end on tiny data."""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcnfast
from fcnfast import cli

ROOT = Path(__file__).resolve().parents[1]
HAS_CRF = importlib.util.find_spec("fcnfast.crf") is not None
TINY_TRAIN = [
    "--epochs",
    "1",
    "--train-images",
    "4",
    "--val-images",
    "2",
    "--image-size",
    "36",
    "--num-classes",
    "4",
    "--optimizer",
    "adam",
    "--quiet",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: avoid OpenMP spin-waiting on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    assert cli.main(["train", *TINY_TRAIN, "--out", str(out)]) == 0
    path = out / "checkpoint.pt"
    assert path.is_file() and (out / "history.jsonl").is_file()
    return path


def run_module(*args, timeout=120):
    """``python -m fcnfast ARGS`` in a subprocess (checks exit codes and stderr)."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "fcnfast", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    info = fcnfast.build_info()
    assert "version" in out and info["version"] in out and info["backend"] in out
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["torch"] == torch.__version__


def test_train_writes_history(checkpoint):
    record = json.loads((checkpoint.parent / "history.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 1 and record["step"] == 1
    assert set(record) >= {"loss", "pixel_acc", "mean_acc", "mean_iu", "fw_iu"}


def test_eval_prints_four_metrics(checkpoint, capsys, tmp_path):
    plot = tmp_path / "conf.png"
    assert (
        cli.main(["eval", "--checkpoint", str(checkpoint), "--quiet", "--confusion", str(plot)])
        == 0
    )
    out = capsys.readouterr().out
    for name in ("pixel acc", "mean acc", "mean IU", "f.w. IU"):
        assert name in out
    assert plot.is_file()
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--json", "--quiet"]) == 0
    scores = json.loads(capsys.readouterr().out)["fcn"]
    # the stored per-epoch validation of the same model on the same data
    ckpt = torch.load(checkpoint, weights_only=True)
    assert scores["mean_iu"] == pytest.approx(ckpt["metrics"]["mean_iu"])
    assert 0.0 <= scores["pixel_acc"] <= 1.0


def test_predict_on_odd_sized_image(checkpoint, tmp_path, capsys):
    image = tmp_path / "odd.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(
        image
    )
    labels = tmp_path / "labels.png"
    assert (
        cli.main(["predict", str(image), "-o", str(labels), "--checkpoint", str(checkpoint)]) == 0
    )
    with Image.open(labels) as im:
        assert im.mode == "P" and im.size == (53, 37)
        assert np.asarray(im).max() < 4
    assert "53x37" in capsys.readouterr().out
    refined = tmp_path / "refined.png"
    code = cli.main(
        ["predict", str(image), "-o", str(refined), "--checkpoint", str(checkpoint), "--crf"]
    )
    if HAS_CRF:
        assert code == 0
        with Image.open(refined) as im:
            assert im.mode == "P" and im.size == (53, 37)
    else:
        assert code == 2 and not refined.exists()


def test_crf_flag(checkpoint, tmp_path, capsys):
    code = cli.main(["eval", "--checkpoint", str(checkpoint), "--crf", "--quiet"])
    captured = capsys.readouterr()
    if HAS_CRF:
        assert code == 0
        assert "fcn+crf" in captured.out and "fcn " in captured.out
    else:
        assert code == 2
        assert captured.err.strip().startswith("fcnfast: error: --crf needs the fcnfast.crf")
        assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
        (["train", "--data", "/no/such/dir", "--epochs", "1"], "data directory not found"),
        (["predict", "missing.png", "-o", "x.png", "--checkpoint", "CKPT"], "image file not found"),
        (
            ["predict", "IMG", "-o", "/no/such/dir/x.png", "--checkpoint", "CKPT"],
            "output directory does not exist",
        ),
    ],
)
def test_bad_inputs_exit_2_with_one_line(args, message, checkpoint, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(image)
    args = [str(checkpoint) if a == "CKPT" else str(image) if a == "IMG" else a for a in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fcnfast: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_corrupt_checkpoint_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert cli.main(["eval", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--model", "fcn99"],
        ["train", "--lr", "-1"],
        ["train", "--epochs", "zero"],
        ["train", "--batch-size", "0"],
        ["train", "--lr", "nan"],
        ["eval"],
        ["nosuchcommand"],
    ],
)
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("fcnfast")


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--model", "fcn99"],  # rejected by argparse
        ["eval", "--checkpoint", "definitely_missing.pt"],  # rejected by main
    ],
)
def test_python_m_fcnfast_exits_2_without_traceback(args):
    proc = run_module(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fcnfast")


def test_plugins_are_optional(monkeypatch, capsys):
    calls = []

    def register_cli(subparsers):
        p = subparsers.add_parser("hsi", help="fake")
        p.set_defaults(func=lambda args: calls.append("ran") or 0)

    monkeypatch.setitem(
        sys.modules, "fcnfast.hsi", types.SimpleNamespace(register_cli=register_cli)
    )
    monkeypatch.setitem(sys.modules, "fcnfast.bench", None)  # absent: import raises
    assert cli.main(["hsi"]) == 0 and calls == ["ran"]
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench"])
    assert exc.value.code == 2


def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        cli.main(
            [
                "demo",
                "--out",
                str(out),
                "--epochs",
                "1",
                "--images",
                "4",
                "--val-images",
                "2",
                "--size",
                "36",
                "--no-timing",
                "--quiet",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "mean IU" in text and "demo finished in" in text
    for name in (
        "input.png",
        "ground_truth.png",
        "prediction.png",
        "confusion.png",
        "checkpoint.pt",
    ):
        assert (out / name).is_file(), name
    with Image.open(out / "prediction.png") as pred, Image.open(out / "input.png") as inp:
        assert pred.mode == "P" and pred.size == inp.size == (36, 36)


def test_demo_timing_compares_backends():
    from fcnfast.demo import demo_config, time_backends

    cfg = demo_config("unused", train_images=4, val_images=1, image_size=36)
    result = time_backends(cfg, steps=1, repeats=1)
    assert "reference" in result["summary"]
    if fcnfast.backend() == "native":
        assert result["native_s"] > 0 and result["reference_s"] > 0
        # same seed and batches: the two backends train the same model
        assert result["loss_difference"] < 1e-3


def test_train_and_eval_on_a_voc_directory(tmp_path, capsys):
    from fcnfast.data import write_synthetic_voc

    root = write_synthetic_voc(tmp_path / "voc", num_train=2, num_val=2, size=(30, 41), seed=3)
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--data",
                str(root),
                "--epochs",
                "1",
                "--batch-size",
                "2",
                "--optimizer",
                "adam",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "eval",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--data",
                str(root),
                "--split",
                "train",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    scores = json.loads(text[text.index("{") :])["fcn"]
    assert 0.0 <= scores["mean_iu"] <= 1.0
    assert (
        cli.main(
            [
                "eval",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--data",
                str(root),
                "--split",
                "nosuchsplit",
            ]
        )
        == 2
    )
    assert "nosuchsplit" in capsys.readouterr().err

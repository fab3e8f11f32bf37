"""Issue 16, item 2: every subcommand, given bad input, prints ONE line ``fcnfast: error: ...``
on stderr, exits with status 2 and shows no traceback -- and does so before any work starts."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_ARGS
from PIL import Image
from single_thread import one_intraop_thread  # noqa: F401 (autouse fixture)

from fcnfast import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny trained run, a 6-class VOC folder, an RGBA image, an empty folder, a text file."""
    from fcnfast.data import write_synthetic_voc

    root = tmp_path_factory.mktemp("errors")
    assert cli.main(["train", *TINY_TRAIN_ARGS, "--out", str(root / "run")]) == 0
    voc = write_synthetic_voc(
        root / "voc6", num_train=2, num_val=1, size=(24, 28), seed=1, num_classes=6
    )
    rgba = np.zeros((20, 22, 4), np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(np.zeros((20, 22, 3), np.uint8)).save(root / "rgb.png")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not an image")
    (root / "garbage.pt").write_bytes(b"garbage")
    return {
        "CKPT": str(root / "run" / "checkpoint.pt"),
        "RUN": str(root / "run"),
        "VOC6": str(voc),
        "RGBA": str(root / "rgba.png"),
        "RGB": str(root / "rgb.png"),
        "EMPTY": str(root / "empty"),
        "TXT": str(root / "notes.txt"),
        "GARBAGE": str(root / "garbage.pt"),
        "TMP": str(root),
    }


NO_CUDA = not torch.cuda.is_available()

# (subcommand arguments, a piece of the message); UPPER-CASE words are replaced by `files`
CASES = [
    # train
    (
        ["train", "--data", "VOC6", "--num-classes", "3", "--epochs", "1", "--out", "TMP/t1"],
        "--num-classes 3 but the training labels hold class 5",
    ),
    (["train", "--device", "tpu", "--out", "TMP/t2"], "--device 'tpu'"),
    (["train", "--device", "cuda:x", "--out", "TMP/t3"], "is not a device name"),
    (["train", "--resume", "GARBAGE", "--out", "TMP/t4"], "cannot read checkpoint"),
    (["train", "--resume", "TMP/missing.pt"], "checkpoint not found"),
    (
        ["train", "--resume", "CKPT", "--model", "fcn16s", "--backbone", "small"],
        "backbone: checkpoint 'tiny', given 'small'",
    ),
    (["train", *TINY_TRAIN_ARGS, "--out", "RUN"], "already holds a run"),
    (["train", "--out", "TXT"], "is not a directory"),
    (["train", "--epochs", "0"], "--epochs: must be > 0"),
    (["train", "--model", "fcn99"], "invalid choice: 'fcn99'"),
    # eval
    (["eval", "--checkpoint", "TMP/missing.pt"], "checkpoint not found"),
    (["eval", "--checkpoint", "GARBAGE"], "cannot read checkpoint"),
    (["eval", "--checkpoint", "CKPT", "--device", "tpu"], "--device 'tpu'"),
    (["eval", "--checkpoint", "CKPT", "--data", "TMP/nodata"], "not found"),
    (
        ["eval", "--checkpoint", "CKPT", "--data", "VOC6", "--split", "train"],
        "the checkpoint's model has 4 classes but the evaluation labels hold class 5",
    ),
    (["eval", "--model", "no_such_model", "--data", "VOC6"], "no_such_model"),
    (["eval", "--checkpoint", "CKPT", "--tile", "-3"], "--tile: must be >= 0"),
    # predict
    (
        ["predict", "TMP/missing.png", "-o", "TMP/x.png", "--checkpoint", "CKPT"],
        "image file not found",
    ),
    (["predict", "RGB", "-o", "TMP/x.jpg", "--checkpoint", "CKPT"], "not a lossless format"),
    (
        ["predict", "RGB", "-o", "TMP/x.png", "--overlay", "TMP/o.xyz", "--checkpoint", "CKPT"],
        "cannot tell an image format",
    ),
    (
        ["predict", "RGB", "-o", "TMP/nodir/x.png", "--checkpoint", "CKPT"],
        "output directory does not exist",
    ),
    (
        ["predict", "RGBA", "-o", "TMP/x.png", "--checkpoint", "CKPT", "--alpha", "error"],
        "has an alpha channel",
    ),
    (["predict", "TXT", "-o", "TMP/x.png", "--checkpoint", "CKPT"], "cannot read image"),
    (["predict", "EMPTY", "-o", "TMP/outdir", "--checkpoint", "CKPT"], "no images"),
    (["predict", "RGB", "RGBA", "-o", "TXT", "--checkpoint", "CKPT"], "is a file"),
    (["predict", "RGB", "-o", "TMP/x.png", "--checkpoint", "GARBAGE"], "cannot read checkpoint"),
    (
        ["predict", "RGB", "-o", "TMP/x.png", "--checkpoint", "CKPT", "--device", "tpu"],
        "--device 'tpu'",
    ),
    (["predict", "RGB", "-o", "TMP/x.png", "--model", "no_such_model"], "no_such_model"),
    (["predict", "RGB", "-o", "TMP/x.png"], "one of the arguments --checkpoint --model"),
    # info, demo
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--out", "TXT"], "is not a directory"),
    (["demo", "--epochs", "-1"], "--epochs: must be > 0"),
    # plugins
    (["hsi", "--data", "TMP/missing.mat"], "missing.mat"),
    (["hsi", "--window", "0"], "--window must be >= 1"),
    (["bench", "--classes", "0"], "--classes must be positive"),
    (["bench", "--quick", "--json", "TMP/nodir/b.json"], "does not exist"),
    (["finetune", "--data", "TMP/nodata"], "nodata"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
]
if NO_CUDA:
    CASES.append((["train", "--device", "cuda", "--out", "TMP/t5"], "no usable CUDA device"))
    CASES.append(
        (
            ["predict", "RGB", "-o", "TMP/x.png", "--checkpoint", "CKPT", "--device", "cuda"],
            "no usable CUDA device",
        )
    )


def _fill(args, files):
    out = []
    for a in args:
        for key, value in files.items():
            if a == key or a.startswith(key + "/"):
                a = value + a[len(key) :]
                break
        out.append(a)
    return out


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_input_is_one_line_exit_2(args, message, files, capsys):
    args = _fill(args, files)
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (args, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fcnfast: error: "), err
    assert message in err, (message, err)
    assert "Traceback" not in err
    # nothing was trained or written
    assert not Path(files["TMP"], "x.png").exists()
    assert not Path(files["TMP"], "t1").exists() or not any(Path(files["TMP"], "t1").iterdir())


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--device", "tpu"], "--device 'tpu'"),
        (["predict", "RGB", "-o", "TMP/y.jpg", "--checkpoint", "CKPT"], "not a lossless format"),
        (["bench", "--classes", "0"], "--classes must be positive"),
    ],
)
def test_python_m_fcnfast_prints_one_line(args, message, files):
    # the fcnfast under test (the installed package; PYTHONPATH as the suite was given), never the
    # bare source tree, which has no compiled extension and would add a fallback warning line
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fcnfast", *_fill(args, files)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=files["TMP"],
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcnfast: error: ") and message in lines[0]
    assert "Traceback" not in proc.stderr


def test_eval_json_prints_only_json(files, capsys, tmp_path):
    import json

    code = cli.main(
        [
            "eval",
            "--checkpoint",
            files["CKPT"],
            "--json",
            "--quiet",
            "--confusion",
            str(tmp_path / "c.png"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert set(json.loads(captured.out)) == {"fcn"}  # the whole of stdout is one JSON document
    assert "confusion matrix" in captured.err

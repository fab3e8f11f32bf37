"""Two-process data-parallel training on the CPU (gloo) through torchrun."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fcnfast
from fcnfast.train import TrainConfig, build_model_from_config, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
# `fcnfast train` that also saves each process's final weights (a test-only hook)
WORKER = Path(__file__).resolve().with_name("ddp_worker.py")
# where the fcnfast this test imported lives (the installed package in CI, the source tree when
# built in place): the workers must run the same one
PACKAGE_PARENT = Path(fcnfast.__file__).resolve().parents[1]
# 8 images, 2 per process per step: the same 4 images per step as one process with batch 4
# "small" has no batch norm, so 2 processes x batch 2 must equal 1 process x batch 4 exactly
DATA = dict(train_images=8, val_images=3, image_size=36, num_classes=4, backbone="small")
ARGS = [
    "--epochs",
    "1",
    "--train-images",
    "8",
    "--val-images",
    "3",
    "--image-size",
    "36",
    "--num-classes",
    "4",
    "--backbone",
    "small",
    "--optimizer",
    "sgd",
    "--lr",
    "0.05",
    "--dropout",
    "0",
    "--batch-size",
    "2",
    "--quiet",
]


def run_torchrun(args, env, timeout=560):
    """torchrun with 2 local processes. On a timeout torchrun gets SIGTERM, which it forwards
    to its workers (they run in sessions of their own; a SIGKILL would orphan them)."""
    env = dict(env, FCNFAST_DIST_TIMEOUT="120")  # a worker that lost its peer gives up
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=PACKAGE_PARENT,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(
            "torchrun did not finish in %d s:\n%s\n%s" % (timeout, stdout[-2000:], stderr[-2000:])
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_two_process_cpu_training_matches_one_process(tmp_path):
    out, dumps = tmp_path / "ddp", tmp_path / "dumps"
    dumps.mkdir()
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(PACKAGE_PARENT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = run_torchrun([str(WORKER), str(dumps), "train", *ARGS, "--out", str(out)], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # only rank 0 prints the epoch line and writes files
    assert proc.stdout.count("epoch 1/1") == 1, proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "history.jsonl"]

    rank0 = torch.load(dumps / "rank0.pt", weights_only=True)
    rank1 = torch.load(dumps / "rank1.pt", weights_only=True)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # replicas stayed in sync
        assert torch.equal(rank0[key], ckpt["model"][key]), key
    # validation: one confusion matrix over the whole set, each image counted once
    assert ckpt["confusion"].sum() == 3 * 36 * 36

    # averaged gradients of 2 x 2 images == one process with batch 4 (mean loss, no ignore)
    torch.set_num_threads(1)
    single = train(
        TrainConfig(
            optimizer="sgd", lr=0.05, dropout=0.0, batch_size=4, epochs=1, quiet=True, **DATA
        ),
        log=lambda m: None,
    )
    reference = single.model.state_dict()
    for key in rank0:
        torch.testing.assert_close(rank0[key], reference[key], atol=1e-5, rtol=1e-4)
    assert single.conf.sum() == ckpt["confusion"].sum()
    # ... and training did move the weights away from the (seeded) initial ones
    torch.manual_seed(0)
    initial = build_model_from_config(single.config).state_dict()
    assert not torch.equal(initial["score_fr.weight"], rank0["score_fr.weight"])

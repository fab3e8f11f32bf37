"""fcnfast.train: loss, optimiser presets, evaluation, checkpoints and exact resume."""

import os

import pytest
import torch
import torch.nn.functional as F

from fcnfast import ops
from fcnfast.metrics import confusion_matrix
from fcnfast.models import build_model
from fcnfast.train import (
    OPTIMIZER_PRESETS,
    TrainConfig,
    evaluate,
    load_checkpoint,
    load_model,
    pad_collate,
    save_checkpoint,
    segmentation_loss,
    train,
)

TINY = dict(train_images=8, val_images=2, image_size=36, num_classes=4, batch_size=4, quiet=True)


def quiet(_message):
    pass


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: one thread avoids OpenMP spin-waiting on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_decreases_on_synthetic_data():
    cfg = TrainConfig(optimizer="adam", lr=3e-3, epochs=6, validate=False, **TINY)
    result = train(cfg, log=quiet)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 12
    assert all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.8 * first, losses


@pytest.mark.parametrize("fixed", [False, True])
def test_segmentation_loss_matches_cross_entropy(fixed, monkeypatch):
    model = build_model("fcn8s", num_classes=3, backbone="tiny", fixed_upsampling=fixed).eval()
    torch.nn.init.normal_(model.score_fr.weight, std=0.1)  # score layers start at zero
    x = torch.randn(2, 3, 21, 27)
    target = torch.randint(0, 3, (2, 21, 27))
    target[0, :4] = 255
    expected_mean = F.cross_entropy(model(x), target, ignore_index=255)
    expected_sum = F.cross_entropy(model(x), target, ignore_index=255, reduction="sum")
    calls = []
    fused = ops.upsample_cross_entropy
    monkeypatch.setattr(
        ops, "upsample_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )
    torch.testing.assert_close(segmentation_loss(model, x, target), expected_mean)
    torch.testing.assert_close(segmentation_loss(model, x, target, "sum"), expected_sum)
    # the fused op runs exactly when the final upsampling is frozen
    assert len(calls) == (2 if fixed else 0)
    valid = (target != 255).sum()
    torch.testing.assert_close(expected_sum, expected_mean * valid)


def test_caffe_preset_is_the_paper_recipe():
    cfg = TrainConfig(optimizer="caffe").resolved()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.loss) == (
        1e-10,
        0.99,
        5e-4,
        1,
        "sum",
    )
    assert OPTIMIZER_PRESETS["caffe"]["lr"] == 1e-10
    # explicit values win over the preset
    assert TrainConfig(optimizer="caffe", lr=1e-9, batch_size=2).resolved().lr == 1e-9
    for bad in (
        dict(optimizer="rmsprop"),
        dict(loss="max"),
        dict(lr=-1.0),
        dict(epochs=0),
        dict(batch_size=0),
    ):
        with pytest.raises(ValueError):
            TrainConfig(**bad).resolved()


def test_pad_collate_pads_labels_with_ignore():
    a = (torch.ones(3, 2, 3), torch.zeros(2, 3, dtype=torch.int64))
    b = (torch.ones(3, 4, 2), torch.ones(4, 2, dtype=torch.int64))
    images, labels = pad_collate([a, b])
    assert images.shape == (2, 3, 4, 3) and labels.shape == (2, 4, 3)
    assert labels[0, 2:].eq(255).all() and labels[1, :, 2:].eq(255).all()
    assert labels[0, :2].eq(0).all() and images[0, :, 2:].eq(0).all()


def test_evaluate_sums_one_confusion_matrix():
    torch.manual_seed(3)
    model = build_model("fcn32s", num_classes=3, backbone="tiny")
    torch.nn.init.normal_(model.score_fr.weight, std=0.5)
    batches = [(torch.randn(2, 3, 20, 24), torch.randint(0, 3, (2, 20, 24))) for _ in range(3)]
    batches[1][1][0, :5] = 255
    conf = evaluate(model, batches, 3)
    model.eval()
    expected = sum(confusion_matrix(t, model(x).argmax(1), 3) for x, t in batches)
    assert torch.equal(conf, expected)
    assert conf.sum() == 3 * 2 * 20 * 24 - 5 * 24


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


@pytest.mark.parametrize("stop", ["epoch", "mid-epoch"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, stop):
    base = dict(optimizer="sgd", lr=1e-2, epochs=3, **{**TINY, "train_images": 12})
    full = train(TrainConfig(**base, out=str(tmp_path / "full")), log=quiet)
    first_part = dict(base, epochs=1) if stop == "epoch" else dict(base, max_steps=5)
    part = train(TrainConfig(**first_part, out=str(tmp_path / "part")), log=quiet)
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert ckpt["step"] == len(part.losses) and set(ckpt) >= {
        "model",
        "optimizer",
        "rng",
        "config",
        "epoch",
    }
    resumed = train(
        TrainConfig(**base, out=str(tmp_path / "part")),
        resume=tmp_path / "part" / "checkpoint.pt",
        log=quiet,
    )
    # the step right after the checkpoint has exactly the uninterrupted run's loss ...
    assert resumed.losses[0] == full.losses[len(part.losses)]
    # ... and so has every later step, and the final weights are identical
    assert part.losses + resumed.losses == full.losses
    assert torch.equal(_params(resumed.model), _params(full.model))
    assert resumed.history[-1]["mean_iu"] == full.history[-1]["mean_iu"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"format": "fcnfast-checkpoint-1", "value": torch.arange(4)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # half-written file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format": "fcnfast-checkpoint-1", "value": torch.zeros(4)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    assert torch.equal(load_checkpoint(path)["value"], torch.arange(4))


def test_load_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint({"format": "fcnfast-checkpoint-1", "x": torch.randn(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not an fcnfast checkpoint"):
        load_checkpoint(foreign)


def test_load_model_restores_the_trained_weights(tmp_path):
    result = train(TrainConfig(optimizer="adam", epochs=1, out=str(tmp_path), **TINY), log=quiet)
    model, ckpt = load_model(tmp_path / "checkpoint.pt")
    assert not model.training and ckpt["epoch"] == 1
    assert torch.equal(_params(model), _params(result.model))

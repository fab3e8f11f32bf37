"""End to end: a training step and ``predict`` of real FCNs, fcnfast vs the plain-PyTorch FCN.

    python benchmarks/bench_end_to_end.py --markdown benchmarks/results/end_to_end_measured.md

Models (issue #19, part 3):

* ``lite0``: the shipped CamVid model ``fcnfast.models.pretrained("fcn8s_lite0_camvid")``
  (EfficientNet-Lite0 FCN-8s, 11 classes, learned k3 s2 / k15 s8 deconvolutions), uint8
  480x360 images (``--lite0-size``, ``--lite0-batch``);
* ``vgg16``: the VGG16 FCN-8s of the reference Caffe net (21 classes, every upsampling
  frozen bilinear, as wkentaro/pytorch-fcn trains it), 500x500 (``--vgg-size``,
  ``--vgg-batch``); random weights (the work does not depend on them).

Implementations, same weights:

* ``native``: the fcnfast model on its native ops (``model.loss`` / ``model.predict``: the
  fused ``upsample_cross_entropy`` / ``upsample_argmax`` where the final upsampling is
  bilinear, the fused-crop deconvolutions and ``score_skip`` elsewhere);
* ``reference``: the same model under ``fcnfast.use_backend("reference")``;
* ``plain``: the FCN a user writes in PyTorch: ``nn.ConvTranspose2d`` + slicing, the 1x1 score
  convs on the whole skip features, ``F.cross_entropy`` on full-resolution logits,
  ``logits.argmax(1)`` (the backbone modules are shared with the fcnfast model).

Training step: ``zero_grad``, forward + loss (under ``torch.autocast("cpu", bf16)`` for the
bf16 rows), ``backward``, SGD (momentum 0.9) ``step``; ``predict``: the int64 label map,
under ``torch.no_grad``. Each (model, precision, phase, implementation) runs in a fresh
process: setup (model, optimizer, inputs), one warm-up call on a small input (library
initialisation, optimizer state), then ``--reps`` timed calls at full size (median); peak
memory is the growth of the process's peak RSS (VmHWM) over its RSS after setup. The
three implementations of a row run back to back; the machine's load average is recorded
per row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _common  # benchmarks/_common.py: the machine line
import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("native", "reference", "plain")


# ---------------------------------------------------------------------------------------
# the plain-PyTorch FCNs (what a user writes), sharing the backbone with the fcnfast model
# ---------------------------------------------------------------------------------------


def _frozen_bilinear(channels, kernel, stride):
    from fcnfast.nn import bilinear_kernel

    layer = nn.ConvTranspose2d(channels, channels, kernel, stride=stride, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, kernel))
    layer.weight.requires_grad_(False)
    return layer


def _conv_copy(src):
    layer = nn.Conv2d(src.in_channels, src.out_channels, 1, bias=src.bias is not None)
    layer.load_state_dict(src.state_dict())
    return layer


def _deconv_copy(src):
    layer = nn.ConvTranspose2d(
        src.in_channels,
        src.out_channels,
        src.kernel_size,
        stride=src.stride,
        bias=src.bias is not None,
    )
    layer.load_state_dict(src.state_dict())
    return layer


class PlainLiteFCN8s(nn.Module):
    """The Lite0 FCN-8s heads with nn.ConvTranspose2d + slicing (backbone shared)."""

    def __init__(self, src):
        super().__init__()
        self.backbone, self.drop = src.backbone, src.drop
        self.score_fr = _conv_copy(src.score_fr)
        self.upscore2, self.upscore_pool4 = (
            _deconv_copy(src.upscore2),
            _deconv_copy(src.upscore_pool4),
        )
        self.score_pool4, self.score_pool3 = (
            _conv_copy(src.score_pool4),
            _conv_copy(src.score_pool3),
        )
        self.upscore = _deconv_copy(src.upscore)

    def forward(self, x):
        feats, _ = self.backbone.forward_features(x)
        s = self.score_fr(self.drop(feats["stride32"]))
        for up, score, tap in (
            (self.upscore2, self.score_pool4, "stride16"),
            (self.upscore_pool4, self.score_pool3, "stride8"),
        ):
            skip = feats[tap]
            h, w = skip.shape[2:]
            s = up(s)[:, :, 1 : 1 + h, 1 : 1 + w] + score(skip)
        return self.upscore(s)[:, :, : x.shape[2], : x.shape[3]]


class PlainFCN8s(nn.Module):
    """wkentaro/pytorch-fcn's FCN8s (frozen bilinear nn.ConvTranspose2d, crops by slicing)."""

    def __init__(self, src):
        super().__init__()
        self.src = src  # features, fc6/7 and dropout shared (not copied)
        c = src.num_classes
        self.score_fr = _conv_copy(src.score_fr)
        self.score_pool4, self.score_pool3 = (
            _conv_copy(src.score_pool4),
            _conv_copy(src.score_pool3),
        )
        self.upscore2 = _frozen_bilinear(c, 4, 2)
        self.upscore_pool4 = _frozen_bilinear(c, 4, 2)
        self.upscore8 = _frozen_bilinear(c, 16, 8)
        self.o4, self.o3 = src.offsets["score_pool4"], src.offsets["score_pool3"]
        self.o8 = src.crop_offset

    def forward(self, x):
        m = self.src
        end3, end4 = m.pool_index[2] + 1, m.pool_index[3] + 1
        pool3 = m.features[:end3](x)
        pool4 = m.features[end3:end4](pool3)
        pool5 = m.features[end4:](pool4)
        h = m.drop6(F.relu(m.fc6(pool5), inplace=True))
        h = m.drop7(F.relu(m.fc7(h), inplace=True))
        s = self.upscore2(self.score_fr(h))
        s = (
            s
            + self.score_pool4(pool4)[
                :, :, self.o4 : self.o4 + s.shape[2], self.o4 : self.o4 + s.shape[3]
            ]
        )
        s = self.upscore_pool4(s)
        s = (
            s
            + self.score_pool3(pool3)[
                :, :, self.o3 : self.o3 + s.shape[2], self.o3 : self.o3 + s.shape[3]
            ]
        )
        return self.upscore8(s)[
            :, :, self.o8 : self.o8 + x.shape[2], self.o8 : self.o8 + x.shape[3]
        ]


def build(model_name):
    """(fcnfast model, plain model, make_input(batch, (h, w)) -> (x, target), classes)."""
    torch.manual_seed(0)
    if model_name == "lite0":
        from fcnfast.models import pretrained

        model = pretrained("fcn8s_lite0_camvid")
        plain = PlainLiteFCN8s(model)
    else:
        from fcnfast.models import fcn8s

        model = fcn8s(21, backbone="vgg16", fixed_upsampling=True, fixed_skip_upsampling=True)
        with torch.no_grad():  # score layers start at zero in FCN: give them some weight
            for name in ("score_fr", "score_pool4", "score_pool3"):
                nn.init.normal_(getattr(model, name).weight, std=1e-3)
        plain = PlainFCN8s(model)
    classes = model.num_classes

    def make_input(batch, size):
        g = torch.Generator().manual_seed(1)
        h, w = size
        images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=g)
        target = torch.randint(0, classes, (batch, h, w), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.05] = 255
        return images, target

    return model, plain, make_input, classes


def _to_float(model_name, model, images):
    if model_name == "lite0":
        return model.preprocess(images)
    return (images.float() - 120.0) / 60.0


# ---------------------------------------------------------------------------------------
# one configuration in this process
# ---------------------------------------------------------------------------------------


def _rss(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def train_step(model_name, model, net, fast, fmt, bf16=False):
    """``step(images, target) -> loss``: one training step of ``net`` (the fcnfast ``model`` when
    ``fast``, else the plain FCN sharing its backbone): ``zero_grad``, forward + loss (under bf16
    autocast when ``bf16``), ``backward``, SGD (momentum 0.9) ``step``; ``fmt`` is the memory
    format of the float input."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-8, momentum=0.9)

    def step(imgs, tgt):
        x = _to_float(model_name, model, imgs).contiguous(memory_format=fmt)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fast:
                loss = net.loss(x, tgt)
            else:
                loss = F.cross_entropy(net(x), tgt, ignore_index=255)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def child(args):
    import fcnfast

    torch.set_num_threads(args.threads)
    model, plain, make_input, _ = build(args.model)
    fast = args.impl != "plain"
    net = model if fast else plain
    size = tuple(args.size)
    images, target = make_input(args.batch, size)
    small_images, small_target = make_input(1, (64, 64))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    plain.to(memory_format=fmt)
    bf16 = args.precision == "bf16"
    backend = fcnfast.use_backend("reference" if args.impl == "reference" else "auto")

    if args.phase == "train":
        net.train()
        call = train_step(args.model, model, net, fast, fmt, bf16)
    else:
        net.eval()

        @torch.no_grad()
        def call(imgs, tgt):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if fast and args.model == "lite0":
                    return model.predict(imgs)  # uint8 in, preprocessing inside
                x = _to_float(args.model, model, imgs).contiguous(memory_format=fmt)
                if fast:
                    return model.predict(x)
                return net(x).argmax(1)

    with backend:
        call(small_images, small_target)  # warm-up: library init, optimizer state
        base = _rss("VmRSS")
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            out = call(images, target)
            times.append(time.perf_counter() - t)
            del out
    print(
        json.dumps(
            {
                "ms": statistics.median(times) * 1e3,
                "all_ms": [t * 1e3 for t in times],
                "peak_mb": _rss("VmHWM") - base,
                "load": os.getloadavg()[0],
            }
        )
    )


def heads(args):
    """Lite0 only: the FCN heads alone on precomputed backbone features (one process,
    interleaved rounds, median ms): where fcnfast and the plain FCN differ."""
    torch.set_num_threads(args.threads)
    model, plain, make_input, _ = build("lite0")
    images, target = make_input(args.lite0_batch, tuple(args.lite0_size))
    x = model.preprocess(images)
    with torch.no_grad():
        feats, pad = model.eval().backbone.forward_features(x)

    class Fixed(nn.Module):  # a backbone that returns the precomputed features
        def forward_features(self, _x):
            return feats, pad

    fake = Fixed()
    real_backbone = plain.backbone
    for precision in args.precisions.split(","):
        bf16 = precision == "bf16"
        for phase in args.phases.split(","):

            def run_fast(bf16=bf16, phase=phase):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    scores, crop = model.coarse_scores(x, fake)
                    if phase == "predict":
                        from fcnfast.models.fcn import chunked_argmax

                        return chunked_argmax(model.upscore, scores, crop)
                    loss = F.cross_entropy(
                        model.upscore(scores, crop=crop), target, ignore_index=255
                    )
                loss.backward()

            def run_plain(bf16=bf16, phase=phase):
                plain.backbone = fake
                try:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        if phase == "predict":
                            return plain(x).argmax(1)
                        loss = F.cross_entropy(plain(x), target, ignore_index=255)
                    loss.backward()
                finally:
                    plain.backbone = real_backbone

            times = {"native": [], "plain": []}
            for r in range(args.reps + 1):
                for name, fn in (("native", run_fast), ("plain", run_plain)):
                    with torch.set_grad_enabled(phase == "train"):
                        t = time.perf_counter()
                        fn()
                        if r:
                            times[name].append(time.perf_counter() - t)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(
                "lite0 heads %s %s b%d: native %.1f ms, plain %.1f ms (%.2fx), load %.1f"
                % (
                    precision,
                    phase,
                    args.lite0_batch,
                    ms["native"],
                    ms["plain"],
                    ms["plain"] / ms["native"],
                    os.getloadavg()[0],
                ),
                flush=True,
            )


# ---------------------------------------------------------------------------------------
# parent: sanity check, the runs, the table
# ---------------------------------------------------------------------------------------


def sanity(model_name):
    """The plain model computes what the fcnfast model computes (fp32, eval, small input)."""
    model, plain, make_input, _ = build(model_name)
    model.eval(), plain.eval()
    images, _ = make_input(2, (75, 90))
    x = _to_float(model_name, model, images)
    with torch.no_grad():
        a, c = model(x), plain(x)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
        pa = model.predict(images if model_name == "lite0" else x)
        assert torch.equal(pa, c.argmax(1)), "predict differs from the plain argmax"


def machine(threads):
    return _common.machine(
        " (%s), %d thread(s) per run" % (torch.backends.cpu.get_cpu_capability(), threads)
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="lite0,vgg16")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--phases", default="train,predict")
    p.add_argument("--lite0-size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    p.add_argument("--lite0-batch", type=int, default=4)
    p.add_argument("--vgg-size", type=int, nargs=2, default=(500, 500), metavar=("H", "W"))
    p.add_argument("--vgg-batch", type=int, default=4)
    p.add_argument(
        "--bf16-batch",
        type=int,
        default=None,
        help="batch of the bf16 rows (default: the model's batch)",
    )
    p.add_argument(
        "--bf16-scale",
        type=float,
        default=1.0,
        help="scale the image sides of the bf16 rows (bf16 convolutions are 5-10x "
        "slower than fp32 on CPUs without AVX512-BF16)",
    )
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--markdown", default=None)
    # child mode
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--heads",
        action="store_true",
        help="Lite0 heads only on precomputed features (one process, interleaved)",
    )
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.heads:
        return heads(args)

    rows = []
    lines = [
        "machine: " + machine(args.threads),
        "command: " + " ".join([os.path.basename(sys.executable)] + sys.argv),
        "start: %s, load average %s"
        % (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            " ".join("%.2f" % v for v in os.getloadavg()),
        ),
        "",
    ]
    print("\n".join(lines), flush=True)
    for model_name in args.models.split(","):
        sanity(model_name)
        for precision in args.precisions.split(","):
            size = tuple(args.lite0_size if model_name == "lite0" else args.vgg_size)
            batch = args.lite0_batch if model_name == "lite0" else args.vgg_batch
            if precision == "bf16":
                size = tuple(int(round(s * args.bf16_scale)) for s in size)
                batch = args.bf16_batch or batch
            for phase in args.phases.split(","):
                row = {
                    "model": model_name,
                    "precision": precision,
                    "phase": phase,
                    "batch": batch,
                    "size": "%dx%d" % (size[1], size[0]),
                }
                for impl in IMPLS:
                    cmd = [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--child",
                        "--model",
                        model_name,
                        "--impl",
                        impl,
                        "--precision",
                        precision,
                        "--phase",
                        phase,
                        "--size",
                        str(size[0]),
                        str(size[1]),
                        "--batch",
                        str(batch),
                        "--reps",
                        str(args.reps),
                        "--threads",
                        str(args.threads),
                    ]
                    if args.channels_last:
                        cmd.append("--channels-last")
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    row[impl] = json.loads(out.strip().splitlines()[-1])
                rows.append(row)
                print(_row_line(row), flush=True)
    table = _table(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n" + table + "\n")


def _row_line(row):
    r = row
    return (
        "%s %s %s b%d %s: native %.0f ms (%.0f MB), reference %.0f ms (%.0f MB), plain %.0f ms "
        "(%.0f MB); plain/native %.2fx, load %.1f"
        % (
            r["model"],
            r["precision"],
            r["phase"],
            r["batch"],
            r["size"],
            r["native"]["ms"],
            r["native"]["peak_mb"],
            r["reference"]["ms"],
            r["reference"]["peak_mb"],
            r["plain"]["ms"],
            r["plain"]["peak_mb"],
            r["plain"]["ms"] / r["native"]["ms"],
            r["plain"]["load"],
        )
    )


def _table(rows):
    out = [
        "| model | precision | phase | batch, size | (a) native ms | (b) reference ms | "
        "(c) plain ms | (c)/(a) | (b)/(a) | peak MB (a) / (b) / (c) | load |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        a, b, c = r["native"], r["reference"], r["plain"]
        out.append(
            "| %s | %s | %s | %d, %s | %.0f | %.0f | %.0f | %.2fx | %.2fx | %.0f / %.0f / "
            "%.0f | %.1f-%.1f |"
            % (
                r["model"],
                r["precision"],
                r["phase"],
                r["batch"],
                r["size"],
                a["ms"],
                b["ms"],
                c["ms"],
                c["ms"] / a["ms"],
                b["ms"] / a["ms"],
                a["peak_mb"],
                b["peak_mb"],
                c["peak_mb"],
                min(a["load"], b["load"], c["load"]),
                max(a["load"], b["load"], c["load"]),
            )
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()

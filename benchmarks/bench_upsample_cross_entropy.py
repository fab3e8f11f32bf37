"""upsample_cross_entropy (FCN-8s training loss: x8, crop 31 -> 500x500, ignore 255) vs PyTorch.

torch: the op's definition, depthwise F.conv_transpose2d + slice + F.cross_entropy
(fcnfast.reference). unfused: fcnfast's bilinear_upsample2d + F.cross_entropy.
"step" = loss forward + backward to the low-resolution scores (a training
step's share); "forward" = the loss alone. extra_info: PyTorch-allocator peak
(torch_peak_mb) and the kernel's own scratch (scratch_mb).

    python -m pytest benchmarks/bench_upsample_cross_entropy.py --benchmark-group-by=group
    (add --benchmark-timer=time.process_time for CPU time on a busy machine)
"""

import pytest
import torch.nn.functional as F
from _fcn_head import CASES, CROP, IDS, SCALE, labels, run, scores, scratch_mb

from fcnfast import ops, reference

LOSSES = {
    "torch": lambda x, t: reference.upsample_cross_entropy(x, t, SCALE, CROP),
    "unfused": lambda x, t: F.cross_entropy(
        ops.bilinear_upsample2d(x, SCALE, CROP), t, ignore_index=255
    ),
    "fcnfast": lambda x, t: ops.upsample_cross_entropy(x, t, SCALE, CROP),
}


def _step(loss_fn):
    def step(x, t):
        x = x.detach().requires_grad_()
        loss_fn(x, t).backward()
        return x.grad

    return step


def _scratch(classes, in_w):
    # interpolated rows (2*C*w) + one row of logits (C*w) + band accumulators (2*C*full_w)
    return scratch_mb(3 * classes * CROP[3] + 2 * classes * (in_w + 1) * SCALE)


@pytest.mark.parametrize("impl", list(LOSSES))
@pytest.mark.parametrize("classes,batch", CASES, ids=IDS)
def test_step(benchmark, impl, classes, batch):
    x, t = scores(classes, batch), labels(classes, batch)
    if impl == "fcnfast":
        benchmark.extra_info["scratch_mb"] = _scratch(classes, x.shape[3])
    run(
        benchmark,
        "upsample_cross_entropy step C=%d N=%d" % (classes, batch),
        _step(LOSSES[impl]),
        x,
        t,
        rounds=8,
    )


@pytest.mark.parametrize("impl", list(LOSSES))
@pytest.mark.parametrize("classes,batch", CASES[:1], ids=IDS[:1])
def test_forward(benchmark, impl, classes, batch):
    x, t = scores(classes, batch), labels(classes, batch)
    run(
        benchmark, "upsample_cross_entropy forward C=%d N=%d" % (classes, batch), LOSSES[impl], x, t
    )

"""bilinear_upsample2d (FCN-8s upscore8: x8, crop 31 -> 500x500) vs PyTorch.

Baselines in the same run: the depthwise F.conv_transpose2d + slice the op is
defined by (fcnfast.reference), and F.interpolate(bilinear) to the same size (a
different, cheaper upsampling: the fastest thing PyTorch offers for this shape).

    python -m pytest benchmarks/bench_bilinear_upsample2d.py --benchmark-group-by=group
    (add --benchmark-timer=time.process_time for CPU time on a busy machine)
"""

import pytest
import torch
import torch.nn.functional as F
from _fcn_head import CASES, CROP, IDS, SCALE, run, scores, scratch_mb

from fcnfast import ops, reference

FORWARD = {
    "torch_deconv": lambda x: reference.bilinear_upsample2d(x, SCALE, CROP),
    "torch_interpolate": lambda x: F.interpolate(x, size=CROP[2:], mode="bilinear"),
    "fcnfast": lambda x: ops.bilinear_upsample2d(x, SCALE, CROP),
}


@pytest.mark.parametrize("impl", list(FORWARD))
@pytest.mark.parametrize("classes,batch", CASES, ids=IDS)
def test_forward(benchmark, impl, classes, batch):
    x = scores(classes, batch)
    if impl == "fcnfast":  # two interpolated input rows per thread
        benchmark.extra_info["scratch_mb"] = scratch_mb(2 * classes * CROP[3])
    run(benchmark, "bilinear_upsample2d forward C=%d N=%d" % (classes, batch), FORWARD[impl], x)


@pytest.mark.parametrize("impl", ["torch_deconv", "fcnfast"])
@pytest.mark.parametrize("classes,batch", CASES, ids=IDS)
def test_backward(benchmark, impl, classes, batch):
    x = scores(classes, batch).requires_grad_()
    grad = torch.randn(batch, classes, *CROP[2:])
    if impl == "fcnfast":  # the backward op alone, as autograd calls it
        args = (grad, x.shape[2], x.shape[3], SCALE, list(CROP))
        fn = torch.ops.fcnfast.bilinear_upsample2d_backward
        benchmark.extra_info["scratch_mb"] = scratch_mb(2 * classes * (x.shape[3] + 1) * SCALE)
    else:
        out = reference.bilinear_upsample2d(x, SCALE, CROP)
        args = (grad,)
        fn = lambda g: torch.autograd.grad(out, x, g, retain_graph=True)  # noqa: E731
    run(benchmark, "bilinear_upsample2d backward C=%d N=%d" % (classes, batch), fn, *args)

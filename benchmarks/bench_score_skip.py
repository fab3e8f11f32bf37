"""score_skip: PyTorch (coarse + F.conv2d(feature * scale, weight, bias)[window]) vs fcnfast.

FCN-8s 500x500 shapes (Caffe geometry, DESIGN.md): score_pool4 on pool4 512x44x44, window 34x34
at offset 5; score_pool3 on pool3 256x88x88, window 70x70 at offset 9. Groups are named
``score_skip-<pool4|pool3>-C<classes>[-N<batch>]-<fwd|fwdbwd>``.
"""

import pytest
import torch
import torch.nn.functional as F

from fcnfast import ops
from fcnfast.bench import FUSE3, FUSE4, POOL3, POOL3_OFFSET, POOL4, POOL4_OFFSET

# name, feature channels, feature size, window size, offset (fcnfast.bench's FCN-8s geometry)
SKIPS = [("pool4", 512, POOL4, FUSE4, POOL4_OFFSET), ("pool3", 256, POOL3, FUSE3, POOL3_OFFSET)]
CASES = [s + (c, 1) for s in SKIPS for c in (21, 59, 150)] + [SKIPS[0] + (21, 8)]


def _inputs(case, requires_grad=False):
    _, ch, size, win, _, classes, n = case
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(n, classes, win, win, generator=g).requires_grad_(requires_grad)
    feature = torch.randn(n, ch, size, size, generator=g).requires_grad_(requires_grad)
    weight = (torch.randn(classes, ch, 1, 1, generator=g) * 0.05).requires_grad_(requires_grad)
    bias = torch.randn(classes, generator=g).requires_grad_(requires_grad)
    return coarse, feature, weight, bias


def _fn(impl, case):
    off, win = case[4], case[3]
    if impl == "torch":
        return lambda c, f, w, b: c + F.conv2d(f * 1.0, w, b)[..., off : off + win, off : off + win]
    return lambda c, f, w, b: ops.score_skip(c, f, w, b, 1.0, (off, off))


def _group(case, kind):
    n = case[6]
    return "score_skip-%s-C%d%s-%s" % (case[0], case[5], "" if n == 1 else "-N%d" % n, kind)


def _id(case):
    return "%s-C%d-N%d" % (case[0], case[5], case[6])


@pytest.mark.parametrize("impl", ["torch", "fcnfast"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward(bench, case, impl):
    args = _inputs(case)
    fn = _fn(impl, case)
    with torch.no_grad():
        bench(_group(case, "fwd"), lambda: fn(*args))


@pytest.mark.parametrize("impl", ["torch", "fcnfast"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_backward(bench, case, impl):
    args = _inputs(case, requires_grad=True)
    fn = _fn(impl, case)
    grad = torch.randn(args[0].shape)
    bench(_group(case, "fwdbwd"), lambda: torch.autograd.grad(fn(*args), args, grad))

"""conv_transpose2d + crop: PyTorch (F.conv_transpose2d then slice) vs fcnfast, FCN-8s 500x500.

Groups are named ``conv_transpose2d-<geometry>-C<classes>[-N<batch>]-<fwd|fwdbwd>``; each holds
``torch`` and ``fcnfast`` on the same inputs. Geometry (Caffe voc-fcn8s/16s/32s, DESIGN.md):
upscore2 k4 s2 on score_fr 16x16 -> 34x34, upscore_pool4 k4 s2 on 34x34 -> 70x70,
upscore8 k16 s8 on 70x70 -> 568x568 cropped at 31 to 500x500 (FCN-8s),
upscore16 k32 s16 on 34x34 -> 560 cropped at 27 (FCN-16s), upscore k64 s32 on 16x16 -> 544
cropped at 19 (FCN-32s). Weights are random (learned deconvolution), with bias.
"""

import pytest
import torch
import torch.nn.functional as F

from fcnfast import ops

# name, input size, kernel, stride, crop offset (None: full output), output size
GEOMETRIES = [
    ("k4s2-upscore2", 16, 4, 2, None, None),
    ("k4s2-upscore_pool4", 34, 4, 2, None, None),
    ("k16s8", 70, 16, 8, 31, 500),
    ("k32s16", 34, 32, 16, 27, 500),
    ("k64s32", 16, 64, 32, 19, 500),
]
CLASSES = [21, 59, 150]


def _cases():
    for name, size, k, s, off, out in GEOMETRIES:
        for c in CLASSES:
            if k == 64 and c != 21:
                continue  # keep the run short: FCN-32s only with the VOC classes
            yield name, size, k, s, off, out, c, 1
    yield "k16s8", 70, 16, 8, 31, 500, 21, 8


CASES = list(_cases())


def _inputs(size, k, s, c, n, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, size, size, generator=g).requires_grad_(requires_grad)
    w = (torch.randn(c, c, k, k, generator=g) * 0.05).requires_grad_(requires_grad)
    b = torch.randn(c, generator=g).requires_grad_(requires_grad)
    return x, w, b


def _functions(off, out, s):
    def torch_fn(x, w, b):
        y = F.conv_transpose2d(x, w, b, stride=s)
        return y if off is None else y[..., off : off + out, off : off + out]

    def fcnfast_fn(x, w, b):
        return ops.conv_transpose2d(
            x, w, b, stride=s, crop=None if off is None else (off, off, out, out)
        )

    return {"torch": torch_fn, "fcnfast": fcnfast_fn}


def _group(name, c, n, kind):
    return "conv_transpose2d-%s-C%d%s-%s" % (name, c, "" if n == 1 else "-N%d" % n, kind)


@pytest.mark.parametrize("impl", ["torch", "fcnfast"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "%s-C%d-N%d" % (c[0], c[6], c[7]))
def test_forward(bench, case, impl):
    name, size, k, s, off, out, c, n = case
    x, w, b = _inputs(size, k, s, c, n)
    fn = _functions(off, out, s)[impl]
    with torch.no_grad():
        bench(_group(name, c, n, "fwd"), lambda: fn(x, w, b))


@pytest.mark.parametrize("impl", ["torch", "fcnfast"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "%s-C%d-N%d" % (c[0], c[6], c[7]))
def test_forward_backward(bench, case, impl):
    name, size, k, s, off, out, c, n = case
    x, w, b = _inputs(size, k, s, c, n, requires_grad=True)
    fn = _functions(off, out, s)[impl]
    grad = torch.randn(fn(x, w, b).shape)

    def step():
        y = fn(x, w, b)
        return torch.autograd.grad(y, (x, w, b), grad)

    bench(_group(name, c, n, "fwdbwd"), step)

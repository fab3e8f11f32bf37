"""upsample_argmax vs bilinear_upsample2d(...).argmax(1).

The native kernel computes each upsampled score with exactly the arithmetic of the
native bilinear_upsample2d (separable, explicit fma; csrc/common/bilinear.h), so its
labels equal ``ops.bilinear_upsample2d(x).argmax(1)`` bit for bit, ties and NaN
included. The reference upsamples with F.conv_transpose2d, whose 2x2-tap sum
(products with the rounded 2-D weights, summed in its own order) can differ from
ours in the last bit; where two classes are that close (a near-tie) the labels may
legitimately differ. So against the reference we demand equality wherever the
reference's top-2 margin is clear, and > 99.9% equality overall; exact ties are
tested with inputs that make them exact in both implementations.
"""

import pytest
import torch
from conftest import TOLERANCE, require_native
from op_cases import (
    ORACLE_DTYPE_IDS,
    ORACLE_DTYPES,
    UPSAMPLE_ERRORS,
    check_upsample_error,
    upsample_shapes,
)

import fcnfast
from fcnfast import ops, reference

OP = "upsample_argmax"

# (N, C, H, W, scale, crop)
SHAPES = upsample_shapes(
    # FCN-8s, FCN-32s, FCN-16s heads: (N, C, H, W, scale, out_h, out_w)
    heads=[(1, 21, 16, 16, 8, 100, 90), (2, 21, 5, 6, 32, 150, 170), (1, 7, 9, 8, 16, 100, 90)],
    bottom_right=(1, 2, 3, 3, 2, 1, 2),
    one_pixel=(1, 5, 4, 4, 4, (2, 3, 1, 1)),
) + [
    (1, 5, 4, 4, 4, (2, 3, 0, 5)),  # zero-size crop
    (0, 5, 4, 4, 4, None),  # empty batch
    (2, 1, 3, 3, 2, None),  # one class: all zeros
]


def assert_labels_match_reference(labels, scores, threshold):
    """Equal wherever the reference top-2 margin exceeds ``threshold`` (relative to
    the score scale), and on more than 99.9% of all pixels."""
    expected = scores.argmax(1)
    assert labels.shape == expected.shape and labels.dtype == torch.int64
    if expected.numel() == 0:
        return
    if scores.shape[1] > 1:
        top2 = scores.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > threshold * max(1.0, scores.abs().max().item())
    else:
        clear = torch.ones_like(expected, dtype=torch.bool)
    assert torch.equal(labels[clear], expected[clear]), "labels differ at a clear margin"
    assert (labels == expected).double().mean().item() > 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device):
    require_native(OP, device)
    n, c, h, w, scale, crop = shape
    x = torch.randn(n, c, h, w, dtype=dtype)
    labels = ops.upsample_argmax(x.to(device), scale, crop)
    assert labels.device.type == device
    threshold = 1e-5 if dtype == torch.float32 else 1e-12
    assert_labels_match_reference(
        labels.cpu(), reference.bilinear_upsample2d(x, scale, crop), threshold
    )
    # same arithmetic as the native upsampling: bitwise the same labels
    assert torch.equal(labels, ops.bilinear_upsample2d(x.to(device), scale, crop).argmax(1))


def test_fcn8s_head_full_size(device):
    require_native(OP, device)
    x = torch.randn(1, 21, 70, 70)
    labels = ops.upsample_argmax(x.to(device), 8, (31, 31, 500, 500))
    scores = reference.bilinear_upsample2d(x, 8, (31, 31, 500, 500))
    assert_labels_match_reference(labels.cpu(), scores, 1e-5)
    assert torch.equal(
        labels, ops.bilinear_upsample2d(x.to(device), 8, (31, 31, 500, 500)).argmax(1)
    )


# (N, C, H, W, scale, crop) (formerly test_cuda.py)
ORACLE_SHAPES = [
    (2, 21, 6, 7, 8, (31, 31, 20, 25)),
    (1, 21, 4, 4, 32, (19, 19, 100, 90)),
    (3, 5, 5, 6, 2, None),
]


@pytest.mark.parametrize("dtype", ORACLE_DTYPES, ids=ORACLE_DTYPE_IDS)
@pytest.mark.parametrize("case", ORACLE_SHAPES)
def test_labels_score_the_maximum(case, dtype, device):
    """Every dtype: the chosen class scores the fp64 maximum up to the dtype's rounding
    (near-ties may differ); in fp64 the labels are the fp64 argmax."""
    require_native(OP, device)
    n, c, h, w, scale, crop = case
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype)
    labels = ops.upsample_argmax(x.to(device), scale, crop)
    assert labels.dtype == torch.int64 and labels.device.type == device
    scores = reference.bilinear_upsample2d(x.double(), scale, crop)
    assert labels.shape == scores.shape[:1] + scores.shape[2:]
    labels = labels.cpu()
    assert labels.min() >= 0 and labels.max() < c
    best = scores.max(1).values
    chosen = scores.gather(1, labels.unsqueeze(1)).squeeze(1)
    tol = TOLERANCE[dtype] * max(1.0, scores.abs().max().item())
    assert (best - chosen).max().item() <= tol
    if dtype == torch.float64:
        assert torch.equal(labels, scores.argmax(1))


def test_bfloat16(device):
    """bf16 scores are rounded to bf16 before the comparison, as the op's
    definition bilinear_upsample2d(x).argmax(1) implies (bf16 makes many ties)."""
    require_native(OP, device)
    x = torch.randn(2, 21, 6, 7).bfloat16()
    labels = ops.upsample_argmax(x.to(device), 8, (3, 5, 40, 50))
    assert torch.equal(labels, ops.bilinear_upsample2d(x.to(device), 8, (3, 5, 40, 50)).argmax(1))
    labels = labels.cpu()
    scores = reference.bilinear_upsample2d(x.float(), 8, (3, 5, 40, 50))
    top2 = scores.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2e-2 * scores.abs().max()
    assert torch.equal(labels[clear], scores.argmax(1)[clear])


def test_exact_ties_go_to_the_first_class(device):
    require_native(OP, device)
    x = torch.randn(2, 6, 5, 5)
    x[:, 4] = x[:, 1]  # class 4 ties class 1 everywhere: never chosen
    x[:, 5] = x[:, 2]
    labels = ops.upsample_argmax(x.to(device), 4, None).cpu()
    assert not (labels == 4).any() and not (labels == 5).any()
    assert torch.equal(labels, reference.upsample_argmax(x, 4, None))
    const = torch.full((1, 3, 4, 4), 2.5)  # all classes equal (and the zero border)
    assert torch.equal(
        ops.upsample_argmax(const.to(device), 2, None).cpu(),
        torch.zeros(1, 10, 10, dtype=torch.int64),
    )
    assert torch.equal(
        reference.upsample_argmax(const, 2, None), torch.zeros(1, 10, 10, dtype=torch.int64)
    )
    # all zeros (formerly test_cuda.test_upsample_argmax_ties_and_nan_follow_torch_argmax)
    zeros = torch.zeros(1, 4, 3, 3)
    assert torch.equal(
        ops.upsample_argmax(zeros.to(device), 2).cpu(), torch.zeros(1, 8, 8, dtype=torch.int64)
    )
    zeros[0, 2, 1, 1] = float("nan")
    assert torch.equal(
        ops.upsample_argmax(zeros.to(device), 2).cpu(), reference.upsample_argmax(zeros, 2)
    )


def test_nan_and_inf_like_reference(device):
    """NaN is the maximum for torch.argmax (first NaN wins); +Inf beats finite values."""
    require_native(OP, device)
    # class c scores 10*c + 1 everywhere: clear margins, label C-1 away from the specials
    x = (torch.arange(5, dtype=torch.float32) * 10 + 1).view(1, 5, 1, 1).repeat(2, 1, 6, 6)
    x[0, 2, 1, 1] = float("nan")
    x[0, 3, 1, 2] = float("nan")  # both NaN where the windows overlap: class 2 wins
    x[1, 0, 4, 4] = float("inf")
    x[1, 1, 0, 0] = float("-inf")
    labels = ops.upsample_argmax(x.to(device), 4, (1, 2, 20, 21)).cpu()
    assert torch.equal(labels, reference.upsample_argmax(x, 4, (1, 2, 20, 21)))
    assert (labels[0] == 2).any() and (labels[0] == 3).any() and (labels[1] == 0).any()


def test_channels_last_and_noncontiguous(device):
    require_native(OP, device)
    x = torch.randn(2, 5, 6, 7, device=device).to(memory_format=torch.channels_last)
    assert torch.equal(
        ops.upsample_argmax(x, 4, (3, 2, 20, 25)),
        ops.upsample_argmax(x.contiguous(), 4, (3, 2, 20, 25)),
    )
    y = torch.randn(2, 10, 12, 7, device=device)[:, ::2, ::2]
    assert torch.equal(ops.upsample_argmax(y, 3, None), ops.bilinear_upsample2d(y, 3).argmax(1))
    assert_labels_match_reference(
        ops.upsample_argmax(y, 3, None).cpu(), reference.bilinear_upsample2d(y.cpu(), 3), 1e-5
    )


def test_opcheck(device):
    require_native(OP, device)
    x = torch.randn(2, 3, 4, 5, device=device)
    torch.library.opcheck(torch.ops.fcnfast.upsample_argmax.default, (x, 3, [2, 1, 9, 11]))
    # 4 classes, x4, crop (3, 3, 17, 20) (formerly test_cuda.test_opcheck_cuda)
    x = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fcnfast.upsample_argmax.default, (x, 4, [3, 3, 17, 20]))


def test_compile_fullgraph():
    require_native(OP)
    x = torch.randn(1, 4, 3, 3)
    fn = torch.compile(lambda t: fcnfast.upsample_argmax(t, 4, (1, 2, 10, 9)), fullgraph=True)
    assert torch.equal(fn(x), ops.upsample_argmax(x, 4, (1, 2, 10, 9)))


@pytest.mark.parametrize("impl", [ops, reference])
@pytest.mark.parametrize("kwargs,match", UPSAMPLE_ERRORS)
def test_errors(impl, kwargs, match):
    check_upsample_error(impl.upsample_argmax, kwargs, match)


def test_native_checks_direct_call():
    require_native(OP)
    f = torch.ops.fcnfast.upsample_argmax
    with pytest.raises(ValueError, match="scale must be a positive int, got -1"):
        f(torch.randn(1, 3, 4, 4), -1, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="crop .* lies outside"):
        f(torch.randn(1, 3, 4, 4), 2, [9, 0, 2, 1])
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        f(torch.randn(4, 4), 2, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="at least one channel"):
        f(torch.randn(1, 0, 4, 4), 2, [0, 0, 1, 1])

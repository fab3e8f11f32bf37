"""conv_transpose2d (+ fused crop): native CPU kernels vs fcnfast.reference.

The native op has three forward paths: an AVX-512 row kernel for fp32 FCN
geometries (kernel = taps * stride, 16 % stride_w == 0, small C_in; on CPUs
with AVX-512F), a phase convolution on oneDNN for the other dense geometries,
and a per-pixel gather for dilated/sparse ones (built on the torch-free
csrc/common/conv_transpose2d.h meant for the CUDA kernels too). The `path`
fixture runs each test on "rows" (the default choice), "phase"
(FCNFAST_NO_AVX512=1), "direct" (FCNFAST_CONV_TRANSPOSE_DIRECT=1), "aten" (the default
routing of small deconvolutions to ATen, FCNFAST_CONV_TRANSPOSE_ATEN), and on "cuda"
(the CUDA kernels, where a CUDA device is present; the CPU reference is the oracle).
"""

import pytest
import torch
from conftest import (
    assert_close_scaled,
    assert_output_mask,
    compare_forward_backward,
    leaves_on,
    require_native,
    variant_device,
    with_cuda,
)
from op_cases import oracle_tests

import fcnfast
from fcnfast import ops, reference

OP = "conv_transpose2d"

# (N, C_in, C_out, H, W, kernel, stride, padding, output_padding, groups, dilation, crop)
SHAPES = [
    # FCN geometries (channels reduced, crops as in DESIGN.md)
    (1, 3, 3, 16, 16, 4, 2, 0, 0, 1, 1, None),  # upscore2 16 -> 34
    (2, 3, 3, 34, 34, 4, 2, 0, 0, 1, 1, None),  # upscore_pool4 34 -> 70
    (1, 2, 2, 70, 70, 16, 8, 0, 0, 1, 1, (31, 31, 500, 500)),  # FCN-8s upscore8 on 500x500
    (2, 3, 4, 10, 10, 16, 8, 0, 0, 1, 1, (31, 31, 40, 50)),  # k16 s8, crop 31
    (1, 3, 2, 6, 6, 32, 16, 0, 0, 1, 1, (27, 27, 50, 58)),  # FCN-16s k32 s16, crop 27
    (1, 2, 3, 4, 4, 64, 32, 0, 0, 1, 1, (19, 19, 100, 120)),  # FCN-32s k64 s32, crop 19
    # general geometry
    (3, 5, 4, 7, 9, 3, 2, 1, 1, 1, 1, None),  # odd sizes, padding, output_padding
    (2, 6, 4, 5, 6, 3, 2, 1, 1, 2, 1, None),  # groups
    (2, 4, 4, 5, 5, 4, 2, 1, 0, 4, 1, (1, 2, 6, 5)),  # depthwise
    (1, 3, 2, 5, 4, 3, 1, 0, 0, 1, 3, None),  # stride 1, dilation 3
    (2, 4, 6, 5, 4, 5, 3, 2, 1, 2, 2, (1, 1, 9, 7)),  # dilation 2, stride 3, groups
    (1, 2, 3, 6, 5, 5, 2, 3, 1, 1, 1, (0, 0, 1, 1)),  # 1-pixel crop at the corner
    (1, 2, 3, 6, 5, (2, 5), (3, 2), (1, 0), (2, 1), 1, (1, 2), None),  # anisotropic everything
    (2, 3, 2, 4, 4, 2, 4, 0, 3, 1, 1, None),  # kernel < stride: gaps
    (2, 3, 2, 5, 5, 4, 2, 0, 0, 1, 1, (9, 0, 3, 12)),  # crop on the bottom/right edges
    (0, 3, 2, 5, 5, 4, 2, 0, 0, 1, 1, None),  # empty batch
    (2, 3, 2, 5, 5, 4, 2, 0, 0, 1, 1, (2, 2, 0, 4)),  # 0-size crop
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _make(shape, dtype=torch.float32, bias=True):
    n, ci, co, h, w, k, s, p, op, g, d, crop = shape
    kh, kw = _pair(k)
    x = torch.randn(n, ci, h, w, dtype=dtype, requires_grad=True)
    weight = torch.randn(ci, co // g, kh, kw, dtype=dtype, requires_grad=True)
    b = torch.randn(co, dtype=dtype, requires_grad=True) if bias else None
    kwargs = dict(stride=s, padding=p, output_padding=op, groups=g, dilation=d, crop=crop)
    return x, weight, b, kwargs


@pytest.fixture(params=with_cuda("rows", "phase", "direct", "aten"))
def path(request, monkeypatch):
    """The CPU path: "aten" is the default routing (small float32 deconvolutions at stride
    <= 2 through ATen's transposed convolution, the rest as "rows"); the others force one
    kernel (conftest turns the ATen route off for every other test)."""
    if request.param != "cuda":
        monkeypatch.setenv(
            "FCNFAST_CONV_TRANSPOSE_DIRECT", "1" if request.param == "direct" else "0"
        )
        monkeypatch.setenv("FCNFAST_NO_AVX512", "1" if request.param == "phase" else "0")
        monkeypatch.setenv("FCNFAST_CONV_TRANSPOSE_ATEN", "1" if request.param == "aten" else "0")
    return request.param


def _compare(x, weight, b, kwargs, device="cpu"):
    inputs = [x, weight] + ([b] if b is not None else [])

    def call(impl):
        if b is None:
            return lambda x_, w_: impl.conv_transpose2d(x_, w_, None, **kwargs)
        return lambda x_, w_, b_: impl.conv_transpose2d(x_, w_, b_, **kwargs)

    return compare_forward_backward(call(ops), call(reference), inputs, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
def test_matches_reference(shape, dtype, path):
    require_native(OP, variant_device(path))
    x, weight, b, kwargs = _make(shape, dtype, bias=shape[0] != 1)
    _compare(x, weight, b, kwargs, variant_device(path))


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[4], SHAPES[7], SHAPES[10]])
def test_bfloat16(shape, path):
    """bf16 in/out with fp32 accumulation, vs the fp32 reference on the same (rounded) values."""
    device = variant_device(path)
    require_native(OP, device)
    x, weight, b, kwargs = _make(shape, torch.bfloat16)
    xd, weight_d, b_d = leaves_on(device, x, weight, b)
    out = ops.conv_transpose2d(xd, weight_d, b_d, **kwargs)
    assert out.dtype == torch.bfloat16 and out.device.type == device
    args32 = [t.detach().float().requires_grad_() for t in (x, weight, b)]
    ref = reference.conv_transpose2d(*args32, **kwargs)
    assert_close_scaled(out.float().cpu(), ref, dtype=torch.bfloat16)
    grad = torch.randn(out.shape, dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (xd, weight_d, b_d), grad.to(device))
    grads_ref = torch.autograd.grad(ref, args32, grad.float())
    for name, gn, gr in zip(("x", "weight", "bias"), grads, grads_ref):
        assert gn.dtype == torch.bfloat16
        assert_close_scaled(gn.float().cpu(), gr, dtype=torch.bfloat16, what="grad " + name)


def test_channels_last_and_noncontiguous(path):
    require_native(OP, variant_device(path))
    x = torch.randn(2, 4, 9, 14)[..., ::2].to(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(6, 4, 4, 4).permute(1, 0, 2, 3).requires_grad_()  # (4, 6, 4, 4), strided
    b = torch.randn(12)[::2].requires_grad_()
    assert not x.is_contiguous() and not weight.is_contiguous() and not b.is_contiguous()
    _compare(x, weight, b, dict(stride=2, padding=1, crop=(1, 2, 12, 10)), variant_device(path))


# Geometries of the AVX-512 row kernel (kernel = taps * stride, 16 % stride_w == 0):
# every stride it takes, 1-3 taps, crop offsets at every phase, rows narrower than
# one vector or not a multiple of it, channel counts that leave partial blocks.
# (N, C_in, C_out, H, W, kernel, stride, padding, crop)
ROW_KERNEL_SHAPES = [
    (1, 3, 5, 9, 11, 4, 2, 0, None),  # k4 s2, 5 channels: one block of 5
    (2, 4, 7, 6, 7, 16, 8, 0, (31 - 24, 3, 30, 37)),  # k16 s8, crop at phase 7 / 3
    (1, 2, 13, 5, 4, 32, 16, 0, (5, 11, 60, 50)),  # k32 s16, 13 = 5 + 4 + 4 channels
    (2, 3, 2, 7, 5, (6, 12), (2, 4), (1, 2), (1, 6, 9, 17)),  # taps 3, anisotropic, padding
    (1, 5, 3, 4, 9, (3, 2), (3, 1), 0, (2, 0, 7, 10)),  # stride_w 1 (one phase), taps 1 x 2
    (1, 2, 1, 3, 3, 8, 4, 1, (0, 1, 10, 5)),  # one output channel, 5-column rows
    (1, 6, 6, 3, 40, 4, 2, 0, (0, 1, 8, 79)),  # 79 columns: 4 full vectors + 15
]


@pytest.mark.parametrize(
    "shape", ROW_KERNEL_SHAPES, ids=[str(i) for i in range(len(ROW_KERNEL_SHAPES))]
)
def test_row_kernel_geometries(shape, path):
    """The AVX-512 row kernel's geometries, on all three paths, vs the reference."""
    require_native(OP, variant_device(path))
    n, ci, co, h, w, k, s, p, crop = shape
    x = torch.randn(n, ci, h, w, requires_grad=True)
    weight = torch.randn(ci, co, *_pair(k), requires_grad=True)
    b = torch.randn(co, requires_grad=True) if n > 1 else None
    _compare(x, weight, b, dict(stride=s, padding=p, crop=crop), variant_device(path))


def test_fcn8s_upscore8_full_channels(device):
    """The FCN-8s final upsampling with 21 classes (bilinear-like sizes, learned weight)."""
    require_native(OP, device)
    x = torch.randn(1, 21, 70, 70, requires_grad=True)
    weight = (torch.randn(21, 21, 16, 16) * 0.1).requires_grad_()
    _compare(x, weight, None, dict(stride=8, crop=(31, 31, 500, 500)), device)


@pytest.mark.parametrize(
    "mask",
    [
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (True, True, True),
        (False, False, False),
    ],
)
def test_backward_output_mask(mask, path):
    """Entries not asked for are empty; the others match the reference gradients."""
    device = variant_device(path)
    require_native(OP, device)
    x, weight, b, kwargs = _make(SHAPES[6], torch.float64)
    out = reference.conv_transpose2d(x, weight, b, **kwargs)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (x, weight, b), grad)
    crop = list(kwargs["crop"] or (0, 0) + tuple(out.shape[2:]))
    got = torch.ops.fcnfast.conv_transpose2d_backward(
        grad.to(device),
        x.detach().to(device),
        weight.detach().to(device),
        [2, 2],
        [1, 1],
        [1, 1],
        1,
        [1, 1],
        crop,
        list(mask),
    )
    assert_output_mask(mask, got, expected)


def test_gradcheck_fp64(path):
    device = variant_device(path)
    require_native(OP, device)
    for shape in (
        (1, 2, 3, 4, 5, 4, 2, 0, 0, 1, 1, (3, 2, 6, 7)),
        (2, 2, 4, 3, 3, 3, 2, 1, 1, 2, 2, (1, 0, 5, 4)),
    ):
        x, weight, b, kwargs = _make(shape, torch.float64)
        assert torch.autograd.gradcheck(
            lambda x_, w_, b_, kwargs=kwargs: ops.conv_transpose2d(x_, w_, b_, **kwargs),
            tuple(leaves_on(device, x, weight, b)),
        )


def test_opcheck(device):
    require_native(OP, device)
    x = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)
    weight = torch.randn(4, 3, 4, 4, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    args = ([2, 2], [1, 0], [1, 0], 2, [1, 1], [1, 2, 7, 9])
    torch.library.opcheck(torch.ops.fcnfast.conv_transpose2d.default, (x, weight, b) + args)
    torch.library.opcheck(torch.ops.fcnfast.conv_transpose2d.default, (x, weight, None) + args)
    # groups 1, no padding, crop (1, 1, 8, 9) (formerly test_cuda.test_opcheck_cuda)
    torch.library.opcheck(
        torch.ops.fcnfast.conv_transpose2d.default,
        (x, weight, None, [2, 2], [0, 0], [0, 0], 1, [1, 1], [1, 1, 8, 9]),
    )
    grad = torch.randn(2, 6, 7, 9, device=device)
    torch.library.opcheck(
        torch.ops.fcnfast.conv_transpose2d_backward.default,
        (grad, x.detach(), weight.detach()) + args + ([True, True, True],),
    )
    torch.library.opcheck(
        torch.ops.fcnfast.conv_transpose2d_backward.default,
        (grad, x.detach(), weight.detach()) + args + ([False, True, False],),
    )


def test_compile_fullgraph():
    require_native(OP)
    x, weight, b = torch.randn(1, 3, 5, 5), torch.randn(3, 2, 4, 4), torch.randn(2)
    fn = torch.compile(
        lambda x_, w_, b_: fcnfast.conv_transpose2d(x_, w_, b_, 2, crop=(1, 1, 8, 8)),
        fullgraph=True,
    )
    torch.testing.assert_close(
        fn(x, weight, b), reference.conv_transpose2d(x, weight, b, 2, crop=(1, 1, 8, 8))
    )


@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[10]])
def test_backward_is_deterministic(shape, path):
    require_native(OP, variant_device(path))
    x, weight, b, kwargs = _make(shape)
    x, weight, b = leaves_on(variant_device(path), x, weight, b)
    grads = []
    for _ in range(2):
        out = ops.conv_transpose2d(x, weight, b, **kwargs)
        grads.append(torch.autograd.grad(out, (x, weight, b), torch.ones_like(out)))
    assert all(torch.equal(a, c) for a, c in zip(*grads))


globals().update(oracle_tests(OP))  # ORACLE_CASES on every device (formerly test_cuda.py)


def _native_call(
    x, weight, bias, stride=1, padding=0, output_padding=0, groups=1, dilation=1, crop=(0, 0, 1, 1)
):
    """torch.ops.fcnfast.conv_transpose2d with no Python-side checks."""

    def two(v):
        return list(v) if isinstance(v, tuple) else [v, v]

    return torch.ops.fcnfast.conv_transpose2d(
        x,
        weight,
        bias,
        two(stride),
        two(padding),
        two(output_padding),
        groups,
        two(dilation),
        list(crop),
    )


ERRORS = [
    (dict(x=torch.randn(6, 6)), "x must be a 4-D"),
    (dict(x=torch.randint(0, 3, (1, 4, 6, 6))), "x must be a floating"),
    (dict(weight=torch.randn(4, 2, 3, 3, dtype=torch.float64)), "dtype"),
    (dict(weight=torch.randn(4, 2, 3)), "weight must be a 4-D"),
    (dict(weight=torch.randn(3, 2, 3, 3)), r"weight.shape\[0\] \(3\)"),
    (dict(bias=torch.randn(5)), "bias has 5 elements"),
    (dict(bias=torch.randn(2, dtype=torch.float64)), "dtype"),
    (dict(stride=0), "stride must be positive"),
    (dict(stride=(2, -1)), "stride must be positive"),
    (dict(dilation=0), "dilation must be positive"),
    (dict(padding=-1), "padding must be non-negative"),
    (dict(output_padding=2), "output_padding"),
    (dict(groups=3), r"groups \(3\) must divide"),
    (dict(groups=0), "groups must be a positive"),
    (dict(crop=(0, 0, 14, 15)), "crop .* lies outside"),
    (dict(crop=(-1, 0, 2, 2)), "crop .* lies outside"),
    (dict(padding=9), "output would be"),
]


@pytest.mark.parametrize("impl", ["ops", "reference", "native"])
@pytest.mark.parametrize("kwargs,match", ERRORS, ids=[m for _, m in ERRORS])
def test_errors(impl, kwargs, match):
    """Same rejection (ValueError naming the argument) from the Python wrapper, the
    reference and the C++ op called directly."""
    if impl == "native":
        require_native(OP)
    args = dict(
        x=torch.randn(1, 4, 6, 6),
        weight=torch.randn(4, 2, 3, 3),
        bias=torch.randn(2),
        stride=2,
        crop=(0, 0, 2, 2),
    )
    args.update(kwargs)
    fn = {
        "ops": ops.conv_transpose2d,
        "reference": reference.conv_transpose2d,
        "native": _native_call,
    }[impl]
    with pytest.raises(ValueError, match=match):
        fn(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


def test_backward_errors():
    require_native(OP)
    x, weight = torch.randn(1, 4, 6, 6), torch.randn(4, 2, 3, 3)
    args = ([2, 2], [0, 0], [0, 0], 1, [1, 1], [0, 0, 5, 5], [True, True, True])
    with pytest.raises(ValueError, match="grad has shape"):
        torch.ops.fcnfast.conv_transpose2d_backward(torch.randn(1, 2, 5, 4), x, weight, *args)
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.fcnfast.conv_transpose2d_backward(
            torch.randn(1, 2, 5, 5, dtype=torch.float64), x, weight, *args
        )


def test_overflow_32bit_refused_before_allocating():
    """A huge stride makes a ~1e12-element output: refused with a message, nothing allocated."""
    require_native(OP)
    x, weight = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 1, 1)
    with pytest.raises(ValueError, match="32-bit"):
        ops.conv_transpose2d(x, weight, stride=2**20)
    with pytest.raises(ValueError, match="32-bit"):
        _native_call(x, weight, None, stride=2**20, crop=(0, 0, 2**20 + 1, 2**20 + 1))

"""Second- and higher-order gradients of every op (issue 12).

* the second-order gradients (the gradient of a random projection of the first-order
  gradients, with respect to every input and the upstream gradient) equal the
  reference's, over the geometries of the first-order tests, fp32 and fp64, on every
  conv_transpose2d CPU path;
* fp64 ``gradgradcheck`` of every op on the native and the reference backend over the
  same geometries (full mode where it is cheap, fast mode on the large FCN shapes), and of
  the native backward ops themselves (third order);
* ``torch.func``: ``jacrev`` / ``hessian`` / ``jacfwd`` / nested ``jacrev`` / ``vmap`` of a
  small scalar function through each op equal the reference;
* a guard that fails when any registered ``fcnfast::`` op warns (PyTorch's "autograd
  kernel was not registered" warning: silently wrong or zero higher-order gradients) in
  forward, backward or double backward.
"""

import warnings

import pytest
import torch

with warnings.catch_warnings():  # forward AD loads these once, warning about torch.jit.script
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401

import test_bilinear_upsample2d as bu_tests
import test_conv_transpose2d as ct_tests
import test_score_skip as ss_tests
import test_skip_add_crop as sa_tests
import test_upsample_cross_entropy as ce_tests
from conftest import REFERENCE_ONLY, assert_close_scaled, require_native

import fcnfast
from fcnfast import ops, reference

T64 = torch.float64


# ---------------------------------------------------------------------------
# cases: (name, fn(impl) -> callable, inputs); inputs that require grad are differentiated
# ---------------------------------------------------------------------------


def _ct_case(shape, dtype=T64):
    x, weight, b, kwargs = ct_tests._make(shape, dtype, bias=shape[0] != 1)
    inputs = [x, weight] + ([b] if b is not None else [])

    def fn(impl):
        if b is None:
            return lambda x_, w_: impl.conv_transpose2d(x_, w_, None, **kwargs)
        return lambda x_, w_, b_: impl.conv_transpose2d(x_, w_, b_, **kwargs)

    return fn, inputs


def _bu_case(shape, dtype=T64):
    n, c, h, w, scale, crop = shape
    x = torch.randn(n, c, h, w, dtype=dtype, requires_grad=True)
    return (lambda impl: lambda x_: impl.bilinear_upsample2d(x_, scale, crop)), [x]


def _sa_case(shape, dtype=T64):
    n, c, h, w, sh, sw, oy, ox = shape
    coarse = torch.randn(n, c, h, w, dtype=dtype, requires_grad=True)
    skip = torch.randn(n, c, sh, sw, dtype=dtype, requires_grad=True)
    return (lambda impl: lambda a, b: impl.skip_add_crop(a, b, (oy, ox))), [coarse, skip]


def _ss_case(shape, dtype=T64):
    coarse, feature, weight, b, scale, offset = ss_tests._make(shape, dtype, bias=shape[0] != 1)
    inputs = [coarse, feature, weight] + ([b] if b is not None else [])

    def fn(impl):
        if b is None:
            return lambda c, f, w: impl.score_skip(c, f, w, None, scale, offset)
        return lambda c, f, w, b_: impl.score_skip(c, f, w, b_, scale, offset)

    return fn, inputs


def _ce_case(shape, reduction="mean", dtype=T64):
    n, c, h, w, scale, crop = shape
    x = (2 * torch.randn(n, c, h, w, dtype=dtype)).requires_grad_()
    target = ce_tests.make_target(n, c, *ce_tests.crop_size(shape))
    return (
        lambda impl: lambda x_: impl.upsample_cross_entropy(x_, target, scale, crop, 255, reduction)
    ), [x]


# the first-order tests' geometries
CASES = (
    [("conv_transpose2d", i, _ct_case, s) for i, s in enumerate(ct_tests.SHAPES)]
    + [("bilinear_upsample2d", i, _bu_case, s) for i, s in enumerate(bu_tests.SHAPES)]
    + [("skip_add_crop", i, _sa_case, s) for i, s in enumerate(sa_tests.SHAPES)]
    + [("score_skip", i, _ss_case, s) for i, s in enumerate(ss_tests.SHAPES)]
    + [("upsample_cross_entropy", i, _ce_case, s) for i, s in enumerate(ce_tests.SHAPES)]
)
CASE_IDS = ["%s-%d" % (op, i) for op, i, _, _ in CASES]


def second_order(fn, inputs, seed=0):
    """First-order gradients and the gradients of ``sum_i <r_i, grad_i>`` with respect to every
    input and the upstream gradient (``r_i`` random, drawn from ``seed``)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)

    def randn(shape, dtype):
        return torch.randn(shape, generator=gen, dtype=T64).to(dtype)

    g = randn(out.shape, out.dtype).requires_grad_()
    first = torch.autograd.grad(out, leaves, g, create_graph=True)
    assert all(f.requires_grad for f in first), "a first-order gradient has no graph"
    s = sum((f * randn(f.shape, f.dtype)).sum() for f in first)
    second = torch.autograd.grad(s, leaves + [g], allow_unused=True)
    return [f.detach() for f in first], list(second)


def check_second_order(fn, inputs, dtype):
    first_n, second_n = second_order(fn(ops), inputs)
    first_r, second_r = second_order(fn(reference), inputs)
    for i, (a, e) in enumerate(zip(first_n, first_r)):
        assert_close_scaled(a, e, dtype, what="grad %d" % i)
    nonzero = 0
    for i, (a, e) in enumerate(zip(second_n, second_r)):
        what = "second-order grad %d" % i
        if e is None or not e.any():
            assert a is None or not a.any(), "%s: the reference has none, native %s" % (what, a)
            continue
        assert a is not None, "%s missing (reference max %.3g)" % (what, e.abs().max())
        assert_close_scaled(a, e, dtype, what=what)
        nonzero += 1
    return nonzero


@pytest.mark.parametrize("dtype", [torch.float32, T64])
@pytest.mark.parametrize("op,index,make,shape", CASES, ids=CASE_IDS)
def test_second_order_matches_reference(op, index, make, shape, dtype, monkeypatch):
    require_native(op)
    paths = ["rows", "phase", "direct"] if op == "conv_transpose2d" else [None]
    for path in paths:
        if path is not None:
            monkeypatch.setenv("FCNFAST_CONV_TRANSPOSE_DIRECT", "1" if path == "direct" else "0")
            monkeypatch.setenv("FCNFAST_NO_AVX512", "1" if path == "phase" else "0")
        torch.manual_seed(index)
        fn, inputs = make(shape, dtype=dtype)
        with torch.no_grad():
            empty = fn(reference)(*inputs).numel() == 0 or min(t.numel() for t in inputs) == 0
        nonzero = check_second_order(fn, inputs, dtype)
        # a case with data must have some nonzero second-order gradient (the issue's bug: all 0)
        assert empty or nonzero > 0, "every second-order gradient is zero"


def _fast(inputs, fn):
    """Full-mode gradgradcheck costs (inputs + outputs) backward calls: fast mode on big shapes."""
    with torch.no_grad():
        out = fn(*[t.detach() for t in inputs])
    return sum(t.numel() for t in inputs) + out.numel() > 400


def _all_ignored(shape):
    return bool((ce_tests.make_target(shape[0], shape[1], *ce_tests.crop_size(shape)) == 255).all())


# conv_transpose2d on both fp64 CPU paths (the AVX-512 row kernel is fp32-only);
# upsample_cross_entropy with both reductions, except "mean" over no pixels (a NaN loss)
GG_CASES = [
    (op, i, make, shape, path)
    for op, i, make, shape in CASES
    if op != "upsample_cross_entropy"
    for path in (("phase", "direct") if op == "conv_transpose2d" else (None,))
] + [
    ("upsample_cross_entropy", i, _ce_case, s, reduction)
    for i, s in enumerate(ce_tests.SHAPES)
    for reduction in ("mean", "sum")
    if not (reduction == "mean" and _all_ignored(s))
]
GG_IDS = ["%s-%d%s" % (op, i, "-" + p if p else "") for op, i, _, _, p in GG_CASES]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("op,index,make,shape,path", GG_CASES, ids=GG_IDS)
def test_gradgradcheck(op, index, make, shape, path, backend, monkeypatch):
    """``path``: the conv_transpose2d CPU path, or the cross-entropy reduction."""
    if backend == "native":
        require_native(op)
    monkeypatch.setenv("FCNFAST_CONV_TRANSPOSE_DIRECT", "1" if path == "direct" else "0")
    torch.manual_seed(index)
    fn, inputs = make(shape, path) if op == "upsample_cross_entropy" else make(shape)
    f = fn(ops)
    with fcnfast.use_backend(backend):
        assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(f, inputs, fast_mode=_fast(inputs, f))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradgradcheck_cross_entropy_reductions(reduction, backend):
    """Both reductions, ignored pixels, scale 1..4."""
    if backend == "native":
        require_native("upsample_cross_entropy")
    for shape in [(2, 3, 3, 4, 2, (1, 1, 5, 6)), (1, 4, 2, 2, 3, None), (1, 2, 3, 3, 1, None)]:
        fn, inputs = _ce_case(shape, reduction)
        with fcnfast.use_backend(backend):
            assert torch.autograd.gradgradcheck(fn(ops), inputs)


# ---------------------------------------------------------------------------
# the backward ops' own gradients (third order of the forward ops), native only
# ---------------------------------------------------------------------------

T = torch.ops.fcnfast if not REFERENCE_ONLY else None


def _r(*shape, grad=True):
    return torch.randn(*shape, dtype=T64, requires_grad=grad)


def backward_op_cases():
    """(name, fn, inputs) for direct calls of every native backward op."""
    ct_args = (
        [2, 1],
        [1, 0],
        [1, 0],
        2,
        [1, 2],
        [1, 0, 4, 7],
    )  # stride, pad, out_pad, groups, dil, crop
    masks = [[True, True, True], [True, False, False], [False, True, True]]
    cases = []
    for mask in masks:
        cases.append(
            (
                "conv_transpose2d_backward %s" % mask,
                lambda g, x, w, mask=mask: T.conv_transpose2d_backward(g, x, w, *ct_args, mask),
                [_r(1, 4, 4, 7), _r(1, 4, 3, 4), _r(4, 2, 2, 3)],
            )
        )
        cases.append(
            (
                "score_skip_backward %s" % mask,
                lambda g, f, w, mask=mask: T.score_skip_backward(g, f, w, 0.5, [1, 2], mask),
                [_r(1, 3, 2, 3), _r(1, 4, 4, 6), _r(3, 4, 1, 1)],
            )
        )
    cases += [
        (
            "bilinear_upsample2d_backward",
            lambda g: T.bilinear_upsample2d_backward(g, 2, 3, 2, [1, 1, 4, 5]),
            [_r(2, 2, 4, 5)],
        ),
        (
            "skip_add_crop_backward",
            lambda g: T.skip_add_crop_backward(g, 5, 6, [1, 2]),
            [_r(2, 3, 3, 4)],
        ),
    ]
    for reduction in ("mean", "sum"):
        target = torch.tensor([[[0, 1, 255, 2, 1], [2, 2, 0, 255, 1], [1, 0, 0, 2, 2]]])
        cases.append(
            (
                "upsample_cross_entropy_backward %s" % reduction,
                lambda gl, x, target=target, reduction=reduction: T.upsample_cross_entropy_backward(
                    gl, x, target, 2, [1, 0, 3, 5], 255, reduction
                ),
                [_r(()), (2 * torch.randn(1, 3, 2, 2, dtype=T64)).requires_grad_()],
            )
        )
    return cases


@pytest.mark.parametrize("index", range(10))
def test_gradgradcheck_backward_ops(index):
    require_native("conv_transpose2d")
    torch.manual_seed(index)
    name, fn, inputs = backward_op_cases()[index]
    assert torch.autograd.gradcheck(fn, inputs), name
    assert torch.autograd.gradgradcheck(fn, inputs), name


def test_backward_op_cases_cover_every_backward_op():
    require_native("conv_transpose2d")
    names = {c[0].split()[0] for c in backward_op_cases()}
    assert len(backward_op_cases()) == 10
    assert names == {n for n in _registered_ops() if n.endswith("_backward")}


# ---------------------------------------------------------------------------
# the issue's example; forward-mode AD; torch.func transforms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["phase", "direct"])
def test_issue_example(path, monkeypatch):
    """The issue's reproduction: native double backward was 0.0, the reference 5.952e+04."""
    require_native("conv_transpose2d")
    monkeypatch.setenv("FCNFAST_CONV_TRANSPOSE_DIRECT", "1" if path == "direct" else "0")
    results = []
    for impl in (ops, reference):
        torch.manual_seed(0)
        x = torch.randn(1, 3, 4, 4, dtype=T64, requires_grad=True)
        w = torch.randn(3, 2, 3, 3, dtype=T64, requires_grad=True)
        y = impl.conv_transpose2d(x, w, None, 2)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), w)[0])
    assert results[1].abs().max() > 1e4
    assert_close_scaled(results[0], results[1])


# small cases for the torch.func tests: (op, fn(impl), inputs, argnums)
def func_cases():
    torch.manual_seed(0)
    ct_fn, ct_in = _ct_case((2, 2, 2, 2, 3, 3, 2, 1, 1, 1, 1, (0, 1, 3, 4)))
    ct2_fn, ct2_in = _ct_case((2, 4, 2, 2, 2, 3, (1, 2), 0, 0, 2, 2, None))
    bu_fn, bu_in = _bu_case((1, 2, 2, 3, 2, (1, 1, 4, 5)))
    sa_fn, sa_in = _sa_case((1, 2, 2, 3, 4, 5, 1, 2))
    ss_fn, ss_in = _ss_case((2, 3, 2, 2, 2, 3, 4, 1, 1, 0.5))
    ce_fn, ce_in = _ce_case((1, 3, 2, 2, 2, (1, 1, 4, 5)))
    ces_fn, ces_in = _ce_case((2, 2, 2, 2, 2, None), "sum")
    return [
        ("conv_transpose2d", ct_fn, ct_in),
        ("conv_transpose2d groups+dilation", ct2_fn, ct2_in),
        ("bilinear_upsample2d", bu_fn, bu_in),
        ("skip_add_crop", sa_fn, sa_in),
        ("score_skip", ss_fn, ss_in),
        ("upsample_cross_entropy", ce_fn, ce_in),
        ("upsample_cross_entropy sum", ces_fn, ces_in),
    ]


FUNC_IDS = [c[0] for c in func_cases()]


def _scalar(fn):
    """A nonlinear scalar of the op's output, so that the Hessian is not zero."""

    def f(*args):
        out = fn(*args)
        return out if out.dim() == 0 else (out.sin() * out).sum()

    return f


def _flat(tree):
    return torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_leaves(tree)])


@pytest.mark.parametrize(
    "transform", ["jacrev", "hessian", "jacfwd", "jacrev(jacrev)", "grad(grad)"]
)
@pytest.mark.parametrize("index", range(len(FUNC_IDS)), ids=FUNC_IDS)
def test_torch_func_matches_reference(index, transform):
    name, fn, inputs = func_cases()[index]
    require_native(name.split()[0])
    argnums = tuple(range(len(inputs)))
    args = [t.detach() for t in inputs]

    def run(impl):
        f = _scalar(fn(impl))
        if transform == "jacrev":
            return torch.func.jacrev(f, argnums=argnums)(*args)
        if transform == "hessian":
            return torch.func.hessian(f, argnums=argnums)(*args)
        if transform == "jacfwd":
            return torch.func.jacfwd(f, argnums=argnums)(*args)
        if transform == "jacrev(jacrev)":
            return torch.func.jacrev(torch.func.jacrev(f, argnums=argnums), argnums=argnums)(*args)

        # grad of a gradient norm (the gradient-penalty pattern)
        def penalty(*a):
            return _flat(torch.func.grad(f, argnums=argnums)(*a)).pow(2).sum()

        return torch.func.grad(penalty, argnums=argnums)(*args)

    got, expected = _flat(run(ops)), _flat(run(reference))
    assert expected.abs().max() > 0
    assert_close_scaled(got, expected, what=transform)


@pytest.mark.parametrize("index", range(len(FUNC_IDS)), ids=FUNC_IDS)
def test_vmap_and_forward_ad(index):
    """vmap over a batch of inputs equals a loop; forward-mode AD equals the reference jvp."""
    name, fn, inputs = func_cases()[index]
    require_native(name.split()[0])
    args = [t.detach() for t in inputs]
    f = fn(ops)
    stacked = [torch.stack([a, 2 * a + 1]) for a in args]
    got = torch.func.vmap(f)(*stacked)
    for b in range(2):
        assert_close_scaled(got[b], f(*[s[b] for s in stacked]), what="vmap entry %d" % b)
    tangents = [torch.randn_like(a) for a in args]
    out_n, jvp_n = torch.func.jvp(f, tuple(args), tuple(tangents))
    out_r, jvp_r = torch.func.jvp(fn(reference), tuple(args), tuple(tangents))
    assert_close_scaled(jvp_n, jvp_r, what="jvp")
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(a, t) for a, t in zip(args, tangents)])
        assert_close_scaled(fwAD.unpack_dual(out).tangent, jvp_r, what="forward AD")


@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
def test_cross_entropy_target_is_not_differentiable(impl):
    """target holds class indices: PyTorch refuses a gradient for it, loudly."""
    x = torch.randn(1, 3, 2, 2, dtype=T64)
    target = torch.randint(0, 3, (1, 4, 5))
    with pytest.raises(RuntimeError, match="floating point"):
        target.requires_grad_()
    f = lambda x_, t_: impl.upsample_cross_entropy(x_, t_, 2, (1, 1, 4, 5))  # noqa: E731
    with pytest.raises(RuntimeError):
        torch.func.jacrev(f, argnums=1)(x, target)
    with pytest.raises(RuntimeError):
        torch.func.grad(f, argnums=1)(x, target)


# ---------------------------------------------------------------------------
# guard: no registered op warns in forward, backward or double backward
# ---------------------------------------------------------------------------


def _registered_ops():
    return sorted(
        n.split("::", 1)[1]
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("fcnfast::")
    )


def guard_cases():
    """Direct calls of every differentiable dispatcher op (forward and backward ops)."""
    ct_args = ([2, 2], [1, 0], [1, 0], 1, [1, 1], [0, 1, 5, 6])
    target = torch.tensor(
        [[[0, 1, 255, 2, 1], [2, 2, 0, 255, 1], [1, 0, 0, 2, 2], [1, 1, 2, 0, 0]]]
    )
    return {
        "conv_transpose2d": (
            lambda x, w, b: T.conv_transpose2d(x, w, b, *ct_args),
            [_r(2, 3, 3, 4), _r(3, 2, 3, 3), _r(2)],
        ),
        "conv_transpose2d_backward": (
            lambda g, x, w: T.conv_transpose2d_backward(g, x, w, *ct_args, [True, True, True]),
            [_r(2, 2, 5, 6), _r(2, 3, 3, 4), _r(3, 2, 3, 3)],
        ),
        "bilinear_upsample2d": (
            lambda x: T.bilinear_upsample2d(x, 2, [1, 1, 4, 5]),
            [_r(1, 2, 2, 3)],
        ),
        "bilinear_upsample2d_backward": (
            lambda g: T.bilinear_upsample2d_backward(g, 2, 3, 2, [1, 1, 4, 5]),
            [_r(1, 2, 4, 5)],
        ),
        "skip_add_crop": (
            lambda c, s: T.skip_add_crop(c, s, [1, 2]),
            [_r(1, 2, 3, 3), _r(1, 2, 5, 6)],
        ),
        "skip_add_crop_backward": (
            lambda g: T.skip_add_crop_backward(g, 5, 6, [1, 2]),
            [_r(1, 2, 3, 3)],
        ),
        "score_skip": (
            lambda c, f, w, b: T.score_skip(c, f, w, b, 0.5, [1, 0]),
            [_r(1, 2, 2, 3), _r(1, 3, 4, 3), _r(2, 3, 1, 1), _r(2)],
        ),
        "score_skip_backward": (
            lambda g, f, w: T.score_skip_backward(g, f, w, 0.5, [1, 0], [True, True, True]),
            [_r(1, 2, 2, 3), _r(1, 3, 4, 3), _r(2, 3, 1, 1)],
        ),
        "upsample_cross_entropy": (
            lambda x: T.upsample_cross_entropy(x, target, 2, [1, 0, 4, 5], 255, "mean"),
            [_r(1, 3, 2, 2)],
        ),
        "upsample_cross_entropy_backward": (
            lambda gl, x: T.upsample_cross_entropy_backward(
                gl, x, target, 2, [1, 0, 4, 5], 255, "sum"
            ),
            [_r(()), _r(1, 3, 2, 2)],
        ),
    }


NO_GRADIENT_OUTPUT = ("upsample_argmax",)  # int64 labels
INFERENCE_ONLY = ("dense_crf", "permutohedral_filter")  # raise when a gradient is asked for


def _three_orders(fn, inputs):
    """forward, backward (create_graph) and double backward; returns the double-backward grads."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    outs = [o for o in outs if o.numel() > 0]
    gs = [torch.randn_like(o).requires_grad_() for o in outs]
    first = torch.autograd.grad(outs, inputs, gs, create_graph=True, allow_unused=True)
    s = sum((f * torch.randn_like(f)).sum() for f in first if f is not None)
    return torch.autograd.grad(s, list(inputs) + gs, allow_unused=True)


def test_guard_table_covers_every_registered_op():
    require_native("conv_transpose2d")
    assert set(guard_cases()) == set(GUARD_OPS)
    assert set(_registered_ops()) == set(GUARD_OPS) | set(NO_GRADIENT_OUTPUT) | set(INFERENCE_ONLY)


GUARD_OPS = [
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "bilinear_upsample2d",
    "bilinear_upsample2d_backward",
    "skip_add_crop",
    "skip_add_crop_backward",
    "score_skip",
    "score_skip_backward",
    "upsample_cross_entropy",
    "upsample_cross_entropy_backward",
]


@pytest.mark.parametrize("name", GUARD_OPS)
def test_guard_no_autograd_warning(name):
    """Warnings are errors: the 'autograd kernel was not registered' warning fails this."""
    require_native(name)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fcnfast::" + name, "Autograd"), name
    fn, inputs = guard_cases()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _three_orders(fn, inputs)
    assert any(s is not None and s.abs().max() > 0 for s in second), "no second-order gradient"


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("index", range(len(FUNC_IDS)), ids=FUNC_IDS)
def test_guard_public_ops(index, backend):
    """The public ops, forward / backward / double backward with warnings as errors."""
    name, fn, inputs = func_cases()[index]
    if backend == "native":
        require_native(name.split()[0])
    with fcnfast.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _three_orders(fn(ops), inputs)
    assert any(s is not None and s.abs().max() > 0 for s in second)


def test_guard_argmax_has_no_gradient():
    require_native("upsample_argmax")
    x = _r(1, 3, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = T.upsample_argmax(x, 2, [0, 0, 6, 6])
        public = ops.upsample_argmax(x, 2)
    assert labels.dtype == public.dtype == torch.int64
    assert not labels.requires_grad and not public.requires_grad


@pytest.mark.parametrize("name", INFERENCE_ONLY)
def test_guard_inference_only_ops_refuse_gradients(name):
    require_native(name)
    if name == "dense_crf":
        image = torch.rand(1, 3, 4, 4) * 255
        args = lambda t: (t, image, 2, 3.0, 3.0, 80.0, 13.0, 10.0)  # noqa: E731
        logits = torch.randn(1, 3, 4, 4)
    else:
        features = torch.rand(6, 2)
        args = lambda t: (features, t, False)  # noqa: E731
        logits = torch.randn(6, 3)
    fn = getattr(T, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="not differentiable"):
            fn(*args(logits.clone().requires_grad_()))
        with torch.no_grad():
            out = fn(*args(logits.clone().requires_grad_()))
        assert torch.equal(out, fn(*args(logits)))

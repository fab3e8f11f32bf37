"""Property-based fuzzing: every op and every gradient, native vs ``fcnfast.reference``.

Hypothesis draws shapes (batch 0..3, 0-size and 1-pixel crops), strides,
kernel sizes, paddings, dilations, groups, output_padding, offsets, dtypes
(fp32, fp64, bf16 against the exact fp64 result) and memory layouts
(contiguous, channels_last, strided slices, transposed, stride-0 expanded)
and checks ``fcnfast.ops`` against the reference with the tolerances of
``conftest.py``.

Profiles (hypothesis settings profiles, selected by ``FCNFAST_FUZZ``):

* ``fcnfast-quick`` (default): 40 examples per op, derandomized, so every
  run tests the same cases.
* ``fcnfast-long`` (``FCNFAST_FUZZ=long``): 10,000 random examples per op
  (``FCNFAST_FUZZ_EXAMPLES`` to change), in chunks of 1,000 with seeds
  ``FCNFAST_FUZZ_SEED + i``; a failure prints the case, a ``@reproduce_failure``
  blob and the seed that replays the run.

An op without a native CPU kernel is skipped (it would compare the reference
with itself); the skip reason names it.
"""

import os
import random

import pytest
import torch
from conftest import REFERENCE_ONLY
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from hypothesis import strategies as st
from op_cases import Case, check_case, layout_view

from fcnfast import _backend
from fcnfast import _geometry as geo

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
LONG = os.environ.get("FCNFAST_FUZZ", "").lower() == "long"
LONG_EXAMPLES = int(os.environ.get("FCNFAST_FUZZ_EXAMPLES", "10000"))
# One hypothesis run slows down sharply past ~1,000 examples (its search for novel inputs
# grows), so the long profile runs chunks of CHUNK examples, each with its own seed.
CHUNK = 1000
settings.register_profile(
    "fcnfast-quick",
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_HEALTH,
)
settings.register_profile(
    "fcnfast-long",
    max_examples=min(CHUNK, LONG_EXAMPLES),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=_HEALTH,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)
PROFILE = "fcnfast-long" if LONG else "fcnfast-quick"
FUZZ = settings.get_profile(PROFILE)
# long runs: chunk i uses seed SEED + i (FCNFAST_FUZZ_SEED replays a run; printed on failure)
SEED = int(os.environ.get("FCNFAST_FUZZ_SEED", str(random.SystemRandom().randrange(2**32))))

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def require_kernel(op):
    if REFERENCE_ONLY:
        pytest.skip("FCNFAST_BACKEND=reference")
    if not _backend.has_kernel(op, "cpu"):
        pytest.skip(
            "no native CPU kernel for fcnfast::%s in this build: nothing to fuzz against "
            "the reference" % op
        )


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------


@st.composite
def tensors(draw, shape, layouts=("contiguous", "channels_last", "sliced", "permuted", "expanded")):
    """A leaf tensor spec: ``(base_shape, view)``; values are filled in later from the case seed."""
    layout = draw(st.sampled_from(layouts))
    expand = tuple(draw(st.booleans()) for _ in shape) if layout == "expanded" else ()
    return layout_view(shape, layout, expand)


def fill(specs, dtype, seed, integer_values=False):
    """Materialise leaves for ``specs`` (``None`` stays None) from one seed."""
    g = torch.Generator().manual_seed(seed)
    leaves, views = [], []
    for spec in specs:
        if spec is None:
            leaves.append(None)
            views.append(None)
            continue
        base_shape, view = spec
        if integer_values:  # small integers: upsampled scores are exact, ties are real
            t = torch.randint(-2, 3, base_shape, generator=g).to(dtype)
        else:
            t = torch.randn(base_shape, generator=g, dtype=torch.float64).to(dtype)
        leaves.append(t)
        views.append(view)
    return tuple(leaves), tuple(views)


@st.composite
def crops(draw, full_h, full_w):
    """``None``, any window, a 1-pixel window or an empty window of a full_h x full_w output."""
    kind = draw(st.sampled_from(("none", "any", "pixel", "empty")))
    if kind == "none":
        return None
    if kind == "pixel":
        return (draw(st.integers(0, full_h - 1)), draw(st.integers(0, full_w - 1)), 1, 1)
    top, left = draw(st.integers(0, full_h)), draw(st.integers(0, full_w))
    h, w = draw(st.integers(0, full_h - top)), draw(st.integers(0, full_w - left))
    if kind == "empty":
        if draw(st.booleans()):
            h = 0
        else:
            w = 0
    return (top, left, h, w)


seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)
batch = st.integers(0, 3)


@st.composite
def conv_transpose2d_cases(draw):
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, 3))
    c_out_per_group = draw(st.integers(1, 3))
    n, h, w = draw(batch), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    padding = []
    for size, k, s, d, op in zip((h, w), kernel, stride, dilation, output_padding):
        longest = geo.conv_transpose_out_size(size, k, s, 0, op, d)
        padding.append(draw(st.integers(0, min(4, (longest - 1) // 2))))
    full = [
        geo.conv_transpose_out_size(size, k, s, p, op, d)
        for size, k, s, p, op, d in zip((h, w), kernel, stride, padding, output_padding, dilation)
    ]
    crop = draw(crops(*full))
    with_bias = draw(st.booleans())
    specs = [
        draw(tensors((n, c_in, h, w))),
        draw(tensors((c_in, c_out_per_group) + kernel)),
        draw(tensors((c_out_per_group * groups,))) if with_bias else None,
    ]
    dtype, seed = draw(dtypes), draw(seeds)
    leaves, views = fill(specs, dtype, seed)
    # int or pair arguments, both spellings
    pairs = {
        name: (v[0] if v[0] == v[1] and draw(st.booleans()) else tuple(v))
        for name, v in (
            ("stride", stride),
            ("padding", tuple(padding)),
            ("output_padding", output_padding),
            ("dilation", dilation),
        )
    }
    return Case(
        "conv_transpose2d", leaves, dict(groups=groups, crop=crop, **pairs), views, seed=seed
    )


SCALES = (1, 2, 3, 4, 5, 8, 16, 32)


@st.composite
def upsample_geometry(draw, min_channels=0):
    scale = draw(st.sampled_from(SCALES))
    top_size = 6 if scale <= 4 else 2  # keep the full output small
    n, c = draw(batch), draw(st.integers(min_channels, 4))
    h, w = draw(st.integers(1, top_size)), draw(st.integers(1, top_size))
    crop = draw(crops((h + 1) * scale, (w + 1) * scale))
    return n, c, h, w, scale, crop


@st.composite
def bilinear_upsample2d_cases(draw):
    n, c, h, w, scale, crop = draw(upsample_geometry())
    dtype, seed = draw(dtypes), draw(seeds)
    leaves, views = fill([draw(tensors((n, c, h, w)))], dtype, seed)
    return Case("bilinear_upsample2d", leaves, dict(scale=scale, crop=crop), views, seed=seed)


@st.composite
def upsample_argmax_cases(draw):
    n, c, h, w, scale, crop = draw(upsample_geometry(min_channels=1))
    dtype, seed = draw(dtypes), draw(seeds)
    integer_values = draw(st.booleans())
    leaves, views = fill([draw(tensors((n, c, h, w)))], dtype, seed, integer_values)
    # small integers times the dyadic weights of a power-of-two scale are exact
    # in fp32/fp64: the reference's ties are real and the lowest class must win
    exact = integer_values and scale & (scale - 1) == 0 and dtype != torch.bfloat16
    return Case(
        "upsample_argmax",
        leaves,
        dict(scale=scale, crop=crop),
        views,
        seed=seed,
        exact_labels=exact,
    )


@st.composite
def upsample_cross_entropy_cases(draw):
    n, c, h, w, scale, crop = draw(upsample_geometry(min_channels=1))
    top, left, ch, cw = geo.resolve_crop(crop, (h + 1) * scale, (w + 1) * scale)
    ignore_index = draw(st.sampled_from((255, -100, 0, c - 1)))
    reduction = draw(st.sampled_from(("mean", "sum")))
    dtype, seed = draw(dtypes), draw(seeds)
    leaves, views = fill([draw(tensors((n, c, h, w)))], dtype, seed)
    target_shape, target_view = draw(
        tensors((n, ch, cw), layouts=("contiguous", "sliced", "expanded"))
    )
    g = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(0, c, target_shape, generator=g)
    ignored = torch.rand(target_shape, generator=g) < draw(st.sampled_from((0.0, 0.3, 1.0)))
    target[ignored] = ignore_index
    return Case(
        "upsample_cross_entropy",
        leaves + (target,),
        dict(scale=scale, crop=crop, ignore_index=ignore_index, reduction=reduction),
        views + (target_view,),
        seed=seed,
    )


@st.composite
def window(draw, n, c):
    """coarse (n, c, h, w) and a larger map (fh, fw) with an offset that fits."""
    h, w = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    fh, fw = h + draw(st.integers(0, 5)), w + draw(st.integers(0, 5))
    assume(fh > 0 and fw > 0)
    offset = (draw(st.integers(0, fh - h)), draw(st.integers(0, fw - w)))
    return (n, c, h, w), (fh, fw), offset


@st.composite
def skip_add_crop_cases(draw):
    n, c = draw(batch), draw(st.integers(0, 4))
    coarse, (fh, fw), offset = draw(window(n, c))
    dtype, seed = draw(dtypes), draw(seeds)
    leaves, views = fill([draw(tensors(coarse)), draw(tensors((n, c, fh, fw)))], dtype, seed)
    offset = offset if offset[0] != offset[1] or draw(st.booleans()) else offset[0]
    return Case("skip_add_crop", leaves, dict(offset=offset), views, seed=seed)


@st.composite
def score_skip_cases(draw):
    n, k, c = draw(batch), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    coarse, (fh, fw), offset = draw(window(n, k))
    scale = draw(
        st.one_of(
            st.sampled_from((1.0, 0.01, 1e-4)),
            st.floats(-4, 4, allow_nan=False, allow_infinity=False),
        )
    )
    with_bias = draw(st.booleans())
    specs = [
        draw(tensors(coarse)),
        draw(tensors((n, c, fh, fw))),
        draw(tensors((k, c, 1, 1))),
        draw(tensors((k,))) if with_bias else None,
    ]
    dtype, seed = draw(dtypes), draw(seeds)
    leaves, views = fill(specs, dtype, seed)
    return Case("score_skip", leaves, dict(scale=scale, offset=offset), views, seed=seed)


# ---------------------------------------------------------------------------
# one property per op
# ---------------------------------------------------------------------------

STRATEGIES = {
    "conv_transpose2d": conv_transpose2d_cases(),
    "bilinear_upsample2d": bilinear_upsample2d_cases(),
    "skip_add_crop": skip_add_crop_cases(),
    "score_skip": score_skip_cases(),
    "upsample_argmax": upsample_argmax_cases(),
    "upsample_cross_entropy": upsample_cross_entropy_cases(),
}


def _fuzz_test(op):
    @FUZZ
    @given(case=STRATEGIES[op])
    def run(case):
        assert check_case(case) == "native", case.describe()

    def test(record_property):
        require_kernel(op)
        record_property("fuzz_profile", PROFILE)
        if not LONG:
            run()
            return
        chunks = -(-LONG_EXAMPLES // CHUNK)
        record_property("fuzz_examples", chunks * FUZZ.max_examples)
        for chunk in range(chunks):
            try:
                seed(SEED + chunk)(run)()
            except BaseException as exc:
                exc.add_note(
                    "long fuzz chunk %d of %d: replay with FCNFAST_FUZZ_SEED=%d"
                    % (chunk, chunks, SEED)
                )
                raise

    test.__name__ = "test_fuzz_" + op
    return test


for _op in STRATEGIES:
    globals()["test_fuzz_" + _op] = _fuzz_test(_op)

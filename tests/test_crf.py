"""fcnfast.crf.dense_crf: native permutohedral mean field vs the brute-force reference.

Tolerances (the appearance term of the native kernel is the permutohedral lattice, an
approximation of the Gaussian; everything else is exact up to float32 and the 4-std truncation of
the spatial blur):
  * spatial term only: max |Q_native - Q_reference| <= 2e-4 (truncation exp(-8) + float32);
  * one bilateral message (recovered from Q): relative L2 error <= 0.25, max abs <= 0.03
    (messages of the normalised kernel lie in [0, 1]);
  * full CRF, 5 iterations, on well-posed scenes: labels agree on >= 99% of pixels and
    mean |dQ| <= 0.02 (mean field is a nonlinear iteration; near-ties may flip).
"""

import pytest
import torch
from conftest import require_native

from fcnfast import _backend, crf, use_backend

SPATIAL_TOL = 2e-4


def blocks_image(h, w, bands=3, noise=5.0, seed=0, regions=3):
    """A piecewise-constant image (three rectangles) plus Gaussian noise, and its labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(h, w, dtype=torch.long)
    labels[:, w // 2 :] = 1
    labels[h // 2 :, w // 3 : 2 * w // 3] = 2 % regions
    colors = torch.tensor([[30.0], [200.0], [110.0]]) + torch.rand(3, bands, generator=g) * 40
    image = colors[labels].permute(2, 0, 1) + torch.randn(bands, h, w, generator=g) * noise
    return image.clamp(0, 255), labels


def random_logits(c, h, w, seed=0, scale=1.5, n=None):
    g = torch.Generator().manual_seed(seed + 100)
    shape = (c, h, w) if n is None else (n, c, h, w)
    return torch.randn(shape, generator=g) * scale


def centred_message(q, logits, weight):
    """With iterations=1, log Q1 = logits + weight * message - logsumexp: recover the message."""
    m = (q.double().log() - logits.double()) / weight
    return m - m.mean(dim=-3, keepdim=True)


def free_energy(
    q,
    logits,
    image,
    spatial_std=3.0,
    spatial_weight=3.0,
    bilateral_spatial_std=80.0,
    bilateral_color_std=13.0,
    bilateral_weight=10.0,
):
    """KL(Q || P) up to log Z for one image: E_Q[E(x)] - H(Q), exact kernels, float64."""
    c, h, w = logits.shape
    smooth, bilateral = crf.crf_kernels(
        image.double(), spatial_std, bilateral_spatial_std, bilateral_color_std, torch.float64
    )
    pairwise = spatial_weight * smooth + bilateral_weight * bilateral
    q = q.double().reshape(c, h * w)
    z = logits.double().reshape(c, h * w)
    unary = -(q * z).sum()
    neg_entropy = (q * q.clamp_min(1e-300).log()).sum()
    potts = 0.5 * (pairwise.sum() - ((q @ pairwise) * q).sum())  # sum_{i<j} A_ij P(x_i != x_j)
    return (unary + potts + neg_entropy).item()


# ---------------------------------------------------------------------------
# native vs reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 12, 16), (5, 20, 20), (4, 7, 9), (2, 1, 13)])
@pytest.mark.parametrize("spatial_std", [1.0, 3.0])
def test_spatial_term_matches_reference_tightly(shape, spatial_std):
    require_native("dense_crf")
    c, h, w = shape
    image, _ = blocks_image(h, w)
    logits = random_logits(c, h, w)
    kw = dict(iterations=4, spatial_std=spatial_std, spatial_weight=3.0, bilateral_weight=0.0)
    native = crf.dense_crf(logits, image, **kw)
    ref = crf.dense_crf_reference(logits.double(), image, **kw)
    assert native.dtype == torch.float32 and native.shape == logits.shape
    err = (native.double() - ref).abs().max().item()
    assert err <= SPATIAL_TOL, err


@pytest.mark.parametrize("shape", [(3, 9, 70), (21, 6, 40), (9, 5, 64), (21, 7, 9), (17, 3, 5)])
def test_spatial_term_wide_rows_match_reference(shape):
    """Rows of more than one 512-float strip (W * padded labels > 512): the vertical pass of the
    separable blur runs strip by strip, the last strip partial; and label / pixel counts that
    leave partial 8 x 8 tiles in the transposes to and from the padded channels-last layout."""
    require_native("dense_crf")
    c, h, w = shape
    image, _ = blocks_image(h, w)
    logits = random_logits(c, h, w, seed=7)
    kw = dict(iterations=3, spatial_std=3.0, spatial_weight=3.0, bilateral_weight=0.0)
    native = crf.dense_crf(logits, image, **kw)
    ref = crf.dense_crf_reference(logits.double(), image, **kw)
    err = (native.double() - ref).abs().max().item()
    assert err <= SPATIAL_TOL, err


@pytest.mark.parametrize(
    "case",
    [
        dict(h=12, w=16, c=40, bands=3),  # labels in blocks of 4 + 1 vectors
        dict(h=12, w=16, c=3, bands=3),
        dict(h=20, w=20, c=5, bands=3),
        dict(h=20, w=20, c=4, bands=1),
        dict(h=16, w=20, c=4, bands=3, bilateral_spatial_std=5.0),
        dict(h=20, w=20, c=4, bands=20),  # hyperspectral: PCA features
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_bilateral_message_matches_reference(case, seed):
    require_native("dense_crf")
    case = dict(case)
    h, w, c, bands = (case.pop(k) for k in ("h", "w", "c", "bands"))
    image, _ = blocks_image(h, w, bands, seed=seed)
    logits = random_logits(c, h, w, seed)
    kw = dict(case, iterations=1, spatial_weight=0.0, bilateral_weight=1.0)
    native = centred_message(crf.dense_crf(logits, image, **kw), logits, 1.0)
    ref = centred_message(crf.dense_crf_reference(logits.double(), image, **kw), logits, 1.0)
    assert ref.abs().max() > 0.02  # the message is not trivially zero
    rel = ((native - ref).norm() / ref.norm()).item()
    assert rel <= 0.25, rel
    assert (native - ref).abs().max().item() <= 0.03


@pytest.mark.parametrize("shape", [(3, 12, 16), (5, 20, 20), (4, 24, 18)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_crf_matches_reference(shape, seed):
    require_native("dense_crf")
    c, h, w = shape
    image, labels = blocks_image(h, w, seed=seed)
    # unaries that point to the region labels, plus noise: a well-posed problem
    logits = random_logits(c, h, w, seed, scale=1.0)
    logits += 1.5 * torch.nn.functional.one_hot(labels % c, c).permute(2, 0, 1)
    native = crf.dense_crf(logits, image)
    ref = crf.dense_crf_reference(logits.double(), image)
    agree = (native.argmax(0) == ref.argmax(0)).double().mean().item()
    assert agree >= 0.99, agree
    assert (native.double() - ref).abs().mean().item() <= 0.02


def test_batch_equals_per_image_and_uint8_equals_float():
    require_native("dense_crf")
    images = torch.stack([blocks_image(10, 14, seed=s)[0] for s in range(3)]).round()
    logits = random_logits(4, 10, 14, n=3)
    batched = crf.dense_crf(logits, images.to(torch.uint8))
    for b in range(3):
        single = crf.dense_crf(logits[b], images[b])
        torch.testing.assert_close(batched[b], single, rtol=0, atol=0)


@pytest.mark.parametrize("dim", [3, 5, 9])  # 9: the untabulated path (d + 1 > 8)
def test_lattice_self_weight_is_its_diagonal(dim):
    """permutohedral_filter(exclude_self=True) == L - diag(L), L recovered column by column."""
    require_native("permutohedral_filter")
    g = torch.Generator().manual_seed(0)
    points = 300
    features = torch.rand(points, dim, generator=g) * 3
    eye = torch.eye(points)
    full = torch.ops.fcnfast.permutohedral_filter(features, eye, False).double()
    excluded = torch.ops.fcnfast.permutohedral_filter(features, eye, True).double()
    assert torch.diagonal(full).min() > 0.1
    torch.testing.assert_close(excluded, full - torch.diag(torch.diagonal(full)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 8, 21])
def test_lattice_scatter_splat_equals_gather(channels):
    """Many points per vertex switch the splat from the CSR gather to the chunked scatter: the
    same cloud repeated R times (one lattice, every vertex weight R times) must give R times the
    filter of the cloud itself (which, with few points per vertex, uses the gather)."""
    require_native("permutohedral_filter")
    g = torch.Generator().manual_seed(channels)
    points, repeat = 100, 30  # 2-d cloud: at most 3 vertices per point, so 8 (m + 1) <= 3000
    features = torch.rand(points, 2, generator=g) * 2
    values = torch.randn(points, channels, generator=g)
    single = torch.ops.fcnfast.permutohedral_filter(features, values, False).double()
    repeated = torch.ops.fcnfast.permutohedral_filter(
        features.repeat(repeat, 1), values.repeat(repeat, 1), False
    ).double()
    expected = repeat * single.repeat(repeat, 1)
    scale = expected.abs().max().item()
    assert scale > 1.0
    # float32 sums of ~10^3 terms: 1e-5 of the output scale (a wrong weight or vertex is O(1))
    torch.testing.assert_close(repeated, expected, rtol=0, atol=1e-5 * scale)


def test_agrees_with_pydensecrf():
    """Same unaries, image and kernels as pydensecrf (Kraehenbuehl's C++): labels agree on
    >= 99.9% of pixels. pydensecrf normalises with the self term included (i == j), fcnfast
    without; the difference only flips near-ties."""
    require_native("dense_crf")
    dcrf = pytest.importorskip(
        "pydensecrf.densecrf",
        reason="pydensecrf not installed (bench-only dependency: pip install pydensecrf2)",
    )
    import numpy as np

    h, w, c = 120, 160, 6
    image, labels = blocks_image(h, w, noise=8.0, seed=11)
    image = image.round().to(torch.uint8)
    logits = random_logits(c, h, w, seed=11)
    logits += 2.0 * torch.nn.functional.one_hot(labels, c).permute(2, 0, 1)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray((-logits.log_softmax(0)).reshape(c, -1).numpy()))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(
        sxy=80, srgb=13, compat=10, rgbim=np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    )
    theirs = torch.from_numpy(np.array(d.inference(5))).reshape(c, h, w)
    ours = crf.dense_crf(logits, image)
    agree = (ours.argmax(0) == theirs.argmax(0)).double().mean().item()
    assert agree >= 0.999, agree
    assert (ours.argmax(0) != logits.argmax(0)).any()  # the CRF changed something


@pytest.mark.parametrize("dim", [2, 3, 5])
def test_lattice_approximates_gaussian(dim):
    """On a dense point cloud, L / c ~ exp(-|f_i - f_j|^2 / 2) (off-diagonal) within 25% (L2)."""
    require_native("permutohedral_filter")
    g = torch.Generator().manual_seed(dim)
    points = 500
    features = torch.rand(points, dim, generator=g) * 3
    lattice = torch.ops.fcnfast.permutohedral_filter(features, torch.eye(points), True).double()
    exact = torch.exp(-0.5 * torch.cdist(features.double(), features.double()) ** 2)
    exact.fill_diagonal_(0)
    scale = (lattice * exact).sum() / (exact * exact).sum()
    rel = ((lattice / scale - exact).norm() / exact.norm()).item()
    assert rel <= 0.25, rel


# ---------------------------------------------------------------------------
# properties of the model (reference and native)
# ---------------------------------------------------------------------------


def _implementations():
    impls = [("reference", lambda *a, **k: crf.dense_crf_reference(*a, **k))]
    if _backend.has_kernel("dense_crf", "cpu"):
        impls.append(("native", lambda *a, **k: crf.dense_crf(*a, backend="native", **k)))
    return impls


def test_iterations_zero_is_softmax():
    image, _ = blocks_image(6, 7)
    logits = random_logits(3, 6, 7)
    for name, fn in _implementations():
        torch.testing.assert_close(
            fn(logits, image, iterations=0), logits.softmax(0), rtol=0, atol=1e-6, msg=name
        )


@pytest.mark.parametrize("bilateral_weight", [0.0, 10.0])
def test_free_energy_decreases(bilateral_weight):
    image, labels = blocks_image(14, 18, noise=8.0, seed=3)
    logits = random_logits(4, 14, 18, seed=3, scale=2.0)
    kw = dict(bilateral_weight=bilateral_weight)
    energies = [
        free_energy(
            crf.dense_crf_reference(logits.double(), image, iterations=t, **kw), logits, image, **kw
        )
        for t in range(8)
    ]
    assert energies[-1] < energies[0] - 0.5, energies
    for before, after in zip(energies, energies[1:]):
        assert after <= before + 1e-6 * abs(before), energies
    if bilateral_weight == 0.0 and _backend.has_kernel("dense_crf", "cpu"):
        native = [
            free_energy(crf.dense_crf(logits, image, iterations=t, **kw), logits, image, **kw)
            for t in range(8)
        ]
        for before, after in zip(native, native[1:]):
            assert after <= before + 1e-4 * abs(before), native


def test_constant_image_is_pure_spatial_smoothing():
    """With a constant image the appearance kernel is a spatial Gaussian of std theta_alpha."""
    h, w, c = 10, 12, 3
    image = torch.full((3, h, w), 77.0)
    logits = random_logits(c, h, w)
    kw = dict(
        iterations=3,
        spatial_std=2.0,
        spatial_weight=3.0,
        bilateral_spatial_std=4.0,
        bilateral_weight=5.0,
    )
    # independent expression: two normalised Gaussians on pixel positions only
    pos = crf.pixel_positions(h, w)
    pairwise = 3.0 * crf.normalised_kernel(pos / 2.0) + 5.0 * crf.normalised_kernel(pos / 4.0)
    z = logits.double().reshape(c, -1)
    q = z.softmax(0)
    for _ in range(3):
        q = (z + q @ pairwise).softmax(0)
    expected = q.reshape(c, h, w)
    ref = crf.dense_crf_reference(logits.double(), image.double(), **kw)
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-12)
    if _backend.has_kernel("dense_crf", "cpu"):
        native = crf.dense_crf(logits, image, **kw)
        assert (native.double() - expected).abs().max().item() <= 0.05
        assert (native.argmax(0) == expected.argmax(0)).double().mean().item() >= 0.95


def test_constant_label_stays():
    image, _ = blocks_image(16, 16, noise=10.0)
    logits = random_logits(5, 16, 16, scale=0.5)
    logits[2] += 2.0
    for name, fn in _implementations():
        labels = fn(logits, image).argmax(0)
        assert (labels == 2).all(), name


@pytest.mark.parametrize("size", [(24, 30), (64, 64)])
def test_noisy_labels_get_cleaned(size):
    h, w = size
    image, labels = blocks_image(h, w, noise=6.0, seed=5)
    g = torch.Generator().manual_seed(5)
    noisy = torch.where(
        torch.rand(h, w, generator=g) < 0.3, torch.randint(0, 3, (h, w), generator=g), labels
    )
    logits = 1.0 * torch.nn.functional.one_hot(noisy, 3).permute(2, 0, 1).float()
    before = (logits.argmax(0) == labels).double().mean().item()
    for name, _ in _implementations():
        if name == "reference" and h * w > 1000:
            continue
        after = (crf.refine_labels(logits, image, backend=name) == labels).double().mean().item()
        assert before < 0.85 and after >= 0.97, (name, before, after)


def test_hyperspectral_features():
    h, w, bands = 12, 14, 20
    g = torch.Generator().manual_seed(0)
    # bands are a rank-1 mix of one latent map: the first component is that map (up to sign)
    latent = torch.rand(h, w, generator=g)
    mix = torch.rand(bands, generator=g) + 0.5
    cube = (mix[:, None, None] * latent * 1000.0)[None]
    feats = crf.appearance_features(cube)
    assert feats.shape == (1, 3, h, w)
    first = feats[0, 0]
    assert abs((first.max() - first.min()).item() - 255.0) < 1e-3
    corr = torch.corrcoef(torch.stack([first.flatten(), latent.flatten()]))[0, 1].abs().item()
    assert corr > 0.9999
    assert feats[0, 1:].abs().max().item() < 1e-3
    assert crf.appearance_features(cube, pca_components=5).shape == (1, 5, h, w)
    image, _ = blocks_image(h, w, bands)
    logits = random_logits(4, h, w)
    for name, fn in _implementations():
        q = fn(logits, image)
        assert q.shape == logits.shape and torch.isfinite(q).all(), name
        torch.testing.assert_close(q.sum(0), torch.ones(h, w), msg=name)


def test_refine_labels():
    image, _ = blocks_image(8, 9)
    logits = random_logits(3, 8, 9, n=2)
    labels = crf.refine_labels(logits, torch.stack([image, image]), iterations=2)
    assert labels.shape == (2, 8, 9) and labels.dtype == torch.int64
    expected = crf.dense_crf(logits, torch.stack([image, image]), iterations=2).argmax(1)
    assert torch.equal(labels, expected)


def test_empty_batch_and_dtypes():
    image = torch.zeros(0, 3, 5, 6)
    assert crf.dense_crf(torch.zeros(0, 2, 5, 6), image).shape == (0, 2, 5, 6)
    img, _ = blocks_image(5, 6)
    logits = random_logits(2, 5, 6)
    q64 = crf.dense_crf(logits.double(), img)
    assert q64.dtype == torch.float64
    q16 = crf.dense_crf(logits.half(), img)
    assert q16.dtype == torch.float16
    q16 = crf.dense_crf_reference(logits.half(), img)
    assert q16.dtype == torch.float16


def test_deterministic_and_thread_independent():
    require_native("dense_crf")
    image, _ = blocks_image(40, 50, noise=10.0)
    logits = random_logits(6, 40, 50)
    first = crf.dense_crf(logits, image)
    assert torch.equal(first, crf.dense_crf(logits, image))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = crf.dense_crf(logits, image)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)


def _cpu_has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            return " avx512f" in fh.read()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_avx512f(), reason="the CPU has no AVX-512F: one blur kernel only")
@pytest.mark.parametrize("shape", [(3, 9, 70), (21, 6, 40), (17, 3, 5), (40, 11, 13)])
def test_avx512_blur_is_bitwise_the_avx2_blur(shape, monkeypatch):
    """The spatial blur's 16-lane rows (64-float blocks, masked tails; the vertical pass's
    512-float strips) do per element what the 8-lane rows do: the same bits."""
    require_native("dense_crf")
    c, h, w = shape
    image, _ = blocks_image(h, w, noise=10.0)
    logits = random_logits(c, h, w, seed=3)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("FCNFAST_NO_AVX512", flag)
        out[flag] = crf.dense_crf(logits, image, iterations=3)
    assert torch.equal(out["0"], out["1"])


def test_opcheck():
    require_native("dense_crf")
    image, _ = blocks_image(6, 7)
    logits = random_logits(3, 6, 7, n=1)
    torch.library.opcheck(
        torch.ops.fcnfast.dense_crf.default, (logits, image[None], 2, 3.0, 3.0, 80.0, 13.0, 10.0)
    )


def test_fallback_without_native():
    image, _ = blocks_image(8, 8)
    logits = random_logits(3, 8, 8)
    with use_backend("reference"):
        q = crf.dense_crf(logits, image)
        torch.testing.assert_close(q, crf.dense_crf_reference(logits, image))
        big = torch.zeros(3, 70, 70)
        with pytest.raises(RuntimeError, match="reference is limited"):
            crf.dense_crf(big, torch.zeros(3, 70, 70))
        with pytest.raises(RuntimeError, match="not available"):
            crf.dense_crf(logits, image, backend="native")


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "logits_shape, image_shape, match",
    [
        ((3, 8, 8), (3, 8, 9), "height and width"),
        ((3, 8, 8), (3, 7, 8), "height and width"),
        ((2, 3, 8, 8), (1, 3, 8, 8), "batch"),
        ((2, 3, 8, 8), (3, 8, 8), "image must be"),
        ((8, 8), (3, 8, 8), "unary_logits must be"),
        ((3, 8, 8), (0, 8, 8), "F >= 1"),
    ],
)
def test_shape_errors(logits_shape, image_shape, match):
    with pytest.raises(ValueError, match=match):
        crf.dense_crf(torch.zeros(logits_shape), torch.zeros(image_shape))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spatial_std=0.0), "spatial_std"),
        (dict(bilateral_spatial_std=-1.0), "bilateral_spatial_std"),
        (dict(bilateral_color_std=float("nan")), "bilateral_color_std"),
        (dict(iterations=-1), "iterations"),
        (dict(iterations=2.5), "iterations"),
        (dict(spatial_weight=-1.0), "spatial_weight"),
        (dict(bilateral_weight=float("inf")), "bilateral_weight"),
        (dict(pca_components=0), "pca_components"),
        (dict(pca_components=4), "pca_components"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_parameter_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        crf.dense_crf(torch.zeros(3, 6, 6), torch.zeros(3, 6, 6), **kwargs)
    if "backend" not in kwargs:
        with pytest.raises(ValueError, match=match):
            crf.dense_crf_reference(torch.zeros(3, 6, 6), torch.zeros(3, 6, 6), **kwargs)


def test_dtype_errors():
    with pytest.raises(ValueError, match="unary_logits must be a floating"):
        crf.dense_crf(torch.zeros(3, 6, 6, dtype=torch.long), torch.zeros(3, 6, 6))
    with pytest.raises(ValueError, match="image must be uint8"):
        crf.dense_crf(torch.zeros(3, 6, 6), torch.zeros(3, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="image must be finite"):
        crf.dense_crf(torch.zeros(3, 6, 6), torch.full((3, 6, 6), float("nan")))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        crf.dense_crf(torch.zeros(3, 6, 6), [[0.0]])


def test_native_op_errors():
    require_native("dense_crf")
    op = torch.ops.fcnfast.dense_crf
    good = (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="float32"):
        op(good[0].double(), good[1], 1, 3.0, 3.0, 80.0, 13.0, 10.0)
    with pytest.raises(ValueError, match="batch, height and width"):
        op(good[0], torch.zeros(1, 3, 4, 5), 1, 3.0, 3.0, 80.0, 13.0, 10.0)
    with pytest.raises(ValueError, match="spatial_std"):
        op(*good, 1, 0.0, 3.0, 80.0, 13.0, 10.0)
    with pytest.raises(ValueError, match="iterations"):
        op(*good, -2, 3.0, 3.0, 80.0, 13.0, 10.0)
    with pytest.raises(ValueError, match="channels"):
        op(good[0], torch.zeros(1, 15, 4, 4), 1, 3.0, 3.0, 80.0, 13.0, 10.0)
    nan_image = torch.zeros(1, 3, 4, 4)
    nan_image[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        op(good[0], nan_image, 1, 3.0, 3.0, 80.0, 13.0, 10.0)
    with pytest.raises(ValueError, match="finite"):  # features of 255 / 1e-6 std units
        op(good[0], torch.full((1, 3, 4, 4), 255.0), 1, 3.0, 3.0, 80.0, 1e-6, 10.0)
    with pytest.raises(ValueError, match="finite"):
        torch.ops.fcnfast.permutohedral_filter(
            torch.full((3, 2), float("inf")), torch.ones(3, 1), False
        )


def test_logits_requiring_grad():
    """dense_crf is inference-only: logits straight from a model (requires_grad) are accepted."""
    image, _ = blocks_image(6, 7)
    logits = random_logits(3, 6, 7).requires_grad_()
    q = crf.dense_crf(logits, image, iterations=2)
    torch.testing.assert_close(q.detach(), crf.dense_crf(logits.detach(), image, iterations=2))

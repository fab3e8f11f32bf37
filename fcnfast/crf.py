"""Fully connected CRF post-processing (Kraehenbuehl & Koltun, NIPS 2011): "FCN + CRF".

The model over labels ``x`` of all ``P = H*W`` pixels has the Gibbs energy

    E(x) = sum_i psi_u(x_i) + sum_{i<j} [x_i != x_j] * sum_m w_m * khat_m(i, j)

with unary ``psi_u = -unary_logits`` (so the start ``Q0 = softmax(logits)``), Potts
compatibility and two Gaussian kernels on pixel positions ``p`` and appearance ``I``:

    smoothness  k_s(i, j) = exp(-|p_i - p_j|^2 / (2 spatial_std^2))                  weight spatial_weight
    appearance  k_b(i, j) = exp(-|p_i - p_j|^2 / (2 bilateral_spatial_std^2)
                               - |I_i - I_j|^2 / (2 bilateral_color_std^2))            weight bilateral_weight

Parameter names in the paper / densecrf / pydensecrf:

    spatial_std           = theta_gamma   (pydensecrf addPairwiseGaussian sxy)
    spatial_weight        = w2            (addPairwiseGaussian compat)
    bilateral_spatial_std = theta_alpha   (addPairwiseBilateral sxy)
    bilateral_color_std   = theta_beta    (addPairwiseBilateral srgb)
    bilateral_weight      = w1            (addPairwiseBilateral compat)

Normalisation: each kernel is used symmetrically normalised over the other pixels (i != j as in the
paper), ``khat(i, j) = n_i k(i, j) n_j`` with ``n_i = (sum_{j != i} k(i, j))^(-1/2)`` -- the default
``NORMALIZE_SYMMETRIC`` of densecrf v2 / pydensecrf, with which the default values above are
commonly used (pydensecrf / DeepLab examples). A pixel whose row sum is below 1e-4 (no neighbour under that kernel) gets ``n_i = 0``.
Mean-field inference (parallel updates) iterates

    Q <- softmax(logits + sum_m w_m * khat_m Q)      (Potts: the constant part cancels in softmax)

``iterations`` times and returns Q (probabilities, same shape as the logits).

Implementations:

* native (``torch.ops.fcnfast.dense_crf``, csrc/cpu/dense_crf.cpp), linear in pixels: the
  smoothness term is an exact separable Gaussian blur truncated at 4 std (relative tail error
  <= exp(-8)); the appearance term uses the permutohedral lattice (Adams et al. 2010), built once
  per image, whose operator ``L ~ c * k_b`` approximates the Gaussian (the lattice's own diagonal
  is removed exactly and ``c`` cancels in the normalisation). On the test scenes one appearance
  message is within 5-15% (relative L2) of the exact one and the labels after 5 iterations agree
  with the reference on >= 99% of pixels (tests/test_crf.py). float32 internally, deterministic
  (bitwise the same for any thread count).
* reference (:func:`dense_crf_reference`), pure PyTorch, exact kernels, O(P^2) time and memory.

Without the native kernel (extension not built, or ``fcnfast.use_backend("reference")``),
:func:`dense_crf` falls back to the reference for images of at most ``REFERENCE_MAX_PIXELS``
pixels and raises a RuntimeError for larger ones (the O(P^2) reference would need gigabytes).

Appearance features: an image with F <= 3 channels (grey, RGB) is used as it is, in 0..255 units.
For F > 3 (hyperspectral) or when ``pca_components`` is given, the features are the first
``pca_components`` (default 3) principal components of the bands (per image, centred, computed in
float64 with ``torch.linalg.eigh``), all multiplied by one factor so that the first component
spans a range of 255 -- one common scale keeps the components' relative variance, so
``bilateral_color_std`` keeps its "RGB units" meaning.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _backend

__all__ = [
    "dense_crf",
    "dense_crf_reference",
    "refine_labels",
    "appearance_features",
    "REFERENCE_MAX_PIXELS",
]

REFERENCE_MAX_PIXELS = 64 * 64
MAX_APPEARANCE_CHANNELS = 14  # the lattice has 2 + channels dimensions (csrc kMaxDim = 16)
_ISOLATED = 1e-4  # row sums below this get no message (same constant as the native kernel)


def dense_crf(
    unary_logits,
    image,
    iterations: int = 5,
    spatial_std: float = 3.0,
    spatial_weight: float = 3.0,
    bilateral_spatial_std: float = 80.0,
    bilateral_color_std: float = 13.0,
    bilateral_weight: float = 10.0,
    pca_components: int | None = None,
    backend: str = "auto",
):
    """Mean-field inference of the fully connected CRF; returns Q, shaped like ``unary_logits``.

    Equals ``dense_crf_reference(...)`` up to the lattice approximation of the appearance kernel.
    See the module docstring for the model, the parameter names of the paper and the
    normalisation. Inference only: the native path returns a tensor without gradient; inputs on
    a GPU are processed by the CPU kernel and the result is returned on their device.

    Args:
        unary_logits (Tensor): per-pixel class scores (the network's logits), (C, H, W) or
            (N, C, H, W); floating (the native kernel computes in float32, the reference in
            float64 for float64 input and float32 otherwise).
        image (Tensor): the appearance of each pixel, (F, H, W) or (N, F, H, W) with the same
            H, W (and N); uint8/integer or floating in 0..255 units (RGB: F = 3; more bands of
            a hyperspectral cube: see ``pca_components``).
        iterations (int): mean-field iterations (>= 0).
        spatial_std (float): std in pixels of the smoothness kernel (the paper's gamma; > 0).
        spatial_weight (float): weight of the smoothness kernel (w2; >= 0).
        bilateral_spatial_std (float): std in pixels of the appearance kernel (theta_alpha).
        bilateral_color_std (float): std in image units of the appearance kernel (theta_beta).
        bilateral_weight (float): weight of the appearance kernel (w1).
        pca_components (int, optional): project the F image bands onto this many principal
            components first (1..min(F, 14)); default: the image itself when F <= 3, else 3
            components (see ``appearance_features``).
        backend (str): ``"auto"`` (native kernel when available, else the reference for small
            images), ``"native"`` or ``"reference"``.

    Returns:
        Tensor: Q, the per-pixel class probabilities, shaped and typed like ``unary_logits``.
    """
    logits, appearance, squeeze = _prepare(unary_logits, image, pca_components)
    params = _check_params(
        iterations,
        spatial_std,
        spatial_weight,
        bilateral_spatial_std,
        bilateral_color_std,
        bilateral_weight,
    )
    impl = _choose_backend(backend, logits)
    if impl == "native":
        # inference only (no autograd); tensors on another device run on the CPU kernel
        q = torch.ops.fcnfast.dense_crf(
            logits.detach().to("cpu", torch.float32).contiguous(),
            appearance.detach().to("cpu", torch.float32).contiguous(),
            *params,
        )
        q = q.to(logits.device)
    else:
        q = _mean_field_reference(logits, appearance, *params)
    q = q.to(unary_logits.dtype)
    return q.squeeze(0) if squeeze else q


def dense_crf_reference(
    unary_logits,
    image,
    iterations: int = 5,
    spatial_std: float = 3.0,
    spatial_weight: float = 3.0,
    bilateral_spatial_std: float = 80.0,
    bilateral_color_std: float = 13.0,
    bilateral_weight: float = 10.0,
    pca_components: int | None = None,
):
    """Brute-force O(P^2) mean field with exact Gaussian kernels (i != j), pure PyTorch.

    Per image with logits ``z`` (C, P)::

        Q = softmax(z, 0)
        for _ in range(iterations):
            Q = softmax(z + spatial_weight * Q @ Khat_s + bilateral_weight * Q @ Khat_b, 0)

    ``Khat = n[:, None] * K * n[None, :]``, ``K = exp(-|f_i - f_j|^2 / 2)`` with zero diagonal,
    ``n = K.sum(1) ** -0.5`` (0 where the sum is below 1e-4). Computes in float64 for float64
    logits, else float32.
    """
    return dense_crf(
        unary_logits,
        image,
        iterations,
        spatial_std,
        spatial_weight,
        bilateral_spatial_std,
        bilateral_color_std,
        bilateral_weight,
        pca_components,
        backend="reference",
    )


def refine_labels(logits, image, **kwargs):
    """``dense_crf(logits, image, **kwargs).argmax(-3)``.

    Args:
        logits (Tensor): (C, H, W) or (N, C, H, W) class scores, as for ``dense_crf``.
        image (Tensor): (F, H, W) or (N, F, H, W) appearance, as for ``dense_crf``.
        **kwargs: the keyword arguments of ``dense_crf``.

    Returns:
        Tensor: int64 labels, (H, W) or (N, H, W).
    """
    return dense_crf(logits, image, **kwargs).argmax(dim=-3)


# ---------------------------------------------------------------------------
# validation and appearance features
# ---------------------------------------------------------------------------


def _prepare(unary_logits, image, pca_components):
    """Validate shapes/dtypes, add a batch dim; returns (logits, appearance, squeeze)."""
    if not isinstance(unary_logits, torch.Tensor):
        raise ValueError(
            "unary_logits must be a torch.Tensor, got %s" % type(unary_logits).__name__
        )
    if not isinstance(image, torch.Tensor):
        raise ValueError("image must be a torch.Tensor, got %s" % type(image).__name__)
    if unary_logits.dim() not in (3, 4):
        raise ValueError(
            "unary_logits must be (C, H, W) or (N, C, H, W), got shape %s"
            % (tuple(unary_logits.shape),)
        )
    if not unary_logits.is_floating_point():
        raise ValueError("unary_logits must be a floating tensor, got %s" % unary_logits.dtype)
    if image.dim() != unary_logits.dim():
        raise ValueError(
            "image must be %s like unary_logits %s, got shape %s"
            % (
                "(F, H, W)" if unary_logits.dim() == 3 else "(N, F, H, W)",
                tuple(unary_logits.shape),
                tuple(image.shape),
            )
        )
    if image.dtype == torch.bool or image.is_complex():
        raise ValueError(
            "image must be uint8/integer or floating (0..255 units), got %s" % image.dtype
        )
    if image.device != unary_logits.device:
        raise ValueError(
            "image and unary_logits must be on the same device, got %s and %s"
            % (image.device, unary_logits.device)
        )
    squeeze = unary_logits.dim() == 3
    logits = unary_logits.unsqueeze(0) if squeeze else unary_logits
    image = image.unsqueeze(0) if squeeze else image
    if logits.shape[0] != image.shape[0] or logits.shape[2:] != image.shape[2:]:
        raise ValueError(
            "unary_logits %s and image %s must agree in batch, height and width"
            % (tuple(unary_logits.shape), tuple(image.shape))
        )
    if logits.shape[1] < 1:
        raise ValueError(
            "unary_logits needs at least one class, got shape %s" % (tuple(unary_logits.shape),)
        )
    if image.is_floating_point() and not bool(torch.isfinite(image).all()):
        raise ValueError("image must be finite (found NaN or Inf)")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits, appearance_features(image, pca_components), squeeze


def appearance_features(image, pca_components: int | None = None):
    """Appearance features (N, K, H, W) for the bilateral kernel, in 0..255-like units.

    F <= 3 channels and ``pca_components=None``: the image itself (float). Otherwise the first
    ``pca_components`` (default 3) principal components of the F bands of each image, scaled by
    one factor so that the first component spans 255 (0 for a constant image).
    """
    if image.dim() != 4 or image.shape[1] < 1:
        raise ValueError(
            "image must be (N, F, H, W) with F >= 1, got shape %s" % (tuple(image.shape),)
        )
    bands = image.shape[1]
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    if pca_components is None:
        if bands <= 3:
            return image.to(dtype)
        pca_components = 3
    if (
        isinstance(pca_components, bool)
        or not isinstance(pca_components, numbers.Integral)
        or not 1 <= pca_components <= min(bands, MAX_APPEARANCE_CHANNELS)
    ):
        raise ValueError(
            "pca_components must be an int in 1..%d (image has %d bands), got %r"
            % (min(bands, MAX_APPEARANCE_CHANNELS), bands, pca_components)
        )
    n, _, h, w = image.shape
    x = image.reshape(n, bands, h * w).double()
    x = x - x.mean(dim=2, keepdim=True)
    cov = x @ x.transpose(1, 2) / max(h * w, 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    top = vectors.flip(-1)[..., :pca_components]  # (N, F, k)
    scores = top.transpose(1, 2) @ x  # (N, k, P)
    if h * w > 0:
        span = scores[:, 0].amax(dim=1) - scores[:, 0].amin(dim=1)
        scale = torch.where(span > 1e-12, 255.0 / span.clamp_min(1e-12), torch.zeros_like(span))
        scores = scores * scale[:, None, None]
    return scores.reshape(n, pca_components, h, w).to(dtype)


def _check_params(
    iterations,
    spatial_std,
    spatial_weight,
    bilateral_spatial_std,
    bilateral_color_std,
    bilateral_weight,
):
    if (
        isinstance(iterations, bool)
        or not isinstance(iterations, numbers.Integral)
        or iterations < 0
    ):
        raise ValueError("iterations must be an int >= 0, got %r" % (iterations,))
    for name, value in (
        ("spatial_std", spatial_std),
        ("bilateral_spatial_std", bilateral_spatial_std),
        ("bilateral_color_std", bilateral_color_std),
    ):
        if not _is_real(value) or not (math.isfinite(value) and value > 0):
            raise ValueError("%s must be a positive finite number, got %r" % (name, value))
    for name, value in (("spatial_weight", spatial_weight), ("bilateral_weight", bilateral_weight)):
        if not _is_real(value) or not (math.isfinite(value) and value >= 0):
            raise ValueError("%s must be a finite number >= 0, got %r" % (name, value))
    return (
        int(iterations),
        float(spatial_std),
        float(spatial_weight),
        float(bilateral_spatial_std),
        float(bilateral_color_std),
        float(bilateral_weight),
    )


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _choose_backend(backend, logits):
    if backend not in ("auto", "native", "reference"):
        raise ValueError("backend must be 'auto', 'native' or 'reference', got %r" % (backend,))
    if backend == "reference":
        return "reference"
    native = _has_native("cpu")  # the CPU kernel also serves tensors on other devices
    if backend == "native" and not native:
        raise RuntimeError(
            "dense_crf: backend='native' but the native CPU kernel fcnfast::dense_crf "
            "is not available (fcnfast backend: %s)" % _backend.backend()
        )
    if native:
        return "native"
    pixels = logits.shape[2] * logits.shape[3]
    if pixels > REFERENCE_MAX_PIXELS:
        raise RuntimeError(
            "dense_crf: the native kernel fcnfast::dense_crf is not available (fcnfast backend: "
            "%s, device: %s) and the O(P^2) reference is limited to %d pixels, got %dx%d; build "
            "the extension (pip install --no-build-isolation .) or call dense_crf_reference "
            "explicitly"
            % (
                _backend.backend(),
                logits.device.type,
                REFERENCE_MAX_PIXELS,
                logits.shape[2],
                logits.shape[3],
            )
        )
    return "reference"


def _has_native(device_type: str) -> bool:
    try:
        return _backend.has_kernel("dense_crf", device_type)
    except RuntimeError:  # an extension built without this op
        return False


# ---------------------------------------------------------------------------
# the brute-force reference
# ---------------------------------------------------------------------------


def pixel_positions(h: int, w: int, dtype=torch.float64, device=None):
    """(P, 2) pixel coordinates (x, y) in row-major pixel order."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=dtype, device=device),
        torch.arange(w, dtype=dtype, device=device),
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def normalised_kernel(features):
    """``n_i exp(-|f_i - f_j|^2 / 2) n_j`` for i != j, 0 on the diagonal; features (P, D)."""
    sq = (features * features).sum(1)
    dist2 = (sq[:, None] + sq[None, :] - 2.0 * features @ features.T).clamp_min(0)
    kernel = torch.exp(-0.5 * dist2)
    kernel.fill_diagonal_(0)
    rows = kernel.sum(1)
    n = torch.where(rows > _ISOLATED, rows.clamp_min(_ISOLATED).rsqrt(), torch.zeros_like(rows))
    return n[:, None] * kernel * n[None, :]


def crf_kernels(appearance, spatial_std, bilateral_spatial_std, bilateral_color_std, dtype):
    """The two normalised kernels (P, P) of one image; appearance (K, H, W)."""
    k, h, w = appearance.shape
    pos = pixel_positions(h, w, dtype, appearance.device)
    app = appearance.reshape(k, h * w).T.to(dtype)
    smooth = normalised_kernel(pos / spatial_std)
    bilateral = normalised_kernel(
        torch.cat([pos / bilateral_spatial_std, app / bilateral_color_std], dim=1)
    )
    return smooth, bilateral


def _mean_field_reference(
    logits,
    appearance,
    iterations,
    spatial_std,
    spatial_weight,
    bilateral_spatial_std,
    bilateral_color_std,
    bilateral_weight,
):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n, c, h, w = logits.shape
    out = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    for b in range(n):
        z = logits[b].reshape(c, h * w).to(dtype)
        smooth, bilateral = crf_kernels(
            appearance[b], spatial_std, bilateral_spatial_std, bilateral_color_std, dtype
        )
        pairwise = spatial_weight * smooth + bilateral_weight * bilateral  # symmetric
        q = torch.softmax(z, dim=0)
        for _ in range(iterations):
            q = torch.softmax(z + q @ pairwise, dim=0)
        out[b] = q.reshape(c, h, w)
    return out.to(logits.dtype)


def _register_fake():
    if not hasattr(torch.ops.fcnfast, "dense_crf"):
        return

    @torch.library.register_fake("fcnfast::dense_crf")
    def _(
        unary_logits,
        appearance,
        iterations,
        spatial_std,
        spatial_weight,
        bilateral_spatial_std,
        bilateral_color_std,
        bilateral_weight,
    ):
        return torch.empty_like(unary_logits, memory_format=torch.contiguous_format)


_backend.on_extension_load(_register_fake)

"""Hyperspectral (HSI) scenes: file loaders, per-band normalisation and a synthetic scene generator.

A scene is a pair ``(cube, gt)``: ``cube`` float32 ``(H, W, B)`` (height, width, bands) and ``gt``
int64 ``(H, W)`` with ``0`` = unlabelled and ``1..K`` the classes -- the convention of the public
benchmark files (Indian Pines, Pavia University, Salinas).

* ``load_hsi(path, cube_key=None, gt_key=None, gt_path=None)`` reads MATLAB ``.mat`` files (v4-v7
  with ``scipy.io.loadmat``, v7.3/HDF5 with ``h5py``) or ``.npy`` pairs.
* ``normalize_bands(cube, method)`` -- ``"standard"`` (zero mean, unit variance per band) or
  ``"minmax"`` (each band scaled to [0, 1]).
* ``synthetic_scene(...)`` -- a deterministic Indian-Pines-like scene (see its docstring); nothing is
  ever downloaded.
"""

from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = [
    "load_hsi",
    "load_scene",
    "HSIScene",
    "KNOWN_SCENES",
    "class_names",
    "normalize_bands",
    "pca_reduce",
    "synthetic_scene",
    "describe_scene",
]

NORMALIZATIONS = ("standard", "minmax", "none")


# ---------------------------------------------------------------------------
# the public benchmark scenes: their usual .mat keys and class names
# ---------------------------------------------------------------------------


class _Known(NamedTuple):
    title: str
    cube_keys: Tuple[str, ...]
    gt_keys: Tuple[str, ...]
    classes: Tuple[str, ...]


#: The public scenes as they are usually distributed (GIC, Universidad del Pais Vasco):
#: ``Indian_pines_corrected.mat`` / ``Indian_pines_gt.mat``, ``PaviaU.mat`` / ``PaviaU_gt.mat``,
#: ``Salinas_corrected.mat`` / ``Salinas_gt.mat``, ``Pavia.mat`` / ``Pavia_gt.mat``. Class ``i`` (1-based
#: label in the ground truth) is ``classes[i - 1]``.
KNOWN_SCENES: Dict[str, _Known] = {
    "indian_pines": _Known(
        "Indian Pines (AVIRIS)",
        ("indian_pines_corrected", "indian_pines"),
        ("indian_pines_gt",),
        (
            "Alfalfa",
            "Corn-notill",
            "Corn-mintill",
            "Corn",
            "Grass-pasture",
            "Grass-trees",
            "Grass-pasture-mowed",
            "Hay-windrowed",
            "Oats",
            "Soybean-notill",
            "Soybean-mintill",
            "Soybean-clean",
            "Wheat",
            "Woods",
            "Buildings-Grass-Trees-Drives",
            "Stone-Steel-Towers",
        ),
    ),
    "pavia_university": _Known(
        "Pavia University (ROSIS)",
        ("paviaU",),
        ("paviaU_gt",),
        (
            "Asphalt",
            "Meadows",
            "Gravel",
            "Trees",
            "Painted metal sheets",
            "Bare Soil",
            "Bitumen",
            "Self-Blocking Bricks",
            "Shadows",
        ),
    ),
    "pavia_centre": _Known(
        "Pavia Centre (ROSIS)",
        ("pavia",),
        ("pavia_gt",),
        (
            "Water",
            "Trees",
            "Asphalt",
            "Self-Blocking Bricks",
            "Bitumen",
            "Tiles",
            "Shadows",
            "Meadows",
            "Bare Soil",
        ),
    ),
    "salinas": _Known(
        "Salinas (AVIRIS)",
        ("salinas_corrected", "salinas"),
        ("salinas_gt",),
        (
            "Brocoli_green_weeds_1",
            "Brocoli_green_weeds_2",
            "Fallow",
            "Fallow_rough_plow",
            "Fallow_smooth",
            "Stubble",
            "Celery",
            "Grapes_untrained",
            "Soil_vinyard_develop",
            "Corn_senesced_green_weeds",
            "Lettuce_romaine_4wk",
            "Lettuce_romaine_5wk",
            "Lettuce_romaine_6wk",
            "Lettuce_romaine_7wk",
            "Vinyard_untrained",
            "Vinyard_vertical_trellis",
        ),
    ),
}


def _known_by_key(key: Optional[str]) -> Optional[str]:
    if key is None:
        return None
    for name, known in KNOWN_SCENES.items():
        if key in known.gt_keys or key in known.cube_keys:
            return name
    return None


def class_names(scene: Optional[str], num_classes: int) -> List[str]:
    """Names of classes ``1..num_classes``: the known scene's names (``KNOWN_SCENES``), else
    ``"class 1"``, ``"class 2"``, ... (also for labels beyond the known list)."""
    known = KNOWN_SCENES[scene].classes if scene in KNOWN_SCENES else ()
    return [known[i] if i < len(known) else "class %d" % (i + 1) for i in range(num_classes)]


class HSIScene(NamedTuple):
    """A loaded scene: ``cube`` float32 (H, W, B), ``gt`` int64 (H, W) (0 = unlabelled), the
    known scene it was recognised as (``None`` when not), its class names (``class_names[i]`` is
    label ``i + 1``) and the keys / files it came from."""

    cube: np.ndarray
    gt: np.ndarray
    scene: Optional[str]
    class_names: List[str]
    title: str
    cube_key: Optional[str]
    gt_key: Optional[str]


def load_scene(
    path, cube_key: Optional[str] = None, gt_key: Optional[str] = None, gt_path=None
) -> HSIScene:
    """:func:`load_hsi` plus the scene's identity: a ``.mat`` pair whose keys are the usual keys of
    a known scene (``KNOWN_SCENES``: Indian Pines, Pavia University, Pavia Centre, Salinas) gets
    that scene's class names; anything else gets ``class 1..K``."""
    keys: Dict[str, Optional[str]] = {}
    cube, gt = _load(path, cube_key, gt_key, gt_path, keys)
    scene = _known_by_key(keys.get("gt")) or _known_by_key(keys.get("cube"))
    k = int(gt.max()) if gt.size else 0
    title = KNOWN_SCENES[scene].title if scene else os.path.basename(os.fspath(path))
    return HSIScene(cube, gt, scene, class_names(scene, k), title, keys.get("cube"), keys.get("gt"))


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------


def load_hsi(
    path, cube_key: Optional[str] = None, gt_key: Optional[str] = None, gt_path=None
) -> Tuple[np.ndarray, np.ndarray]:
    """Load a hyperspectral cube and its ground truth.

    ``path`` is one of

    * a MATLAB ``.mat`` file holding the cube (and the ground truth unless ``gt_path`` names a
      second ``.mat`` file, as the public benchmarks ship them: ``Indian_pines_corrected.mat`` +
      ``Indian_pines_gt.mat``). Without ``cube_key`` the cube is the largest 3-D numeric array;
      without ``gt_key`` the ground truth is the 2-D integer-valued array whose shape is the cube's
      ``(H, W)``. MATLAB v7.3 files (HDF5) need ``h5py``; their arrays are transposed back to
      MATLAB's ``(H, W, B)`` order.
    * a ``.npy`` cube ``(H, W, B)``; the ground truth is ``gt_path``, else ``<stem>_gt.npy``, else
      ``gt.npy`` next to it.
    * a directory holding ``cube.npy`` and ``gt.npy``.

    Returns ``(cube float32 (H, W, B), gt int64 (H, W))``; ``gt`` 0 means unlabelled. Errors
    (``FileNotFoundError``/``ValueError``) name the file and the key.
    """
    return _load(path, cube_key, gt_key, gt_path, {})


def _load(path, cube_key, gt_key, gt_path, keys) -> Tuple[np.ndarray, np.ndarray]:
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_npy_pair(
            os.path.join(path, "cube.npy"), gt_path or os.path.join(path, "gt.npy")
        )
    _require_file(path)
    if path.lower().endswith(".npy"):
        if gt_path is None:
            stem = path[:-4]
            gt_path = stem + "_gt.npy"
            if not os.path.exists(gt_path):
                gt_path = os.path.join(os.path.dirname(path), "gt.npy")
        return _load_npy_pair(path, os.fspath(gt_path))
    if not path.lower().endswith(".mat"):
        raise ValueError(
            "unsupported HSI file %r: expected a .mat file, a .npy cube or a directory "
            "with cube.npy and gt.npy" % path
        )
    variables = _read_mat(path)
    cube_key = cube_key or _find_cube_key(variables, path)
    keys["cube"] = cube_key
    cube = _get(variables, cube_key, path, "cube_key")
    if cube.ndim != 3:
        raise ValueError(
            "cube %r in %r must be 3-D (H, W, bands), got shape %s" % (cube_key, path, cube.shape)
        )
    gt_file, gt_variables = path, variables
    if gt_path is not None:
        gt_file = os.fspath(gt_path)
        _require_file(gt_file)
        gt_variables = _read_mat(gt_file)
    gt_key = gt_key or _find_gt_key(
        gt_variables, cube.shape[:2], gt_file, exclude=cube_key if gt_file == path else None
    )
    gt = _get(gt_variables, gt_key, gt_file, "gt_key")
    keys["gt"] = gt_key
    return _checked_pair(cube, "%r in %r" % (cube_key, path), gt, "%r in %r" % (gt_key, gt_file))


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError("HSI file not found: %r" % path)


def _load_npy_pair(cube_path: str, gt_path: str) -> Tuple[np.ndarray, np.ndarray]:
    cube = _read_npy(cube_path)
    gt = _read_npy(gt_path)
    if cube.ndim != 3:
        raise ValueError(
            "cube %r must be 3-D (H, W, bands), got shape %s" % (cube_path, cube.shape)
        )
    return _checked_pair(cube, repr(cube_path), gt, repr(gt_path))


def _read_npy(path: str) -> np.ndarray:
    _require_file(path)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # corrupt header, truncated data, pickled object arrays
        raise ValueError("could not read .npy file %r: %s" % (path, exc)) from exc


def _read_mat(path: str) -> Dict[str, np.ndarray]:
    """All numeric arrays of a .mat file, v7.3 (HDF5) included, in MATLAB's axis order."""
    from scipy import io

    if _is_hdf5(path):
        return _read_mat73(path)
    try:
        raw = io.loadmat(path)
    except NotImplementedError:  # scipy's answer for v7.3 files it did not detect above
        return _read_mat73(path)
    except Exception as exc:
        raise ValueError(
            "could not read MATLAB file %r (corrupt or not a .mat file): %s" % (path, exc)
        ) from exc
    return {k: v for k, v in raw.items() if not k.startswith("__") and _is_numeric(v)}


def _is_hdf5(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(520)
    # v7.3 files carry a 512-byte MATLAB header, then the HDF5 signature
    return b"\x89HDF\r\n\x1a\n" in (head[:8], head[512:520])


def _read_mat73(path: str) -> Dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError:
        raise ValueError(
            "%r is a MATLAB v7.3 (HDF5) file; reading it needs h5py "
            "(pip install h5py, or the fcnfast[hsi] extra)" % path
        ) from None
    out = {}
    try:
        with h5py.File(path, "r") as f:
            for key, item in f.items():
                if isinstance(item, h5py.Dataset) and item.dtype.kind in "biuf":
                    # MATLAB writes column-major: h5py sees the axes reversed
                    out[key] = np.asarray(item[()]).transpose()
    except OSError as exc:
        raise ValueError("could not read MATLAB v7.3 file %r: %s" % (path, exc)) from exc
    return out


def _is_numeric(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"


def _describe(variables: Dict[str, np.ndarray]) -> str:
    return (
        ", ".join("%s %s" % (k, "x".join(map(str, v.shape))) for k, v in variables.items())
        or "none"
    )


def _get(variables, key, path, argument) -> np.ndarray:
    if key not in variables:
        raise ValueError(
            "%s %r not found in %r (numeric variables: %s)"
            % (argument, key, path, _describe(variables))
        )
    return variables[key]


def _find_cube_key(variables, path) -> str:
    cubes = {k: v for k, v in variables.items() if v.ndim == 3}
    for known in KNOWN_SCENES.values():  # a known scene's usual key wins over "the largest"
        for key in known.cube_keys:
            if key in cubes:
                return key
    if not cubes:
        raise ValueError(
            "no 3-D array (H, W, bands) in %r (numeric variables: %s); pass cube_key"
            % (path, _describe(variables))
        )
    return max(cubes, key=lambda k: cubes[k].size)


def _find_gt_key(variables, hw, path, exclude=None) -> str:
    usual = [k for known in KNOWN_SCENES.values() for k in known.gt_keys if k in variables]
    for key in usual + [k for k in variables if k not in usual]:
        value = variables[key]
        if key != exclude and value.ndim == 2 and value.shape == tuple(hw) and _integral(value):
            return key
    raise ValueError(
        "no 2-D integer ground-truth array of shape %s in %r (numeric variables: %s); "
        "pass gt_key (and gt_path for a separate file)" % (tuple(hw), path, _describe(variables))
    )


def _integral(a: np.ndarray) -> bool:
    return a.dtype.kind in "biu" or bool(np.all(np.isfinite(a)) and np.all(a == np.round(a)))


def _checked_pair(cube, cube_name, gt, gt_name) -> Tuple[np.ndarray, np.ndarray]:
    if gt.ndim != 2 or gt.shape != cube.shape[:2]:
        raise ValueError(
            "ground truth %s has shape %s but cube %s has shape %s: the ground truth "
            "must be (H, W) = %s" % (gt_name, gt.shape, cube_name, cube.shape, cube.shape[:2])
        )
    if not _integral(gt) or (gt.size and gt.min() < 0):
        raise ValueError(
            "ground truth %s must hold non-negative integer labels (0 = unlabelled)" % gt_name
        )
    if not np.all(np.isfinite(cube)):
        raise ValueError("cube %s contains NaN or Inf" % cube_name)
    return np.ascontiguousarray(cube, dtype=np.float32), np.ascontiguousarray(gt, dtype=np.int64)


# ---------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------


def normalize_bands(cube: np.ndarray, method: str = "standard") -> np.ndarray:
    """Per-band normalisation of a ``(H, W, B)`` cube (statistics over all pixels of the scene).

    ``"standard"``: ``(x - mean_b) / std_b`` (zero mean, unit variance per band; constant bands
    become 0). ``"minmax"``: ``(x - min_b) / (max_b - min_b)`` in [0, 1] (constant bands become 0).
    ``"none"``: a float32 copy. Returns a new float32 array.
    """
    if method not in NORMALIZATIONS:
        raise ValueError("normalization must be one of %s, got %r" % (NORMALIZATIONS, method))
    if cube.ndim != 3:
        raise ValueError("cube must be (H, W, bands), got shape %s" % (cube.shape,))
    x = np.array(cube, dtype=np.float32, copy=True)
    if method == "none" or x.size == 0:
        return x
    flat = x.reshape(-1, x.shape[2])
    if method == "standard":
        shift = flat.mean(axis=0, dtype=np.float64)
        scale = flat.std(axis=0, dtype=np.float64)
    else:
        shift = flat.min(axis=0).astype(np.float64)
        scale = flat.max(axis=0) - shift
    scale[scale == 0] = 1.0
    x -= shift.astype(np.float32)
    x /= scale.astype(np.float32)
    return x


def pca_reduce(cube: np.ndarray, components: int) -> np.ndarray:
    """The first ``components`` principal components of a ``(H, W, B)`` cube's pixels (all pixels of
    the scene, unsupervised, as the patch-CNN literature does before its CNN), float32
    ``(H, W, components)``. Each component's sign is fixed (its largest loading positive), and all
    components are divided by the standard deviation of the first, so they keep their relative
    variance. ``components >= B`` returns the cube rotated onto all components."""
    if cube.ndim != 3:
        raise ValueError("cube must be (H, W, bands), got shape %s" % (cube.shape,))
    if int(components) < 1:
        raise ValueError("components must be >= 1, got %r" % components)
    h, w, b = cube.shape
    x = cube.reshape(-1, b).astype(np.float64)
    x = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(x.T @ x / max(x.shape[0], 1))
    top = vectors[:, ::-1][:, : min(int(components), b)]
    top = top * np.where(top[np.abs(top).argmax(axis=0), np.arange(top.shape[1])] < 0, -1.0, 1.0)
    scores = x @ top
    scale = scores[:, 0].std() if scores.size else 1.0
    return (scores / (scale if scale > 0 else 1.0)).astype(np.float32).reshape(h, w, -1)


# ---------------------------------------------------------------------------
# synthetic scene
# ---------------------------------------------------------------------------


def synthetic_scene(
    height: int = 145,
    width: int = 145,
    bands: int = 64,
    num_classes: int = 12,
    seed: int = 0,
    regions_per_class: int = 3,
    pixel_variability: float = 1.0,
    noise: float = 1.2,
    border_mixing: float = 1.0,
    unlabelled_border: int = 1,
) -> Tuple[np.ndarray, np.ndarray]:
    """A deterministic hyperspectral scene ``(cube float32 (H, W, B), gt int64 (H, W))``.

    How it is built (all from ``numpy.random.default_rng(seed)``):

    * **Regions**: a jittered grid of Voronoi cells with boundaries warped by a smoothed random
      field (field-like parcels). Each class 1..K owns ``regions_per_class`` cells; about one cell
      in seven is unlabelled background (label 0, its own spectrum, as in the benchmark files).
    * **Spectra**: ``K + 3`` smooth endmember signatures, each a sum of Gaussians over the band
      axis drawn from a *shared* pool of absorption features, so signatures overlap. Every class is
      a mixture of endmembers (a dominant one plus shared ones), every region perturbs its class
      mixture a little (different fields of the same crop differ).
    * **Per-pixel variability**: each pixel's abundances get i.i.d. noise of relative size
      ``pixel_variability`` and the spectrum additive Gaussian noise of ``noise`` times the mean
      signal standard deviation, so single-pixel spectra are ambiguous while the average over a
      neighbourhood is not -- spatial context matters.
    * **Mixing at borders**: abundance maps are blurred with a Gaussian of ``border_mixing`` pixels;
      pixels within ``unlabelled_border`` pixels of a class boundary are labelled 0.
    * **Brightness**: a smooth illumination field (+-20 %) times a per-pixel factor (+-5 %).

    Memory is O(H * W * (B + K)) float32; 1024 x 1024 x 103 takes a few seconds.
    """
    if height < 8 or width < 8:
        raise ValueError("synthetic_scene needs height and width >= 8, got %dx%d" % (height, width))
    if bands < 4 or num_classes < 2 or regions_per_class < 1:
        raise ValueError(
            "synthetic_scene needs bands >= 4, num_classes >= 2, regions_per_class >= 1;"
            " got %d, %d, %d" % (bands, num_classes, regions_per_class)
        )
    rng = np.random.default_rng(seed)
    cell, cell_class = _voronoi_regions(rng, height, width, num_classes, regions_per_class)
    endmembers = _endmember_signatures(rng, num_classes + 3, bands)  # (M, B)
    num_materials = endmembers.shape[0]
    class_mix = _class_mixtures(rng, num_classes + 1, num_materials)  # row 0: background
    region_mix = class_mix[cell_class] * rng.uniform(0.85, 1.15, (len(cell_class), num_materials))
    region_mix /= region_mix.sum(axis=1, keepdims=True)

    abundance = region_mix[cell].astype(np.float32)  # (H, W, M)
    if border_mixing > 0:
        abundance = ndimage.gaussian_filter(abundance, sigma=(border_mixing, border_mixing, 0))
    abundance *= 1 + pixel_variability * rng.standard_normal(abundance.shape, dtype=np.float32)
    np.maximum(abundance, 0, out=abundance)

    brightness = 1 + 0.2 * _smooth_field(rng, height, width, max(height, width) / 6)
    brightness *= 1 + 0.05 * rng.uniform(-1, 1, (height, width))
    abundance *= brightness[..., None].astype(np.float32)

    cube = abundance.reshape(-1, num_materials) @ endmembers.astype(np.float32)
    cube = cube.reshape(height, width, bands)
    sigma = noise * float(np.mean(np.std(cube.reshape(-1, bands), axis=0)))
    cube += sigma * rng.standard_normal(cube.shape, dtype=np.float32)

    gt = cell_class[cell].astype(np.int64)
    if unlabelled_border > 0:
        gt[_class_boundary(gt, unlabelled_border)] = 0
    return cube, gt


def _smooth_field(rng, height, width, sigma) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation.

    Smoothed on a grid ``step = sigma / 4`` times coarser and interpolated back (linearly), so the
    cost does not grow with ``sigma`` (a 1024 x 1024 field with sigma 170 stays fast).
    """
    step = max(1, int(sigma // 4))
    coarse = rng.standard_normal((height // step + 2, width // step + 2))
    coarse = ndimage.gaussian_filter(coarse, sigma / step, mode="wrap")
    field = ndimage.zoom(coarse, step, order=1)[:height, :width]
    return field / (field.std() + 1e-12)


def _voronoi_regions(rng, height, width, num_classes, regions_per_class):
    labelled = num_classes * regions_per_class
    count = labelled + max(1, labelled // 6)
    rows = max(1, int(round(np.sqrt(count * height / width))))
    cols = int(np.ceil(count / rows))
    sy, sx = height / rows, width / cols
    gy, gx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    centers = np.stack(
        [
            (gy.ravel() + rng.uniform(0.2, 0.8, rows * cols)) * sy,
            (gx.ravel() + rng.uniform(0.2, 0.8, rows * cols)) * sx,
        ],
        axis=1,
    )
    # every class gets regions_per_class cells, the rest is background (0)
    cell_class = np.zeros(len(centers), dtype=np.int64)
    cell_class[:labelled] = np.repeat(np.arange(1, num_classes + 1), regions_per_class)
    cell_class = rng.permutation(cell_class)
    # warp the coordinates so the cell boundaries are curved, not straight lines
    amp = 0.25 * min(sy, sx)
    yy, xx = np.meshgrid(
        np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij"
    )
    scale = max(sy, sx) / 2
    wy = yy + amp * _smooth_field(rng, height, width, scale)
    wx = xx + amp * _smooth_field(rng, height, width, scale)
    _, cell = cKDTree(centers).query(np.stack([wy.ravel(), wx.ravel()], axis=1))
    return cell.reshape(height, width), cell_class


def _endmember_signatures(rng, count, bands) -> np.ndarray:
    """Smooth positive signatures: a continuum plus Gaussian features from a shared pool."""
    axis = np.linspace(0, 1, bands)
    pool_centers = rng.uniform(0.05, 0.95, 8)
    pool_widths = rng.uniform(0.04, 0.15, 8)
    signatures = np.empty((count, bands))
    for m in range(count):
        slope = rng.uniform(-0.5, 0.5)
        s = 1.0 + slope * (axis - 0.5)
        for k in rng.choice(8, size=3, replace=False):
            s += rng.uniform(-0.6, 0.9) * np.exp(
                -0.5 * ((axis - pool_centers[k]) / pool_widths[k]) ** 2
            )
        signatures[m] = np.maximum(s, 0.05)
    return signatures


def _class_mixtures(rng, count, materials) -> np.ndarray:
    """Rows sum to 1: a dominant material per class plus a shared Dirichlet background."""
    mix = rng.dirichlet(np.full(materials, 0.8), size=count) * 0.55
    dominant = (
        rng.permutation(materials)[:count]
        if count <= materials
        else rng.integers(0, materials, count)
    )
    mix[np.arange(count), dominant] += 0.45
    return mix / mix.sum(axis=1, keepdims=True)


def _class_boundary(gt: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood contains another label."""
    size = 2 * radius + 1
    hi = ndimage.maximum_filter(gt, size=size, mode="nearest")
    lo = ndimage.minimum_filter(gt, size=size, mode="nearest")
    return hi != lo


def describe_scene(cube: np.ndarray, gt: np.ndarray) -> str:
    """One line: size, bands, classes and labelled pixels per class."""
    counts = np.bincount(gt.ravel(), minlength=int(gt.max()) + 1)
    return "%dx%d pixels, %d bands, %d classes, %d labelled pixels (per class: %s)" % (
        cube.shape[0],
        cube.shape[1],
        cube.shape[2],
        int((counts[1:] > 0).sum()),
        int(counts[1:].sum()),
        " ".join(str(int(c)) for c in counts[1:]),
    )

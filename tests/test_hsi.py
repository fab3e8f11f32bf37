"""HSI: loaders, normalisation, synthetic scenes, splits, metrics, models and the ``fcnfast hsi`` run."""

import argparse
import json
import os

import numpy as np
import pytest
import scipy.io
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from fcnfast.data.hsi import (
    KNOWN_SCENES,
    class_names,
    load_hsi,
    load_scene,
    normalize_bands,
    pca_reduce,
    synthetic_scene,
)
from fcnfast.hsi import (
    HSIFCN,
    PatchCNN,
    block_split,
    classification_scores,
    confusion_matrix,
    disjoint_split,
    extract_patches,
    random_split,
    receptive_field,
    reflect_pad,
    register_cli,
    split_report,
)

# the real Indian Pines ground truth (read-only shared data, never committed); see _real_gt()
INDIAN_PINES = os.environ.get(
    "FCNFAST_INDIAN_PINES",
    os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "indian_pines"
    ),
)


def _tiny(h=6, w=5, b=4, seed=0):
    rng = np.random.default_rng(seed)
    cube = rng.standard_normal((h, w, b)).astype(np.float32)
    gt = rng.integers(0, 4, (h, w)).astype(np.uint8)
    return cube, gt


# ---------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------


def test_mat_auto_keys(tmp_path):
    cube, gt = _tiny()
    path = tmp_path / "Indian_pines.mat"
    scipy.io.savemat(
        path,
        {
            "indian_pines_corrected": cube,
            "indian_pines_gt": gt,
            "small": np.ones((2, 2, 2)),
            "note": np.ones((3, 3)),
        },
    )
    c, g = load_hsi(path)
    assert c.dtype == np.float32 and g.dtype == np.int64
    np.testing.assert_array_equal(c, cube)
    np.testing.assert_array_equal(g, gt)


def test_mat_named_keys_and_separate_gt_file(tmp_path):
    cube, gt = _tiny()
    other = cube[::-1].copy() * 2 + 1
    path = tmp_path / "scene.mat"
    scipy.io.savemat(
        path,
        {
            "paviaU": cube,
            "bigger": np.concatenate([other, other], axis=2),
            "paviaU_gt": gt,
            "other_gt": (gt + 1) % 3,
        },
    )
    c, g = load_hsi(path, cube_key="paviaU", gt_key="other_gt")
    np.testing.assert_array_equal(c, cube)
    np.testing.assert_array_equal(g, (gt + 1) % 3)
    # separate files, as the benchmarks ship them
    scipy.io.savemat(tmp_path / "salinas_corrected.mat", {"salinas_corrected": cube})
    scipy.io.savemat(tmp_path / "salinas_gt.mat", {"salinas_gt": gt})
    c, g = load_hsi(tmp_path / "salinas_corrected.mat", gt_path=tmp_path / "salinas_gt.mat")
    np.testing.assert_array_equal(c, cube)
    np.testing.assert_array_equal(g, gt)


def test_mat_errors_name_file_and_key(tmp_path):
    cube, gt = _tiny()
    path = tmp_path / "scene.mat"
    scipy.io.savemat(path, {"cube": cube, "gt": gt})
    with pytest.raises(ValueError, match=r"gt_key 'labels' not found in .*scene\.mat"):
        load_hsi(path, gt_key="labels")
    with pytest.raises(ValueError, match=r"cube_key 'hsi' not found in .*scene\.mat.*cube 6x5x4"):
        load_hsi(path, cube_key="hsi")
    with pytest.raises(FileNotFoundError, match=r"missing\.mat"):
        load_hsi(tmp_path / "missing.mat")
    bad = tmp_path / "corrupt.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file" + os.urandom(300))
    with pytest.raises(ValueError, match=r"corrupt\.mat"):
        load_hsi(bad)
    flat = tmp_path / "flat.mat"
    scipy.io.savemat(flat, {"gt": gt})
    with pytest.raises(ValueError, match=r"no 3-D array .*flat\.mat"):
        load_hsi(flat)


def test_mat_shape_mismatch_and_no_gt(tmp_path):
    cube, gt = _tiny()
    path = tmp_path / "scene.mat"
    scipy.io.savemat(path, {"cube": cube, "gt": gt[:, :4]})
    with pytest.raises(ValueError, match=r"no 2-D integer ground-truth array of shape \(6, 5\)"):
        load_hsi(path)
    with pytest.raises(ValueError, match=r"'gt' in .*scene\.mat.* has shape \(6, 4\).*\(6, 5\)"):
        load_hsi(path, gt_key="gt")
    scipy.io.savemat(path, {"cube": cube, "gt": gt - 1.5})
    with pytest.raises(ValueError, match="no 2-D integer"):
        load_hsi(path)


def test_mat_v73_hdf5(tmp_path):
    import h5py  # a test dependency (pyproject [test]): this case must run, not skip

    cube, gt = _tiny(7, 5, 3)
    path = tmp_path / "v73.mat"
    with h5py.File(path, "w", userblock_size=512) as f:  # MATLAB's 512-byte header + HDF5
        f["paviaU"] = cube.transpose()  # MATLAB stores column-major: h5py sees reversed axes
        f["paviaU_gt"] = gt.astype(np.float64).transpose()
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, fake header")
    c, g = load_hsi(path)
    np.testing.assert_array_equal(c, cube)
    np.testing.assert_array_equal(g, gt)


def test_npy_pairs(tmp_path):
    cube, gt = _tiny()
    np.save(tmp_path / "cube.npy", cube)
    np.save(tmp_path / "gt.npy", gt)
    for args in ((tmp_path,), (tmp_path / "cube.npy",)):
        c, g = load_hsi(*args)
        np.testing.assert_array_equal(c, cube)
        np.testing.assert_array_equal(g, gt)
    np.save(tmp_path / "scene.npy", cube[:, :4])
    np.save(tmp_path / "scene_gt.npy", gt[:, :4])
    c, g = load_hsi(tmp_path / "scene.npy")
    assert c.shape == (6, 4, 4) and g.shape == (6, 4)
    np.save(tmp_path / "scene_gt.npy", gt)
    with pytest.raises(ValueError, match=r"scene_gt\.npy.*has shape \(6, 5\)"):
        load_hsi(tmp_path / "scene.npy")
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"broken\.npy"):
        load_hsi(tmp_path / "broken.npy", gt_path=tmp_path / "gt.npy")


def test_normalize_bands():
    rng = np.random.default_rng(0)
    cube = rng.normal(5, 3, (10, 9, 4)).astype(np.float32)
    cube[..., 2] = 7.0
    std = normalize_bands(cube, "standard")
    np.testing.assert_allclose(std[..., [0, 1, 3]].reshape(-1, 3).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(std[..., [0, 1, 3]].reshape(-1, 3).std(0), 1, atol=1e-5)
    assert np.all(std[..., 2] == 0)
    mm = normalize_bands(cube, "minmax")
    np.testing.assert_allclose(mm[..., [0, 1, 3]].reshape(-1, 3).min(0), 0, atol=1e-6)
    np.testing.assert_allclose(mm[..., [0, 1, 3]].reshape(-1, 3).max(0), 1, atol=1e-6)
    assert np.all(mm[..., 2] == 0)
    assert cube[0, 0, 2] == 7.0  # input untouched
    with pytest.raises(ValueError, match="normalization"):
        normalize_bands(cube, "zscore")


# ---------------------------------------------------------------------------
# synthetic scene
# ---------------------------------------------------------------------------


def test_synthetic_deterministic_and_properties():
    a_cube, a_gt = synthetic_scene(64, 80, bands=16, num_classes=5, seed=3)
    b_cube, b_gt = synthetic_scene(64, 80, bands=16, num_classes=5, seed=3)
    c_cube, _ = synthetic_scene(64, 80, bands=16, num_classes=5, seed=4)
    assert a_cube.shape == (64, 80, 16) and a_cube.dtype == np.float32 and a_gt.dtype == np.int64
    np.testing.assert_array_equal(a_cube, b_cube)
    np.testing.assert_array_equal(a_gt, b_gt)
    assert not np.array_equal(a_cube, c_cube)
    assert set(np.unique(a_gt)) == set(range(6))  # all 5 classes and unlabelled (0)
    assert 0.05 < (a_gt == 0).mean() < 0.6
    # spatial coherence: horizontally/vertically adjacent labelled pixels mostly share a label
    pairs = [(a_gt[:, 1:], a_gt[:, :-1]), (a_gt[1:], a_gt[:-1])]
    same = sum(((p == q) & (p > 0) & (q > 0)).sum() for p, q in pairs)
    both = sum(((p > 0) & (q > 0)).sum() for p, q in pairs)
    assert same / both > 0.97


def _nearest_mean_accuracy(features, gt, train, test):
    classes = np.unique(gt[gt > 0])
    means = np.stack([features[train & (gt == c)].mean(0) for c in classes])
    d = ((features[test][:, None, :] - means[None]) ** 2).sum(-1)
    return (classes[d.argmin(1)] == gt[test]).mean()


def test_synthetic_spatial_context_matters():
    cube, gt = synthetic_scene(96, 96, bands=32, num_classes=6, seed=1)
    x = normalize_bands(cube)
    train, test = random_split(gt, 0.3, seed=0)
    pixel = _nearest_mean_accuracy(x, gt, train, test)
    spatial = _nearest_mean_accuracy(ndimage.uniform_filter(x, size=(5, 5, 1)), gt, train, test)
    assert pixel < 0.75, pixel  # single spectra are ambiguous ...
    assert spatial > pixel + 0.15, (pixel, spatial)  # ... their neighbourhood is not


def test_synthetic_large_and_errors():
    cube, gt = synthetic_scene(1024, 256, bands=4, num_classes=3, seed=0, regions_per_class=2)
    assert cube.shape == (1024, 256, 4) and set(np.unique(gt)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="height and width"):
        synthetic_scene(4, 40)


# ---------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------


def test_random_split_counts():
    _, gt = synthetic_scene(48, 48, bands=8, num_classes=4, seed=0)
    train, test = random_split(gt, 10, seed=1)
    for c in range(1, 5):
        assert train[gt == c].sum() == 10
    assert not (train & test).any()
    np.testing.assert_array_equal(train | test, gt > 0)
    train, _ = random_split(gt, 0.2, seed=1)
    for c in range(1, 5):
        assert train[gt == c].sum() == round(0.2 * (gt == c).sum())
    with pytest.raises(ValueError, match="train_per_class"):
        random_split(gt, 1.5)
    # at least min_train per class, never all pixels of a class
    gt = np.zeros((10, 10), dtype=np.int64)
    gt[0, :3] = 1  # 3 pixels: 10 % rounds to 0 -> min 5 -> capped at 2
    gt[2:, :] = 2  # 80 pixels: 10 % = 8
    gt[1, :7] = 3  # 7 pixels: min 5
    train, test = random_split(gt, 0.1, seed=0, min_train=5)
    assert [int(train[gt == c].sum()) for c in (1, 2, 3)] == [2, 8, 5]
    assert [int(test[gt == c].sum()) for c in (1, 2, 3)] == [1, 72, 2]


@pytest.mark.parametrize("buffer", [0, 3, 5])
def test_block_split_disjoint_with_buffer(buffer):
    _, gt = synthetic_scene(96, 96, bands=8, num_classes=5, seed=2)
    train, test = block_split(gt, 0.3, block=16, buffer=buffer, seed=0)
    assert train.any() and test.any() and not (train & test).any()
    assert not (train & (gt == 0)).any() and not (test & (gt == 0)).any()
    for c in range(1, 6):
        assert train[gt == c].any() and test[gt == c].any(), c
    # brute force: every test pixel is farther than `buffer` (Chebyshev) from every train pixel
    dist, _ = cKDTree(np.argwhere(train)).query(np.argwhere(test), p=np.inf)
    assert dist.min() > buffer
    # train pixels come in whole blocks: each training block holds all its labelled pixels
    for y in range(0, 96, 16):
        for x in range(0, 96, 16):
            t, lab = train[y : y + 16, x : x + 16], gt[y : y + 16, x : x + 16] > 0
            assert not t.any() or np.array_equal(t, lab)


def test_block_split_impossible():
    gt = np.zeros((20, 20), dtype=np.int64)
    gt[:, :10] = 1
    gt[:, 10:] = 2
    with pytest.raises(ValueError, match="no split"):
        block_split(gt, 0.3, block=20, buffer=2, attempts=3)


# ---------------------------------------------------------------------------
# metrics (values computed by hand)
# ---------------------------------------------------------------------------


def test_metrics_hand_computed():
    truth = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = confusion_matrix(truth, pred, 3)
    np.testing.assert_array_equal(m, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    s = classification_scores(m)
    assert s["overall_accuracy"] == pytest.approx(4 / 6)
    np.testing.assert_allclose(s["per_class_accuracy"], [2 / 3, 1 / 2, 1])
    assert s["average_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # rows (3, 2, 1), cols (2, 2, 2): p_e = 12/36 = 1/3, kappa = (2/3 - 1/3) / (2/3) = 1/2
    assert s["kappa"] == pytest.approx(0.5)
    # a class without test pixels is left out of AA
    s = classification_scores(np.array([[3, 1, 0], [0, 0, 0], [1, 0, 1]]))
    assert np.isnan(s["per_class_accuracy"][1])
    assert s["average_accuracy"] == pytest.approx((0.75 + 0.5) / 2)
    with pytest.raises(ValueError, match="pred labels"):
        confusion_matrix(truth, pred + 1, 3)


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


def test_extract_patches_and_reflect_pad():
    scene = torch.arange(2 * 6 * 7, dtype=torch.float32).reshape(2, 6, 7)
    padded = reflect_pad(scene, 2)
    assert padded.shape == (2, 10, 11)
    assert torch.equal(padded[:, 2:8, 2:9], scene)
    assert torch.equal(padded[:, 0, 2:9], scene[:, 2])  # reflect, edge not repeated
    rows, cols = torch.tensor([0, 5, 3]), torch.tensor([0, 6, 2])
    patches = extract_patches(padded, rows, cols, 5)
    for n in range(3):
        r, c = rows[n].item(), cols[n].item()
        assert torch.equal(patches[n], padded[:, r : r + 5, c : c + 5])
    with pytest.raises(ValueError, match="reflect padding"):
        reflect_pad(scene, 6)


def test_models_shapes_and_receptive_field():
    torch.manual_seed(0)
    fcn = HSIFCN(bands=5, num_classes=3, width=4).eval()
    for h, w in ((13, 17), (16, 16), (9, 30)):
        assert fcn(torch.randn(1, 5, h, w)).shape == (1, 3, h, w)
    patch = PatchCNN(bands=5, num_classes=3, window=9, width=4)
    assert patch(torch.randn(4, 5, 9, 9)).shape == (4, 3)
    rf = receptive_field(fcn, 5, size=64)
    assert 20 <= rf[0] <= 40 and rf[0] == rf[1]
    with pytest.raises(ValueError, match="window"):
        PatchCNN(5, 3, window=8)


def test_memprobe_measures(tmp_path):
    model = PatchCNN(bands=16, num_classes=3, window=7, width=4)
    # measured in a fresh process, as `fcnfast hsi` does: inside this long-lived test process
    # freed pages are already resident and the growth can even come out negative
    from fcnfast.hsi.cli import _peak_memory

    # one batch of 2048 patches alone is 2048 * 16 * 7 * 7 * 4 bytes = 6.1 MiB
    assert 3.0 < _peak_memory("patch", model, torch.randn(16, 64, 64)) < 500
    # FCN + dense CRF path of the probe, in this process (a fresh interpreter costs seconds; the
    # value here is only a growth of the high-water mark, so just check that it runs and is finite)
    from fcnfast.hsi import _memprobe

    fcn = HSIFCN(bands=16, num_classes=3, width=4)
    spec = {
        "method": "crf",
        "config": fcn.config,
        "state_dict": fcn.state_dict(),
        "scene": torch.randn(16, 48, 48),
        "threads": 1,
        "crf": {"iterations": 2},
    }
    assert np.isfinite(_memprobe.measure(spec))


# ---------------------------------------------------------------------------
# end to end: the `fcnfast hsi` subcommand
# ---------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser(prog="fcnfast")
    register_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "hsi",
        "--size",
        "40x36",
        "--bands",
        "8",
        "--classes",
        "3",
        "--seeds",
        "2",
        "--window",
        "7",
        "--epochs",
        "1",
        "--fcn-steps",
        "3",
        "--block",
        "10",
        "--pca",
        "6",
        "--width",
        "4",
        "--hidden",
        "8",
        "--no-memory",
        "--split",
        "block",
        "--out",
        str(out),
    ]
    args = _parse(argv)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| patch CNN, patch by patch | 7x7 |" in text
    assert "| patch CNN, convolutionalized (dense) | 7x7 |" in text
    assert "| HSI FCN |" in text and "| HSI FCN + dense CRF | whole scene |" in text and "±" in text
    assert "| 1 class 1 |" in text  # per-class rows carry the class names
    from PIL import Image

    run = out / "block"
    for name in ("gt.png", "pred_patch.png", "pred_dense.png", "pred_fcn.png", "pred_crf.png"):
        assert Image.open(run / name).size == (36, 40), name
    assert Image.open(run / "class_maps.png").size[0] > 400
    results = json.loads((run / "results.json").read_text())
    assert len(results["records"]) == 2
    for rec in results["records"]:
        assert rec["dense_agreement"] > 0.99
        for m in ("patch", "dense", "fcn", "crf"):
            assert 0 <= rec[m]["overall_accuracy"] <= 1
        assert rec["split"]["untrained"] == []
    assert (run / "results.md").read_text().startswith("# fcnfast hsi")
    assert sorted(p.name for p in run.glob("seed_*.json")) == ["seed_0.json", "seed_1.json"]
    # a rerun reuses the finished seeds and writes the report of every protocol under --out
    args = _parse(argv + ["--report", str(tmp_path / "rep" / "scene.md")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "seed 0: reused" in text and "seed 1: reused" in text
    report = (tmp_path / "rep" / "scene.md").read_text()
    assert (
        "## Protocol spatially disjoint blocks" in report
        and "![class maps, block](scene_block.png)" in report
    )
    assert (tmp_path / "rep" / "scene_block.png").exists()
    # changed settings do not reuse
    args = _parse(argv[:-2] + ["--fcn-steps", "2", "--seeds", "1", "--no-crf", "--out", str(out)])
    assert args.func(args) == 0
    assert "reused" not in capsys.readouterr().out


def test_cli_real_layout_names_and_disjoint(tmp_path, capsys):
    """A .mat pair with Indian Pines' usual keys (uint16), the disjoint protocol, a tiny class."""
    cube, gt = synthetic_scene(40, 40, bands=10, num_classes=16, seed=1, regions_per_class=1)
    gt[gt == 9] = 0
    gt[20:24, 20:25] = 9  # Oats: 20 px in one field
    scipy.io.savemat(
        tmp_path / "Indian_pines_corrected.mat",
        {"indian_pines_corrected": (cube * 1000).clip(0, 65535).astype(np.uint16)},
    )
    scipy.io.savemat(tmp_path / "Indian_pines_gt.mat", {"indian_pines_gt": gt.astype(np.uint8)})
    args = _parse(
        [
            "hsi",
            "--data",
            str(tmp_path / "Indian_pines_corrected.mat"),
            "--gt-path",
            str(tmp_path / "Indian_pines_gt.mat"),
            "--seeds",
            "1",
            "--window",
            "5",
            "--epochs",
            "1",
            "--fcn-steps",
            "2",
            "--width",
            "4",
            "--hidden",
            "8",
            "--no-memory",
            "--no-crf",
            "--out",
            str(tmp_path / "o"),
            "--buffer",
            "2",
            "--report",
            str(tmp_path / "o" / "report.md"),
        ]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "Indian Pines (AVIRIS), (b) spatially disjoint" in text
    assert "| 9 Oats | 20 | 5.0 |" in text and "| 16 Stone-Steel-Towers |" in text
    report = (tmp_path / "o" / "report.md").read_text()
    assert "HybridSN" in report and "Published results" in report  # known scene: quoted results
    assert "| random 10 %" not in report and "disjoint: FCN OA >= patch CNN + 3 points" in report


def test_cli_data_errors(tmp_path, capsys):
    args = _parse(["hsi", "--data", str(tmp_path / "nope.mat"), "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "nope.mat" in capsys.readouterr().err
    cube, gt = synthetic_scene(30, 30, bands=6, num_classes=3, seed=0)
    np.save(tmp_path / "cube.npy", cube)
    np.save(tmp_path / "gt.npy", gt)
    args = _parse(
        [
            "hsi",
            "--data",
            str(tmp_path),
            "--seeds",
            "1",
            "--window",
            "5",
            "--epochs",
            "1",
            "--fcn-steps",
            "1",
            "--width",
            "4",
            "--split",
            "random",
            "--no-memory",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert args.func(args) == 0
    assert (tmp_path / "o" / "random" / "pred_fcn.png").exists()


# ---------------------------------------------------------------------------
# known scenes: usual .mat keys, class names, uint8/uint16, v5 and v7.3 (issue 14)
# ---------------------------------------------------------------------------


def _save_v73(path, variables):
    """A MATLAB v7.3 file as MATLAB writes it: 512-byte header, then HDF5, arrays column-major."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        for key, value in variables.items():
            f[key] = np.asarray(value).transpose()
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, written by fcnfast's tests")


# (file stem, cube key, gt key, scene, number of classes) -- the layouts the public files use
LAYOUTS = [
    ("Indian_pines_corrected", "indian_pines_corrected", "indian_pines_gt", "indian_pines", 16),
    ("Indian_pines", "indian_pines", "indian_pines_gt", "indian_pines", 16),
    ("PaviaU", "paviaU", "paviaU_gt", "pavia_university", 9),
    ("Salinas_corrected", "salinas_corrected", "salinas_gt", "salinas", 16),
    ("Salinas", "salinas", "salinas_gt", "salinas", 16),
    ("Pavia", "pavia", "pavia_gt", "pavia_centre", 9),
]


@pytest.mark.parametrize("version", ["v5", "v7.3"])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
@pytest.mark.parametrize("stem,cube_key,gt_key,scene,k", LAYOUTS)
def test_known_scene_layouts(tmp_path, stem, cube_key, gt_key, scene, k, dtype, version):
    rng = np.random.default_rng(len(stem))
    high = 9604 if dtype == np.uint16 else 255  # uint16 radiances run to ~10^4 (Indian Pines)
    cube = rng.integers(0, high + 1, (9, 7, 5)).astype(dtype)
    cube[0, 0, 0] = high
    gt = rng.integers(0, k + 1, (9, 7)).astype(np.uint8)
    gt[0, 0] = k
    save = _save_v73 if version == "v7.3" else (lambda p, v: scipy.io.savemat(p, v))
    # separate cube / gt files, the public layout, plus a decoy 3-D array in the cube file
    save(tmp_path / (stem + ".mat"), {cube_key: cube, "decoy": np.zeros((2, 2, 9), dtype)})
    save(tmp_path / (stem + "_gt.mat"), {gt_key: gt})
    sc = load_scene(tmp_path / (stem + ".mat"), gt_path=tmp_path / (stem + "_gt.mat"))
    assert sc.scene == scene and (sc.cube_key, sc.gt_key) == (cube_key, gt_key)
    assert sc.cube.dtype == np.float32 and sc.gt.dtype == np.int64
    np.testing.assert_array_equal(sc.cube, cube.astype(np.float32))  # uint16 values kept exactly
    assert sc.cube.max() == high
    np.testing.assert_array_equal(sc.gt, gt)
    assert sc.class_names == list(KNOWN_SCENES[scene].classes) and len(sc.class_names) == k
    # one file holding both, found by the usual keys without naming them
    save(tmp_path / "both.mat", {gt_key: gt, cube_key: cube})
    both = load_scene(tmp_path / "both.mat")
    np.testing.assert_array_equal(both.cube, cube.astype(np.float32))
    np.testing.assert_array_equal(both.gt, gt)
    assert both.scene == scene


def test_class_name_tables():
    ip = KNOWN_SCENES["indian_pines"].classes
    assert len(ip) == 16 and ip[0] == "Alfalfa" and ip[6] == "Grass-pasture-mowed"
    assert (
        ip[8] == "Oats"
        and ip[14] == "Buildings-Grass-Trees-Drives"
        and ip[15] == "Stone-Steel-Towers"
    )
    pu = KNOWN_SCENES["pavia_university"].classes
    assert len(pu) == 9 and pu[0] == "Asphalt" and pu[1] == "Meadows" and pu[8] == "Shadows"
    sa = KNOWN_SCENES["salinas"].classes
    assert (
        len(sa) == 16 and sa[0] == "Brocoli_green_weeds_1" and sa[15] == "Vinyard_vertical_trellis"
    )
    pc = KNOWN_SCENES["pavia_centre"].classes
    assert len(pc) == 9 and pc[0] == "Water"
    for known in KNOWN_SCENES.values():
        assert len(set(known.classes)) == len(known.classes)
    assert class_names("pavia_university", 10)[-2:] == ["Shadows", "class 10"]
    assert class_names(None, 3) == ["class 1", "class 2", "class 3"]


def test_unknown_keys_get_generic_names(tmp_path):
    cube, gt = _tiny()
    scipy.io.savemat(tmp_path / "x.mat", {"data": cube, "labels": gt})
    sc = load_scene(tmp_path / "x.mat")
    assert sc.scene is None and sc.class_names == ["class %d" % i for i in range(1, gt.max() + 1)]


def test_pca_reduce():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 3)) * [5.0, 2.0, 0.5]
    mix = rng.standard_normal((3, 8))
    cube = (base @ mix + 0.01 * rng.standard_normal((300, 8))).reshape(20, 15, 8).astype(np.float32)
    out = pca_reduce(cube, 3)
    assert out.shape == (20, 15, 3) and out.dtype == np.float32
    flat = out.reshape(-1, 3).astype(np.float64)
    var = flat.var(axis=0)
    assert var[0] > var[1] > var[2] and abs(flat[:, 0].std() - 1) < 1e-4
    assert np.abs(np.corrcoef(flat.T) - np.eye(3)).max() < 1e-3  # uncorrelated components
    # same subspace as numpy's SVD, sign fixed (largest loading positive)
    x = cube.reshape(-1, 8) - cube.reshape(-1, 8).mean(0)
    _, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    ref = x @ vt[:3].T
    for i in range(3):
        assert abs(abs(np.corrcoef(ref[:, i], flat[:, i])[0, 1]) - 1) < 1e-4
    with pytest.raises(ValueError, match="components"):
        pca_reduce(cube, 0)


# ---------------------------------------------------------------------------
# the spatially disjoint split with tiny classes (issue 14)
# ---------------------------------------------------------------------------


def _check_disjoint(gt, train, test, buffer):
    assert not (train & test).any()
    assert not ((train | test) & (gt == 0)).any()
    # brute force: every test pixel farther than `buffer` (Chebyshev) from every training pixel,
    # i.e. no (2*buffer+1)^2 training patch contains a test pixel
    dist, _ = cKDTree(np.argwhere(train)).query(np.argwhere(test), p=np.inf)
    assert dist.min() > buffer


def _tiny_class_gt():
    _, gt = synthetic_scene(72, 72, bands=8, num_classes=4, seed=3)
    gt[gt == 4] = 1
    gt[30:34, 40:45] = 4  # 20 px in one compact field (like Oats)
    gt[60:65, 5:10] = 5  # 25 px
    gt[5:7, 60:63] = 6  # 6 px
    return gt


@pytest.mark.parametrize("buffer", [0, 2, 5])
def test_disjoint_split_tiny_classes(buffer):
    gt = _tiny_class_gt()
    for seed in range(3):
        train, test = disjoint_split(gt, 0.1, buffer=buffer, seed=seed, min_train=5)
        _check_disjoint(gt, train, test, buffer)
        rep = split_report(gt, train, test)
        counts = [int((gt == c).sum()) for c in range(1, 7)]
        # every class trains on max(5, round(10 %)) pixels (all but one for tiny ones)
        assert rep["train"] == [min(max(5, round(0.1 * n)), n - 1) for n in counts]
        assert rep["untrained"] == []
        assert [a + b + c for a, b, c in zip(rep["train"], rep["test"], rep["dropped"])] == counts
        # a class without test pixels is reported, and only then
        assert rep["untestable"] == [c for c in range(1, 7) if rep["test"][c - 1] == 0]
    # without a buffer every class keeps test pixels
    train, test = disjoint_split(gt, 0.1, buffer=0, seed=0)
    assert split_report(gt, train, test)["untestable"] == []
    with pytest.raises(ValueError, match="train_fraction"):
        disjoint_split(gt, 1.0)


def test_disjoint_split_is_compact_not_scattered():
    """Training pixels come in compact groups (tiles), unlike a random split's scattered pixels."""
    _, gt = synthetic_scene(96, 96, bands=8, num_classes=4, seed=1)
    train, _ = disjoint_split(gt, 0.1, buffer=3, seed=0, block=12)
    rtrain, _ = random_split(gt, 0.1, seed=0)
    from scipy import ndimage as ndi

    assert ndi.label(train)[1] * 4 < ndi.label(rtrain)[1]


def _real_gt():
    path = os.path.join(INDIAN_PINES, "indian_pines_gt.mat")
    if not os.path.exists(path):
        pytest.skip(
            "real Indian Pines ground truth not found at %s (set FCNFAST_INDIAN_PINES)" % path
        )
    return scipy.io.loadmat(path)["indian_pines_gt"].astype(np.int64)


def test_disjoint_split_real_indian_pines():
    gt = _real_gt()
    assert gt.shape == (145, 145) and int((gt > 0).sum()) == 10366
    for seed in range(5):
        train, test = disjoint_split(gt, 0.1, buffer=5, seed=seed, min_train=5)
        _check_disjoint(gt, train, test, 5)
        rep = split_report(gt, train, test)
        assert min(rep["train"]) >= 5 and rep["untrained"] == []
        # Oats (20 px) and Grass-pasture-mowed (26 px) train on 5 pixels each
        assert rep["train"][8] == 5 and rep["train"][6] == 5
        assert rep["untestable"] == [c for c in range(1, 17) if rep["test"][c - 1] == 0]
        assert sum(rep["test"]) > 4000  # the buffer drops pixels but leaves a real test set
    train, test = random_split(gt, 0.1, seed=0, min_train=5)
    assert split_report(gt, train, test)["train"][8] == 5 and not (train & test).any()


def test_confusion_matrix_convention_is_shared():
    # one convention for both packages: (truth, pred), rows = truth, columns = prediction
    from fcnfast import metrics

    truth = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = confusion_matrix(truth, pred, 3)
    assert m[0, 1] == 1 and m[1, 0] == 0  # a true 0 predicted as 1: row 0, column 1
    np.testing.assert_array_equal(m, metrics.confusion_matrix(truth, pred, 3).numpy())
    # the HSI matrix counts every pixel: no ignore label
    with pytest.raises(ValueError, match="truth|target"):
        confusion_matrix(np.array([0, 255]), np.array([0, 1]), 3)

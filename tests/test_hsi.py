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

from fcnfast.data.hsi import load_hsi, normalize_bands, synthetic_scene
from fcnfast.hsi import (HSIFCN, PatchCNN, block_split, classification_scores, confusion_matrix,
                         extract_patches, random_split, receptive_field, reflect_pad, register_cli)


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
    scipy.io.savemat(path, {"indian_pines_corrected": cube, "indian_pines_gt": gt,
                            "small": np.ones((2, 2, 2)), "note": np.ones((3, 3))})
    c, g = load_hsi(path)
    assert c.dtype == np.float32 and g.dtype == np.int64
    np.testing.assert_array_equal(c, cube)
    np.testing.assert_array_equal(g, gt)


def test_mat_named_keys_and_separate_gt_file(tmp_path):
    cube, gt = _tiny()
    other = cube[::-1].copy() * 2 + 1
    path = tmp_path / "scene.mat"
    scipy.io.savemat(path, {"paviaU": cube, "bigger": np.concatenate([other, other], axis=2),
                            "paviaU_gt": gt, "other_gt": (gt + 1) % 3})
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
    h5py = pytest.importorskip("h5py")
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
    assert pixel < 0.75, pixel            # single spectra are ambiguous ...
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
            t, lab = train[y:y + 16, x:x + 16], gt[y:y + 16, x:x + 16] > 0
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
        assert torch.equal(patches[n], padded[:, r:r + 5, c:c + 5])
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


# ---------------------------------------------------------------------------
# end to end: the `fcnfast hsi` subcommand
# ---------------------------------------------------------------------------

def _parse(argv):
    parser = argparse.ArgumentParser(prog="fcnfast")
    register_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    args = _parse(["hsi", "--size", "40x36", "--bands", "8", "--classes", "3", "--seeds", "2",
                   "--window", "7", "--epochs", "1", "--fcn-steps", "3", "--block", "10",
                   "--width", "4", "--no-memory", "--out", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| patch CNN, patch by patch | 7x7 |" in text
    assert "| patch CNN, convolutionalized (dense) | 7x7 |" in text
    assert "HSI FCN" in text and "±" in text
    from PIL import Image
    for name in ("gt.png", "split.png", "pred_patch_cnn.png", "pred_patch_cnn_dense.png",
                 "pred_fcn.png", "comparison.png"):
        im = Image.open(out / name)
        assert im.size[1] == 40, name
    assert Image.open(out / "gt.png").size == (36, 40)
    results = json.loads((out / "results.json").read_text())
    assert len(results["records"]) == 2
    for rec in results["records"]:
        assert rec["dense_agreement"] > 0.99
        for m in ("patch", "dense", "fcn"):
            assert 0 <= rec[m]["overall_accuracy"] <= 1
    assert (out / "results.md").read_text().startswith("# fcnfast hsi")


def test_cli_data_errors(tmp_path, capsys):
    args = _parse(["hsi", "--data", str(tmp_path / "nope.mat"), "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "nope.mat" in capsys.readouterr().err
    cube, gt = synthetic_scene(30, 30, bands=6, num_classes=3, seed=0)
    np.save(tmp_path / "cube.npy", cube)
    np.save(tmp_path / "gt.npy", gt)
    args = _parse(["hsi", "--data", str(tmp_path), "--seeds", "1", "--window", "5", "--epochs", "1",
                   "--fcn-steps", "1", "--width", "4", "--split", "random", "--no-memory",
                   "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    assert (tmp_path / "o" / "pred_fcn.png").exists()

"""Large CPU outputs come from fcnfast's cache of mapped blocks (csrc/cpu/large_output.h):
results must not depend on whether a block is fresh or reused, tensors made from
cached blocks must behave like any other (resize, views, gradients), and the cache
must stay within its bound."""

import pytest
import torch
from conftest import assert_close_scaled, compare_forward_backward, require_native

from fcnfast import _backend, ops, reference

CROP = (31, 31, 500, 500)  # FCN-8s upscore8 on a 500x500 image: 21 MB at C=21


def _ext():
    ext = _backend.extension()
    if ext is None or not hasattr(ext, "cpu_output_cache_stats"):
        pytest.skip("native extension without the large-output cache")
    return ext


def test_bilinear_reuses_blocks_and_stays_exact():
    require_native("bilinear_upsample2d")
    ext = _ext()
    before = ext.cpu_output_cache_stats()
    for seed in range(3):  # the 2nd and 3rd calls get the block the previous result freed
        x = torch.randn(1, 21, 70, 70, generator=torch.Generator().manual_seed(seed))
        out = ops.bilinear_upsample2d(x, 8, CROP)
        assert_close_scaled(out, reference.bilinear_upsample2d(x, 8, CROP))
        del out
    after = ext.cpu_output_cache_stats()
    assert after["hits"] >= before["hits"] + 2
    assert after["cached_blocks"] >= 1


def test_smaller_output_in_a_reused_larger_block():
    require_native("bilinear_upsample2d")
    _ext()
    big = ops.bilinear_upsample2d(torch.randn(1, 21, 70, 70), 8, CROP)
    del big  # a 22 MB block now waits in the cache
    x = torch.randn(1, 16, 70, 70)  # 16 MB: fits the cached block (at most 2x larger)
    out = ops.bilinear_upsample2d(x, 8, CROP)
    assert_close_scaled(out, reference.bilinear_upsample2d(x, 8, CROP))


def test_cached_output_tensor_behaves_like_any_other():
    require_native("bilinear_upsample2d")
    x = torch.randn(1, 21, 70, 70)
    out = ops.bilinear_upsample2d(x, 8, CROP)
    expected = reference.bilinear_upsample2d(x, 8, CROP)
    flat = out.view(-1)[:100].clone()
    out.resize_(2, 21, 500, 500)  # grows: the storage reallocates and keeps the prefix
    assert torch.equal(out.view(-1)[:100], flat)
    out.resize_(1, 21, 500, 500)
    assert_close_scaled(out, expected)
    assert out.is_contiguous() and out.device.type == "cpu"


def test_cache_disabled_returns_blocks(monkeypatch):
    require_native("bilinear_upsample2d")
    ext = _ext()
    monkeypatch.setenv("FCNFAST_CPU_OUTPUT_CACHE_MB", "0")
    out = ops.bilinear_upsample2d(torch.randn(1, 21, 70, 70), 8, CROP)
    del out  # read on release: nothing is kept
    assert ext.cpu_output_cache_stats()["cached_bytes"] == 0
    monkeypatch.delenv("FCNFAST_CPU_OUTPUT_CACHE_MB")
    out = ops.bilinear_upsample2d(torch.randn(1, 21, 70, 70), 8, CROP)
    del out
    assert ext.cpu_output_cache_stats()["cached_bytes"] > 0
    ext.cpu_output_cache_clear()
    assert ext.cpu_output_cache_stats()["cached_blocks"] == 0


def test_cache_bound(monkeypatch):
    require_native("bilinear_upsample2d")
    ext = _ext()
    ext.cpu_output_cache_clear()
    monkeypatch.setenv("FCNFAST_CPU_OUTPUT_CACHE_MB", "30")
    outs = [ops.bilinear_upsample2d(torch.randn(1, 21, 70, 70), 8, CROP) for _ in range(3)]
    del outs  # three 22 MB blocks freed; only one fits in 30 MB
    stats = ext.cpu_output_cache_stats()
    assert stats["cached_blocks"] == 1 and stats["cached_bytes"] <= 30 << 20


@pytest.mark.parametrize("hugepages", ["0", "1"])
def test_huge_page_advice_does_not_change_results(monkeypatch, hugepages):
    require_native("bilinear_upsample2d")
    ext = _ext()
    ext.cpu_output_cache_clear()  # fresh blocks: the advice applies to new mappings
    monkeypatch.setenv("FCNFAST_HUGE_PAGES", hugepages)
    x = torch.randn(1, 21, 70, 70)
    assert_close_scaled(
        ops.bilinear_upsample2d(x, 8, CROP), reference.bilinear_upsample2d(x, 8, CROP)
    )


def test_large_deconv_forward_backward_and_argmax():
    """conv_transpose2d's output and its backward's channels-last scratch, and
    upsample_argmax's int64 labels (batch 3: 6 MB) come from the cache too."""
    require_native("conv_transpose2d")
    require_native("upsample_argmax")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second round runs in reused blocks
        x = torch.randn(1, 21, 70, 70, generator=g, requires_grad=True)
        w = (torch.randn(21, 21, 16, 16, generator=g) * 0.05).requires_grad_()
        compare_forward_backward(
            lambda x, w: ops.conv_transpose2d(x, w, stride=8, crop=CROP),
            lambda x, w: reference.conv_transpose2d(x, w, stride=8, crop=CROP),
            [x, w],
        )
        s = torch.randn(3, 5, 70, 70, generator=g)
        # bit-for-bit the argmax of fcnfast's own upsampling (test_upsample_argmax.py)
        assert torch.equal(
            ops.upsample_argmax(s, 8, CROP), ops.bilinear_upsample2d(s, 8, CROP).argmax(1)
        )

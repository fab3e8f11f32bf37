// Row-at-a-time building blocks of the CPU bilinear kernels (bilinear_upsample2d,
// upsample_argmax, upsample_cross_entropy), following the arithmetic order of
// csrc/common/bilinear.h so the three ops see bitwise the same upsampled values.
//
// Forward (separable): an output row Y of the crop blends two horizontally
// interpolated input rows, h(lo_y) and h(lo_y + 1). `UpsampledRows` computes
// h(row) for all channels of one image and keeps the last two, so a thread
// walking consecutive output rows interpolates each input row once.
//
// Backward (a deterministic gather): input row i gathers the 2*scale crop rows
// of its band. `walk_bands` visits the crop rows of a range of input rows once,
// in ascending order, pushing each row into the (at most two) input-row
// accumulators it feeds; an accumulator is finished (horizontal gather) once its
// band is complete. The order of every sum is fixed by the geometry alone, so
// the result does not depend on threads or chunking.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/bilinear.h"
#include "../host/op_checks.h"
#include "large_output.h"
#include "parallel.h"

namespace fcnfast {

// the ops' argument checks and geometry: csrc/host/op_checks.h
using BilinearGeometry = UpsampleGeometry;

namespace cpu {

// Horizontal taps of the kept columns X = left + x, x in [0, width).
template <typename Acc>
struct ColumnTaps {
  std::vector<int32_t> pad_lo;  // index of the lower tap in a row padded by one zero each side
  std::vector<Acc> w_lo, w_hi;
  std::vector<int64_t> runs;  // starts of runs of columns sharing one pad_lo, then width

  ColumnTaps(int64_t left, int64_t width, int64_t scale, int64_t in_w)
      : pad_lo(width), w_lo(width), w_hi(width) {
    for (const auto x : c10::irange(width)) {
      const auto t = bilinear_taps<Acc>(left + x, scale, in_w);
      pad_lo[x] =
          static_cast<int32_t>(t.lo + 1);  // in [0, in_w]; padded[0] and padded[in_w+1] are 0
      w_lo[x] = t.w_lo;
      w_hi[x] = t.w_hi;
      if (x == 0 || pad_lo[x] != pad_lo[x - 1]) runs.push_back(x);
    }
    runs.push_back(width);
  }
};

// h(row) for one input row: fma(in[lo], w_lo, in[lo+1] * w_hi), a missing tap read as the
// zero padding (bitwise the same as leaving the term out, see bilinear.h). Output
// columns come in runs of up to `scale` sharing one (lo, lo+1) pair, so the inner
// loop broadcasts the pair against contiguous phase weights (vectorises for s >= 8).
template <typename scalar_t, typename Acc>
void interpolate_row(const scalar_t* in, int64_t in_w, const ColumnTaps<Acc>& cols, Acc* padded,
                     Acc* out) {
  padded[0] = Acc(0);
  for (const auto j : c10::irange(in_w)) padded[j + 1] = static_cast<Acc>(in[j]);
  padded[in_w + 1] = Acc(0);
  const int32_t* lo = cols.pad_lo.data();
  const Acc* __restrict wl = cols.w_lo.data();
  const Acc* __restrict wh = cols.w_hi.data();
  for (size_t r = 0; r + 1 < cols.runs.size(); ++r) {
    const int64_t begin = cols.runs[r], end = cols.runs[r + 1];
    const Acc a = padded[lo[begin]], b = padded[lo[begin] + 1];
    Acc* __restrict o = out;
    for (int64_t k = begin; k < end; ++k) o[k] = bl_fma(a, wl[k], b * wh[k]);
  }
}

// out = fma(lo, w_lo, hi * w_hi) with a missing row (nullptr) left out.
template <typename Acc, typename Out>
void blend_rows(const Acc* __restrict lo, Acc w_lo, const Acc* __restrict hi, Acc w_hi, int64_t n,
                Out* __restrict out) {
  if (lo && hi) {
    for (int64_t x = 0; x < n; ++x) out[x] = static_cast<Out>(bl_fma(lo[x], w_lo, hi[x] * w_hi));
  } else if (lo) {
    for (int64_t x = 0; x < n; ++x) out[x] = static_cast<Out>(lo[x] * w_lo);
  } else if (hi) {
    for (int64_t x = 0; x < n; ++x) out[x] = static_cast<Out>(hi[x] * w_hi);
  } else {
    std::fill(out, out + n, Out(0));
  }
}

// blend_rows writing a large float output with non-temporal stores: the output
// of a big upsampling does not fit in cache, and streaming it skips the
// read-for-ownership of every line (the op is bound by this write). The caller
// issues stream_fence() before the data is read. Same values as blend_rows.
inline void blend_rows_stream(const float* __restrict lo, float w_lo, const float* __restrict hi,
                              float w_hi, int64_t n, float* __restrict out) {
#if defined(__AVX2__) && defined(__FMA__)
  if (lo && hi) {
    int64_t x = 0;
    for (; x < n && (reinterpret_cast<uintptr_t>(out + x) & 31) != 0; ++x) {
      out[x] = bl_fma(lo[x], w_lo, hi[x] * w_hi);
    }
    const __m256 vl = _mm256_set1_ps(w_lo), vh = _mm256_set1_ps(w_hi);
    for (; x + 8 <= n; x += 8) {
      const __m256 v =
          _mm256_fmadd_ps(_mm256_loadu_ps(lo + x), vl, _mm256_mul_ps(_mm256_loadu_ps(hi + x), vh));
      _mm256_stream_ps(out + x, v);
    }
    for (; x < n; ++x) out[x] = bl_fma(lo[x], w_lo, hi[x] * w_hi);
    return;
  }
#endif
  blend_rows(lo, w_lo, hi, w_hi, n, out);
}

// Other types: ordinary stores.
template <typename Acc, typename Out>
void blend_rows_stream(const Acc* lo, Acc w_lo, const Acc* hi, Acc w_hi, int64_t n, Out* out) {
  blend_rows(lo, w_lo, hi, w_hi, n, out);
}

// The horizontally interpolated rows h(row) of all C channels of one image
// (C x width, row-major), the last two kept.
template <typename scalar_t, typename Acc>
class UpsampledRows {
 public:
  UpsampledRows(const scalar_t* x, int64_t channels, int64_t in_h, int64_t in_w,
                const ColumnTaps<Acc>& cols)
      : x_(x),
        channels_(channels),
        in_h_(in_h),
        in_w_(in_w),
        width_(cols.pad_lo.size()),
        cols_(cols),
        padded_(in_w + 2),
        data_(2 * channels * width_) {}

  // Rows of input row `row` of image `n`; nullptr when row lies outside the input.
  const Acc* get(int64_t n, int64_t row) {
    if (row < 0 || row >= in_h_) return nullptr;
    const int slot = static_cast<int>(row & 1);
    Acc* dst = data_.data() + slot * channels_ * width_;
    if (key_[slot][0] != n || key_[slot][1] != row) {
      for (const auto c : c10::irange(channels_)) {
        const scalar_t* src = x_ + ((n * channels_ + c) * in_h_ + row) * in_w_;
        interpolate_row(src, in_w_, cols_, padded_.data(), dst + c * width_);
      }
      key_[slot][0] = n;
      key_[slot][1] = row;
    }
    return dst;
  }

  int64_t width() const { return width_; }

 private:
  const scalar_t* x_;
  int64_t channels_, in_h_, in_w_, width_;
  const ColumnTaps<Acc>& cols_;
  std::vector<Acc> padded_, data_;
  int64_t key_[2][2] = {{-1, -1}, {-1, -1}};
};

// The upsampled values of full output row Y of image n for all channels:
// channel c's row is written to buffer + c * channel_stride (stride 0 reuses
// one row) and passed to use(c, values). The values are rounded through
// scalar_t, so they equal bilinear_upsample2d's output bitwise.
template <typename scalar_t, typename Acc, typename Use>
void upsampled_row(UpsampledRows<scalar_t, Acc>& rows, int64_t n, int64_t Y, int64_t scale,
                   int64_t in_h, int64_t channels, Acc* buffer, int64_t channel_stride, Use&& use) {
  const auto ty = bilinear_taps<Acc>(Y, scale, in_h);
  const Acc* lo = ty.has_lo ? rows.get(n, ty.lo) : nullptr;
  const Acc* hi = ty.has_hi ? rows.get(n, ty.lo + 1) : nullptr;
  const int64_t width = rows.width();
  for (const auto c : c10::irange(channels)) {
    Acc* dst = buffer + c * channel_stride;
    blend_rows(lo ? lo + c * width : nullptr, ty.w_lo, hi ? hi + c * width : nullptr, ty.w_hi,
               width, dst);
    if constexpr (!std::is_same_v<scalar_t, Acc>) {
      for (int64_t x = 0; x < width; ++x) dst[x] = static_cast<Acc>(static_cast<scalar_t>(dst[x]));
    }
    use(c, static_cast<const Acc*>(dst));
  }
}

// Column-gather weights of the backward: input column j gathers padded
// accumulator entries j*scale + t, t in [0, 2*scale), with weight w(t).
template <typename Acc>
std::vector<Acc> tap_weights(int64_t scale) {
  std::vector<Acc> w(2 * scale);
  for (const auto t : c10::irange(2 * scale)) w[t] = bilinear_tap_weight<Acc>(t, scale);
  return w;
}

// Horizontal gather of one accumulated row: acc has the full output width
// (in_w + 1) * scale with zeros outside the crop (fma(w, 0, s) == s, so the
// zeros change nothing and the order is the documented ascending X).
template <typename Acc, typename Out>
void gather_columns(const Acc* acc, const std::vector<Acc>& w, int64_t scale, int64_t in_w,
                    Acc* scratch, Out* out) {
  // t outer, j inner: the same per-column order, but independent chains side by side
  std::fill(scratch, scratch + in_w, Acc(0));
  for (int64_t t = 0; t < 2 * scale; ++t) {
    const Acc wt = w[t];
    const Acc* a = acc + t;
    for (int64_t j = 0; j < in_w; ++j) scratch[j] = bl_fma(wt, a[j * scale], scratch[j]);
  }
  for (int64_t j = 0; j < in_w; ++j) out[j] = static_cast<Out>(scratch[j]);
}

// Visits the crop rows feeding input rows [i0, i1) of one image (crop rows
// [top, top + height) of the full output), each once, ascending.
//   prepare(Y)                 called once per full row Y before its pushes
//   push(Y, weight, acc)       acc += weight * row(Y) for input row (acc's owner)
//   finish(i, acc)             input row i is complete
//   reset(acc)                 zero an accumulator before its first push
// Rows of [i0, i1) no crop row feeds are never finished (BandGather pre-zeroes them).
template <typename Acc, typename Prepare, typename Push, typename Finish, typename Reset>
void walk_bands(int64_t i0, int64_t i1, int64_t in_h, int64_t scale, int64_t top, int64_t height,
                Acc* slots[2], Prepare&& prepare, Push&& push, Finish&& finish, Reset&& reset) {
  const int64_t y_begin = std::max(i0 * scale, top);
  const int64_t y_end = std::min((i1 + 1) * scale, top + height);
  int64_t held[2] = {-1, -1};
  for (int64_t Y = y_begin; Y < y_end; ++Y) {
    const auto taps = bilinear_taps<Acc>(Y, scale, in_h);
    prepare(Y);
    for (int k = 0; k < 2; ++k) {
      const int64_t row = taps.lo + k;
      if (row < i0 || row >= i1 || row >= in_h) continue;
      const int slot = static_cast<int>(row & 1);
      if (held[slot] != row) {
        if (held[slot] >= 0) finish(held[slot], slots[slot]);
        reset(slots[slot]);
        held[slot] = row;
      }
      push(Y, k == 0 ? taps.w_lo : taps.w_hi, slots[slot]);
    }
  }
  const int first =
      held[0] >= 0 && held[1] >= 0 ? (held[0] < held[1] ? 0 : 1) : (held[0] >= 0 ? 0 : 1);
  if (held[first] >= 0) finish(held[first], slots[first]);
  if (held[1 - first] >= 0) finish(held[1 - first], slots[1 - first]);
}

// The gradient w.r.t. x of a crop-sized row source, for a chunk of input rows:
// grad_x row i of channel c = column gather of the fma-accumulated band rows.
// Scratch (two full-width accumulators per channel) is owned per thread.
template <typename Acc>
class BandGather {
 public:
  BandGather(int64_t channels, int64_t in_h, int64_t in_w, int64_t scale, const Crop& crop,
             int64_t full_w)
      : channels_(channels),
        in_h_(in_h),
        in_w_(in_w),
        scale_(scale),
        full_w_(full_w),
        crop_(crop),
        weights_(tap_weights<Acc>(scale)),
        storage_(2 * channels * full_w, Acc(0)),
        scratch_(in_w) {}

  // Input rows [begin, end) of the flattened (n, i) index, written to out
  // (N x C x in_h x in_w; every row of the range is written, so out may be uninitialised).
  // prepare(n, Y) runs once per full output row Y before source(n, Y, c) is asked for channel c's
  // crop row (width values).
  template <typename Out, typename Prepare, typename Source>
  void run(int64_t begin, int64_t end, Out* out, Prepare&& prepare, Source&& source) {
    Acc* slots[2] = {storage_.data(), storage_.data() + channels_ * full_w_};
    const int64_t left = crop_.left, width = crop_.width;
    for (int64_t r = begin; r < end;) {
      const int64_t n = r / in_h_, i0 = r % in_h_, i1 = std::min(in_h_, i0 + (end - r));
      Out* out_n = out + n * channels_ * in_h_ * in_w_;
      for (int64_t c = 0; c < channels_; ++c) {  // rows no crop row feeds stay zero
        std::fill_n(out_n + (c * in_h_ + i0) * in_w_, (i1 - i0) * in_w_, Out(0));
      }
      walk_bands<Acc>(
          i0, i1, in_h_, scale_, crop_.top, crop_.height, slots, [&](int64_t Y) { prepare(n, Y); },
          [&](int64_t Y, Acc wy, Acc* acc) {
            for (int64_t c = 0; c < channels_; ++c) {
              const auto* __restrict src = source(n, Y, c);
              Acc* __restrict a = acc + c * full_w_ + left;
              for (int64_t x = 0; x < width; ++x) a[x] = bl_fma(wy, static_cast<Acc>(src[x]), a[x]);
            }
          },
          [&](int64_t i, const Acc* acc) {
            for (int64_t c = 0; c < channels_; ++c) {
              gather_columns(acc + c * full_w_, weights_, scale_, in_w_, scratch_.data(),
                             out_n + (c * in_h_ + i) * in_w_);
            }
          },
          [&](Acc* acc) {
            for (int64_t c = 0; c < channels_; ++c)
              std::fill_n(acc + c * full_w_ + left, width, Acc(0));
          });
      r += i1 - i0;
    }
  }

 private:
  int64_t channels_, in_h_, in_w_, scale_, full_w_;
  Crop crop_;
  std::vector<Acc> weights_, storage_, scratch_;
};

}  // namespace cpu
}  // namespace fcnfast

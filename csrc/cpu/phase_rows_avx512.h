// conv_transpose2d forward for FCN's upsampling geometry on AVX-512: every
// output row computed directly in its final place (no phase-convolution result
// to permute afterwards).
//
// Geometry (kernel = taps * stride on both axes, dilation 1, groups 1): a
// full-output position Y + padding = qY * S + rY takes the input rows
// qY - m with kernel rows rY + m * S, m < taps; the same along the width. So
//   out[co, y, x] = bias[co] + sum_{ci, my, mx} W[ci, co, rY + my S_h, rX + mx S_w]
//                                               * x[ci, qY - my, qX - mx]
// Sixteen consecutive output columns (one zmm) starting at a multiple of 16
// have the same phase pattern rX(lane) whenever 16 % S_w == 0, so for each
// (co, rY, ci, my, mx) the weights of a vector are one fixed 16-lane pattern
// (expanded once per call), and the inputs are a lane permutation of 16
// consecutive input columns (built once per block row qY, shared by its S_h
// output rows and all output channels). Each output vector is then a dot
// product of length C_in * taps_h * taps_w over FMAs with no wasted lanes; it
// is computed in (up to) 6-channel x 4-vector register blocks into a row
// buffer, and each finished output row is written once (streaming stores for
// large outputs).
//
// Summation order is fixed (bias, then ci, my, mx in order): deterministic.
// Inputs outside x read zeros from a padded copy; every product is a term of
// the reference sum or 0 * a finite weight (callers route non-finite weights
// elsewhere).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/conv_transpose2d.h"
#include "isa.h"
#include "large_output.h"
#include "parallel.h"

#if defined(FCNFAST_HAVE_AVX512_KERNELS)
#include <immintrin.h>
#endif

namespace fcnfast {
namespace cpu {

// Whether phase_rows_forward handles this geometry (dtype checked by the caller).
// Beyond kMaxDepth (C_in * taps_h * taps_w) the per-row working set outgrows
// the caches and oneDNN's blocked phase convolution is faster (FCN k16 s8 on
// 500x500, 2 threads: C=32 6.9 vs 8.9 ms, C=40 14-17 vs 11-17 ms).
inline bool phase_rows_eligible(const ConvTranspose2dGeom& g) {
  constexpr int64_t kMaxDepth = 128;
  if (g.groups != 1 || g.dil_h != 1 || g.dil_w != 1) return false;
  if (g.kernel_h % g.stride_h != 0 || g.kernel_w % g.stride_w != 0) return false;
  if (16 % g.stride_w != 0) return false;
  const int64_t depth = g.in_channels * (g.kernel_h / g.stride_h) * (g.kernel_w / g.stride_w);
  return depth <= kMaxDepth && g.crop_h > 0 && g.crop_w > 0 && use_avx512();
}

#if defined(FCNFAST_HAVE_AVX512_KERNELS)
namespace phase_rows {

constexpr int64_t kLanes = 16;
constexpr int kChunkBlock = 4;    // output vectors per register block (along the row)
constexpr int kChannelBlock = 6;  // output channels per register block: 24 accumulators

struct Plan {
  int64_t sh, sw, th, tw;         // strides and taps
  int64_t depth;                  // cin * th * tw: the dot-product length
  int64_t chunks, chunks_padded;  // 16-column vectors per output row (padded to kChunkBlock)
  int64_t q_lo, q_hi;             // block rows of the kept output rows (inclusive)
  int64_t pad_y0, pad_x0;         // input coordinates of the padded copy's origin
  int64_t pad_h, pad_w;           // padded copy size
  int64_t d0;                     // input column of lane 0 of chunk 0 (before the tap shift)
  int rel[kLanes];                // lane -> input column offset from d0 (within a chunk)
  int rx[kLanes];                 // lane -> column phase
};

inline Plan make_plan(const ConvTranspose2dGeom& g) {
  Plan p;
  p.sh = g.stride_h;
  p.sw = g.stride_w;
  p.th = g.kernel_h / g.stride_h;
  p.tw = g.kernel_w / g.stride_w;
  p.depth = g.in_channels * p.th * p.tw;
  p.chunks = (g.crop_w + kLanes - 1) / kLanes;
  p.chunks_padded = (p.chunks + kChunkBlock - 1) / kChunkBlock * kChunkBlock;
  p.q_lo = (g.crop_top + g.pad_h) / p.sh;
  p.q_hi = (g.crop_top + g.crop_h - 1 + g.pad_h) / p.sh;
  const int64_t base = g.crop_left + g.pad_w;  // column X + padding of output column 0
  p.d0 = base / p.sw;
  for (int l = 0; l < kLanes; ++l) {
    p.rel[l] = static_cast<int>((base + l) / p.sw - p.d0);
    p.rx[l] = static_cast<int>((base + l) % p.sw);
  }
  // chunk j, tap mx reads input columns d0 + j * 16 / S_w - mx + [0, 16)
  p.pad_x0 = p.d0 - (p.tw - 1);
  p.pad_w = (p.chunks_padded - 1) * (kLanes / p.sw) + kLanes + p.tw - 1;
  p.pad_y0 = p.q_lo - (p.th - 1);
  p.pad_h = p.q_hi - p.q_lo + p.th;
  return p;
}

// x (N, C, H, W) copied into (N, C, pad_h, pad_w) at the plan's origin, zeros
// outside x.
inline at::Tensor padded_input(const at::Tensor& x, const Plan& p) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::zeros({N, C, p.pad_h, p.pad_w}, x.options());
  const int64_t y0 = std::max<int64_t>(p.pad_y0, 0), y1 = std::min(p.pad_y0 + p.pad_h, H);
  const int64_t x0 = std::max<int64_t>(p.pad_x0, 0), x1 = std::min(p.pad_x0 + p.pad_w, W);
  if (y1 > y0 && x1 > x0)
    out.slice(2, y0 - p.pad_y0, y1 - p.pad_y0)
        .slice(3, x0 - p.pad_x0, x1 - p.pad_x0)
        .copy_(x.slice(2, y0, y1).slice(3, x0, x1));
  return out;
}

// wexp[((co * S_h + rY) * depth + k) * 16 + lane], k = (ci * th + my) * tw + mx:
// W[ci, co, rY + my S_h, rx(lane) + mx S_w].
inline std::vector<float> expanded_weights(const float* w, const ConvTranspose2dGeom& g,
                                           const Plan& p) {
  const int64_t cout = g.out_channels, kh = g.kernel_h, kw = g.kernel_w;
  std::vector<float> wexp(cout * p.sh * p.depth * kLanes);
  at::parallel_for(0, cout * p.sh, 1, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const int64_t co = u / p.sh, ry = u % p.sh;
      float* dst = wexp.data() + u * p.depth * kLanes;
      for (int64_t ci = 0; ci < g.in_channels; ++ci)
        for (int64_t my = 0; my < p.th; ++my)
          for (int64_t mx = 0; mx < p.tw; ++mx, dst += kLanes) {
            const float* row = w + ((ci * cout + co) * kh + ry + my * p.sh) * kw + mx * p.sw;
            for (int l = 0; l < kLanes; ++l) dst[l] = row[p.rx[l]];
          }
    }
  });
  return wexp;
}

// in_vec[(k * chunks_padded + j) * 16 + lane] = x[ci, qY - my, d0 + j 16/S_w + rel(lane) - mx]
// for block row qY of image n (from the padded copy).
__attribute__((target("avx512f"))) inline void input_vectors(const float* xpad_n,
                                                             const ConvTranspose2dGeom& g,
                                                             const Plan& p, int64_t qy,
                                                             float* in_vec) {
  const __m512i rel = _mm512_loadu_si512(p.rel);
  const int64_t step = kLanes / p.sw;
  for (int64_t ci = 0; ci < g.in_channels; ++ci)
    for (int64_t my = 0; my < p.th; ++my) {
      const float* row = xpad_n + (ci * p.pad_h + (qy - my - p.pad_y0)) * p.pad_w;
      for (int64_t mx = 0; mx < p.tw; ++mx) {
        const int64_t k = (ci * p.th + my) * p.tw + mx;
        const float* src = row + (p.d0 - mx - p.pad_x0);
        float* dst = in_vec + k * p.chunks_padded * kLanes;
        // (the zero-masking form with a full mask: GCC 12 warns about the
        // unmasked intrinsic's undefined pass-through operand)
        for (int64_t j = 0; j < p.chunks_padded; ++j)
          _mm512_storeu_ps(
              dst + j * kLanes,
              _mm512_maskz_permutexvar_ps(__mmask16(0xFFFF), rel, _mm512_loadu_ps(src + j * step)));
      }
    }
}

// Channels co0 .. co0 + CB of one output row y, vectors [j0, j0 + 4), into
// rows[c * row_len + x] (row_len = chunks_padded * 16).
template <int CB>
__attribute__((target("avx512f"))) void row_block(const float* wexp_ry, const float* in_vec,
                                                  const Plan& p, int64_t co0, int64_t j0,
                                                  const float* bias, float* rows) {
  __m512 acc[CB][kChunkBlock];
#pragma GCC unroll 6
  for (int c = 0; c < CB; ++c) {
    const __m512 b = _mm512_set1_ps(bias ? bias[co0 + c] : 0.0f);
#pragma GCC unroll 4
    for (int j = 0; j < kChunkBlock; ++j) acc[c][j] = b;
  }
  const int64_t wstride = p.sh * p.depth * kLanes;  // next output channel, same rY
  const float* w = wexp_ry + co0 * wstride;
  const float* in = in_vec + j0 * kLanes;
  for (int64_t k = 0; k < p.depth; ++k) {
    __m512 v[kChunkBlock];
#pragma GCC unroll 4
    for (int j = 0; j < kChunkBlock; ++j) v[j] = _mm512_loadu_ps(in + j * kLanes);
#pragma GCC unroll 6
    for (int c = 0; c < CB; ++c) {
      const __m512 wv = _mm512_loadu_ps(w + c * wstride + k * kLanes);
#pragma GCC unroll 4
      for (int j = 0; j < kChunkBlock; ++j) acc[c][j] = _mm512_fmadd_ps(wv, v[j], acc[c][j]);
    }
    in += p.chunks_padded * kLanes;
  }
  const int64_t row_len = p.chunks_padded * kLanes;
#pragma GCC unroll 6
  for (int c = 0; c < CB; ++c)
#pragma GCC unroll 4
    for (int j = 0; j < kChunkBlock; ++j)
      _mm512_storeu_ps(rows + c * row_len + (j0 + j) * kLanes, acc[c][j]);
}

using RowBlockFn = void (*)(const float*, const float*, const Plan&, int64_t, int64_t, const float*,
                            float*);

}  // namespace phase_rows
#endif

// out (N, C_out, crop_h, crop_w) fp32 contiguous; x (N, C_in, H, W) and
// weight (C_in, C_out, kh, kw) fp32 contiguous; bias (C_out) or null.
// Requires phase_rows_eligible(g).
inline void phase_rows_forward(const ConvTranspose2dGeom& g, const at::Tensor& x,
                               const at::Tensor& weight, const float* bias, at::Tensor& out) {
#if defined(FCNFAST_HAVE_AVX512_KERNELS)
  using namespace phase_rows;
  const Plan p = make_plan(g);
  const int64_t N = x.size(0), cout = g.out_channels, oh = g.crop_h, ow = g.crop_w;
  const at::Tensor xpad = padded_input(x, p);
  const std::vector<float> wexp = expanded_weights(weight.const_data_ptr<float>(), g, p);
  const float* xp = xpad.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  static constexpr RowBlockFn kBlocks[kChannelBlock] = {
      &row_block<1>, &row_block<2>, &row_block<3>, &row_block<4>, &row_block<5>, &row_block<6>};
  // channel blocks of near-equal size (21 channels: 6 + 5 + 5 + 5, not 6 x 3 + 3)
  const int64_t channel_blocks = (cout + kChannelBlock - 1) / kChannelBlock;
  std::vector<int64_t> block_start(channel_blocks + 1, 0);
  for (int64_t i = 0; i < channel_blocks; ++i)
    block_start[i + 1] = block_start[i] + cout / channel_blocks + (i < cout % channel_blocks);
  const bool stream = use_streaming_stores(out);
  const int64_t row_len = p.chunks_padded * kLanes;
  const int64_t rows_q = p.q_hi - p.q_lo + 1;
  const int64_t work = p.sh * cout * p.chunks_padded * kLanes * p.depth;
  // one unit = one block row qY of one image: its input vectors, then its S_h rows
  at::parallel_for(0, N * rows_q, grain_for(work, kConvMinWork), [&](int64_t b, int64_t e) {
    std::vector<float> in_vec(p.depth * p.chunks_padded * kLanes);
    std::vector<float> rows(kChannelBlock * row_len);
    for (int64_t u = b; u < e; ++u) {
      const int64_t n = u / rows_q, qy = p.q_lo + u % rows_q;
      input_vectors(xp + n * g.in_channels * p.pad_h * p.pad_w, g, p, qy, in_vec.data());
      for (int64_t ry = 0; ry < p.sh; ++ry) {
        const int64_t y = qy * p.sh + ry - g.pad_h - g.crop_top;
        if (y < 0 || y >= oh) continue;
        const float* wexp_ry = wexp.data() + ry * p.depth * kLanes;
        float* out_row = op + (n * cout * oh + y) * ow;
        for (int64_t i = 0; i < channel_blocks; ++i) {
          const int64_t co0 = block_start[i];
          const int cb = static_cast<int>(block_start[i + 1] - co0);
          for (int64_t j0 = 0; j0 < p.chunks_padded; j0 += kChunkBlock)
            kBlocks[cb - 1](wexp_ry, in_vec.data(), p, co0, j0, bias, rows.data());
          for (int c = 0; c < cb; ++c)
            store_row(out_row + (co0 + c) * oh * ow, rows.data() + c * row_len, ow, stream);
        }
      }
    }
    stream_fence();
  });
#else
  (void)g, (void)x, (void)weight, (void)bias, (void)out;
  TORCH_INTERNAL_ASSERT(false, "fcnfast: AVX-512 kernels not compiled in");
#endif
}

}  // namespace cpu
}  // namespace fcnfast

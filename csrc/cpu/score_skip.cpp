// CPU kernels for score_skip, the fused FCN skip step:
//   out = coarse + F.conv2d(feature * scale, weight, bias)[..., oy:oy+H, ox:ox+W]
// The 1x1 score convolution runs only on the kept H x W window: per image it is
// a 1x1 convolution (a GEMM (K x C) @ (C x H*W)) on the window, with `scale`
// folded into the weight. In fp32 accumulation on an AVX-512 CPU the GEMM is
// fcnfast's own register-blocked kernel, fed by packed window panels and
// writing coarse + scores + bias straight into the output (FCN's K = 21..150
// rows are too few for oneDNN to reach the FMA peak, and ATen would first need
// the window copied out); otherwise, and with FCNFAST_NO_AVX512=1, ATen's
// convolution (oneDNN) on the gathered window, then the add. The backward is
// the same algebra transposed: ATen's convolution backward on the window, then
// a gather into grad_feature (zero outside the window); deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../host/op_checks.h"
#include "isa.h"
#include "parallel.h"

namespace fcnfast {
namespace {

using Window = ScoreSkipWindow;  // csrc/host/op_checks.h

// (K, C, 1, 1) weight in the compute dtype with the feature scale folded in.
at::Tensor scaled_weight(const at::Tensor& weight, double scale, at::ScalarType acc_type) {
  return (weight.to(acc_type) * scale).contiguous();
}

// buf[c, (y - y0) * w + x] = feature_n[c, oy + y, ox + x] for window rows [y0, y1)
// and channels [c0, c1).
template <typename scalar_t, typename acc_t>
void gather_window(const scalar_t* feat_n, const Window& win, int64_t y0, int64_t y1, int64_t c0,
                   int64_t c1, acc_t* buf) {
  const int64_t cols = (y1 - y0) * win.w;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t y = y0; y < y1; ++y) {
      const scalar_t* src = feat_n + (c * win.fh + win.oy + y) * win.fw + win.ox;
      acc_t* dst = buf + c * cols + (y - y0) * win.w;
      for (int64_t x = 0; x < win.w; ++x) dst[x] = static_cast<acc_t>(src[x]);
    }
}

// grad_feature_n[c, :, :] for channels [c0, c1): the window from dwin (C, h*w),
// zeros elsewhere (every element written once).
template <typename scalar_t, typename acc_t>
void scatter_window(const acc_t* dwin, const Window& win, int64_t c0, int64_t c1, scalar_t* gf_n) {
  for (int64_t c = c0; c < c1; ++c) {
    scalar_t* plane = gf_n + c * win.fh * win.fw;
    std::fill(plane, plane + win.oy * win.fw, scalar_t(0));
    for (int64_t y = 0; y < win.h; ++y) {
      scalar_t* row = plane + (win.oy + y) * win.fw;
      const acc_t* src = dwin + (c * win.h + y) * win.w;
      std::fill(row, row + win.ox, scalar_t(0));
      for (int64_t x = 0; x < win.w; ++x) row[win.ox + x] = static_cast<scalar_t>(src[x]);
      std::fill(row + win.ox + win.w, row + win.fw, scalar_t(0));
    }
    std::fill(plane + (win.oy + win.h) * win.fw, plane + win.fh * win.fw, scalar_t(0));
  }
}

// The windows of all images, (N, C, h, w) contiguous in the compute dtype.
template <typename scalar_t, typename acc_t>
at::Tensor gather_windows(const at::Tensor& feature, const Window& win) {
  at::Tensor out = at::empty({win.batch, win.channels, win.h, win.w},
                             feature.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* fp = feature.data_ptr<scalar_t>();
  acc_t* op = out.data_ptr<acc_t>();
  const int64_t C = win.channels, plane = win.h * win.w;
  at::parallel_for(
      0, win.batch * C, cpu::grain_for(plane, cpu::kWindowMinWork), [&](int64_t b, int64_t e) {
        for (int64_t nc = b; nc < e; ++nc) {
          const int64_t n = nc / C, c = nc % C;
          gather_window(fp + n * C * win.fh * win.fw, win, 0, win.h, c, c + 1, op + n * C * plane);
        }
      });
  return out;
}

// ---------------------------------------------------------------------------
// The fused window GEMM (fp32 accumulation, AVX-512):
//   out[n, k, p] = coarse[n, k, p] + (sum_c wt[c, k] * window_n[c, p]) + bias[k]
// over the window's pixels p = y * w + x (the layout of coarse and out). The
// window is packed a panel at a time -- kPanelPixels pixels of every channel,
// block by block, in the L2 cache -- and each 32-pixel block of the panel meets
// all K rows of the weight, 12 rows per register block; the result goes
// straight into `out` with coarse and the bias added. Compiled for AVX-512 by
// function attribute and entered only after a runtime CPU check, so the
// extension keeps its AVX2 baseline.
//
// Why packed: the earlier version gathered the whole (C, h*w) window first
// and streamed 32-pixel columns out of it, C rows apart; at pool3 (256 x 70x70,
// a 5 MB buffer) every block then read 256 scattered cache lines from L3, and
// single-threaded the op ran at a half to a fifth of ATen's convolution speed.
// ---------------------------------------------------------------------------

#if defined(FCNFAST_HAVE_AVX512_KERNELS)
constexpr int64_t kPixelBlock = 32;  // two 16-lane vectors per row of a register block
constexpr int kRowBlock = 12;        // 24 accumulators + 2 inputs of 32 zmm registers
constexpr int64_t kPanelBlocks = 4;  // pixel blocks per packed panel
constexpr int64_t kPanelPixels = kPanelBlocks * kPixelBlock;

// panel[(b * C + c) * 32 + lane] = window_n[c, p0 + b * 32 + lane] for the `pixels`
// pixels from p0, zero past them. Pixels are copied in runs along window rows.
template <typename scalar_t>
void pack_panel(const scalar_t* feat_n, const Window& win, int64_t p0, int64_t pixels,
                float* panel) {
  const int64_t C = win.channels, plane = win.fh * win.fw;
  for (int64_t b = 0; b * kPixelBlock < pixels; ++b) {
    const int64_t first = p0 + b * kPixelBlock;
    const int64_t lanes = std::min(kPixelBlock, pixels - b * kPixelBlock);
    float* blk = panel + b * C * kPixelBlock;
    for (int64_t lane = 0; lane < lanes;) {
      const int64_t y = (first + lane) / win.w, x = (first + lane) % win.w;
      const int64_t run = std::min(lanes - lane, win.w - x);
      const scalar_t* src = feat_n + (win.oy + y) * win.fw + win.ox + x;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* s = src + c * plane;
        float* d = blk + c * kPixelBlock + lane;
        for (int64_t i = 0; i < run; ++i) d[i] = static_cast<float>(s[i]);
      }
      lane += run;
    }
    if (lanes < kPixelBlock)
      for (int64_t c = 0; c < C; ++c)
        std::fill(blk + c * kPixelBlock + lanes, blk + (c + 1) * kPixelBlock, 0.f);
  }
}

// out_row[0:lanes] = coarse_row + acc + bias, in scalar_t.
template <typename scalar_t>
__attribute__((target("avx512f"))) inline void store_sum(__m512 a0, __m512 a1, int64_t lanes,
                                                         float bias, const scalar_t* coarse_row,
                                                         scalar_t* out_row) {
  alignas(64) float acc[kPixelBlock];
  _mm512_store_ps(acc, a0);
  _mm512_store_ps(acc + 16, a1);
  for (int64_t i = 0; i < lanes; ++i)
    out_row[i] = static_cast<scalar_t>(static_cast<float>(coarse_row[i]) + acc[i] + bias);
}

template <>
__attribute__((target("avx512f"))) inline void store_sum<float>(__m512 a0, __m512 a1, int64_t lanes,
                                                                float bias, const float* coarse_row,
                                                                float* out_row) {
  const __mmask16 m0 = cpu::lane_mask(lanes), m1 = cpu::lane_mask(lanes - 16);
  const __m512 b = _mm512_set1_ps(bias);
  const __m512 r0 = _mm512_add_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(m0, coarse_row), a0), b);
  const __m512 r1 = _mm512_add_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(m1, coarse_row + 16), a1), b);
  _mm512_mask_storeu_ps(out_row, m0, r0);
  _mm512_mask_storeu_ps(out_row + 16, m1, r1);
}

// Rows [k0, k0 + KB) of one 32-pixel block: `blk` is its packed (C, 32) panel
// part, `coarse_p` / `out_p` point at (k = 0, the block's first pixel) of the
// image, rows P apart. Each accumulator sums over c in order: deterministic.
template <int KB, typename scalar_t>
__attribute__((target("avx512f"))) void window_block(const float* wt, int64_t K, const float* blk,
                                                     int64_t C, int64_t k0, int64_t lanes,
                                                     const float* bias, const scalar_t* coarse_p,
                                                     int64_t P, scalar_t* out_p) {
  __m512 acc0[KB], acc1[KB];
#pragma GCC unroll 12
  for (int i = 0; i < KB; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    const __m512 v0 = _mm512_loadu_ps(blk + c * kPixelBlock);
    const __m512 v1 = _mm512_loadu_ps(blk + c * kPixelBlock + 16);
    const float* w = wt + c * K + k0;
#pragma GCC unroll 12
    for (int i = 0; i < KB; ++i) {
      const __m512 b = _mm512_set1_ps(w[i]);
      acc0[i] = _mm512_fmadd_ps(b, v0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(b, v1, acc1[i]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < KB; ++i) {
    const int64_t k = k0 + i;
    store_sum<scalar_t>(acc0[i], acc1[i], lanes, bias ? bias[k] : 0.f, coarse_p + k * P,
                        out_p + k * P);
  }
}

template <typename scalar_t>
using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t,
                         const float*, const scalar_t*, int64_t, scalar_t*);

template <typename scalar_t, int... KB>
constexpr std::array<BlockFn<scalar_t>, sizeof...(KB)> block_table(
    std::integer_sequence<int, KB...>) {
  return {&window_block<KB + 1, scalar_t>...};
}

// out = coarse + conv1x1(window; wt) + bias for every image, on the AVX-512
// kernel; wm is the (K, C, 1, 1) fp32 weight with the scale folded in.
template <typename scalar_t>
void fused_window_conv_avx512(const at::Tensor& coarse, const at::Tensor& feature,
                              const at::Tensor& wm, const at::Tensor& bias, const Window& win,
                              at::Tensor& out) {
  static constexpr auto kBlocks =
      block_table<scalar_t>(std::make_integer_sequence<int, kRowBlock>{});
  const int64_t C = win.channels, P = win.h * win.w, K = win.classes;
  if (P == 0) return;
  const at::Tensor wt = wm.view({K, C}).t().contiguous();  // (C, K): broadcasts read in order
  const at::Tensor bf = bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
  const float* wp = wt.const_data_ptr<float>();
  const float* bp = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
  const scalar_t* fp = feature.const_data_ptr<scalar_t>();
  const scalar_t* cp = coarse.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t panels = (P + kPanelPixels - 1) / kPanelPixels;
  at::parallel_for(0, win.batch * panels, cpu::grain_for(kPanelPixels * C * K, cpu::kWindowMinWork),
                   [&](int64_t begin, int64_t end) {
                     std::vector<float> panel(kPanelBlocks * C * kPixelBlock);
                     for (int64_t t = begin; t < end; ++t) {
                       const int64_t n = t / panels, p0 = (t % panels) * kPanelPixels;
                       const int64_t pixels = std::min(kPanelPixels, P - p0);
                       pack_panel(fp + n * C * win.fh * win.fw, win, p0, pixels, panel.data());
                       for (int64_t b = 0; b * kPixelBlock < pixels; ++b) {
                         const int64_t first = p0 + b * kPixelBlock;
                         const int64_t lanes = std::min(kPixelBlock, P - first);
                         const float* blk = panel.data() + b * C * kPixelBlock;
                         for (int64_t k0 = 0; k0 < K; k0 += kRowBlock) {
                           const int64_t rows = std::min<int64_t>(kRowBlock, K - k0);
                           kBlocks[rows - 1](wp, K, blk, C, k0, lanes, bp, cp + n * K * P + first,
                                             P, op + n * K * P + first);
                         }
                       }
                     }
                   });
}
#endif

at::Tensor score_skip_cpu(const at::Tensor& coarse, const at::Tensor& feature,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          double scale, at::IntArrayRef offset) {
  const Window win = check_score_skip(coarse, feature, weight, bias, offset);
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(coarse, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  auto cc = coarse.contiguous();
  auto fc = feature.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, coarse.scalar_type(), "score_skip", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
        const at::Tensor wm = scaled_weight(weight, scale, acc_type);
#if defined(FCNFAST_HAVE_AVX512_KERNELS)
        if (acc_type == at::kFloat && cpu::use_avx512()) {
          fused_window_conv_avx512<scalar_t>(cc, fc, wm, bc, win, out);
          return;
        }
#endif
        const scalar_t* cp = cc.data_ptr<scalar_t>();
        const scalar_t* bp = has_bias ? bc.data_ptr<scalar_t>() : nullptr;
        scalar_t* op = out.data_ptr<scalar_t>();
        const int64_t K = win.classes, plane = win.h * win.w;
        // the 1x1 convolution on the window only
        const at::Tensor res =
            at::convolution(gather_windows<scalar_t, acc_t>(fc, win), wm, std::nullopt, {1, 1},
                            {0, 0}, {1, 1}, false, {0, 0}, 1)
                .contiguous();
        const acc_t* rp = res.data_ptr<acc_t>();
        at::parallel_for(0, win.batch * K, cpu::grain_for(plane, cpu::kWindowMinWork),
                         [&](int64_t b, int64_t e) {
                           for (int64_t nk = b; nk < e; ++nk) {
                             const acc_t bk = bp ? static_cast<acc_t>(bp[nk % K]) : acc_t(0);
                             const scalar_t* c = cp + nk * plane;
                             const acc_t* r = rp + nk * plane;
                             scalar_t* o = op + nk * plane;
                             for (int64_t i = 0; i < plane; ++i)
                               o[i] = static_cast<scalar_t>(static_cast<acc_t>(c[i]) + r[i] + bk);
                           }
                         });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> score_skip_backward_cpu(
    const at::Tensor& grad, const at::Tensor& feature, const at::Tensor& weight, double scale,
    at::IntArrayRef offset, std::array<bool, 3> output_mask) {
  const Window win = check_score_skip_backward(grad, feature, weight, offset);
  // outputs not asked for are distinct empty tensors (outputs must not alias)
  auto empty = [&] { return at::empty({0}, grad.options()); };
  const auto acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gb =
      output_mask[2] ? grad.sum({0, 2, 3}, false, acc_type).to(grad.scalar_type()) : empty();
  if (!output_mask[0] && !output_mask[1]) return {empty(), empty(), gb};
  at::Tensor gf = output_mask[0] ? at::empty(feature.sizes(), feature.options()) : empty();
  at::Tensor gw = output_mask[1] ? at::zeros(weight.sizes(), weight.options()) : empty();
  const int64_t C = win.channels, plane = win.h * win.w;
  if (grad.numel() == 0 || feature.numel() == 0 || weight.numel() == 0) {
    if (output_mask[0]) gf.zero_();
    return {gf, gw, gb};
  }
  auto gc = grad.contiguous();
  auto fc = feature.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad.scalar_type(), "score_skip_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor wm = scaled_weight(weight, scale, acc_type);  // (K, C, 1, 1)
        const at::Tensor g_acc = gc.to(acc_type);
        // the transposed 1x1 convolution on the window (deterministic for a fixed
        // thread count: ATen's CPU convolution backward has no atomics)
        auto grads = at::convolution_backward(g_acc, gather_windows<scalar_t, acc_t>(fc, win), wm,
                                              std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0},
                                              1, {output_mask[0], output_mask[1], false});
        if (output_mask[0]) {
          const at::Tensor dwin = std::get<0>(grads).contiguous();
          const acc_t* dp = dwin.data_ptr<acc_t>();
          scalar_t* gfp = gf.data_ptr<scalar_t>();
          at::parallel_for(0, win.batch * C, cpu::grain_for(win.fh * win.fw, cpu::kWindowMinWork),
                           [&](int64_t b, int64_t e) {
                             for (int64_t nc = b; nc < e; ++nc) {
                               const int64_t n = nc / C, c = nc % C;
                               scatter_window(dp + n * C * plane, win, c, c + 1,
                                              gfp + n * C * win.fh * win.fw);
                             }
                           });
        }
        if (output_mask[1]) gw.copy_(std::get<1>(grads) * scale);
      });
  return {gf, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fcnfast, CPU, m) {
  m.impl("score_skip", &score_skip_cpu);
  m.impl("score_skip_backward", &score_skip_backward_cpu);
}

}  // namespace fcnfast

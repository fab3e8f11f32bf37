// CPU kernels for conv_transpose2d with a fused output crop:
//   out = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding,
//                            groups, dilation)[..., top:top+h, left:left+w]
//
// Two paths, both computing only the kept outputs:
//
// * Phase convolution (the FCN case and any geometry where it is dense enough).
//   Write a full-output position as y + padding = q * stride + r (block q,
//   phase r). Its taps are the k with k * dilation = r + m * stride for some
//   m >= 0, and they read input q - m. So, per block (qy, qx),
//     out[co, r, q] = sum_{ci, m} W''[(co, ry, rx), (ci, my, mx)] * x[ci, qy - my, qx - mx]
//   which is one dense, stride-1 convolution of the input window (64x smaller
//   than the output for FCN-8s) with taps_h x taps_w kernels (2x2 when
//   kernel == 2 * stride) and cout * s_h * s_w output channels: a GEMM that
//   ATen runs with its best CPU backend (oneDNN, AVX-512). The output is a
//   permutation of that result (each output pixel is one entry, no
//   scatter-add), fused with the crop and the bias. The backward is the same
//   algebra transposed: the gradient permuted into the phase layout, then the
//   phase convolution's input/weight gradients (gathers and GEMMs, no atomics).
//   For fp32 FCN geometries with few input channels the forward instead runs
//   the same sum in csrc/cpu/phase_rows_avx512.h, writing output rows in place
//   (AVX-512 CPUs; FCNFAST_NO_AVX512=1 turns it off).
//
// * Direct gather (dilated / sparse geometries, and FCNFAST_CONV_TRANSPOSE_DIRECT=1
//   for testing): every output pixel and every gradient element is one call of
//   the per-pixel functions in csrc/common/conv_transpose2d.h (torch-free,
//   FCN_HD, written for the CUDA kernels to share).
//
// Both paths are deterministic: gathers with fixed summation orders, no
// atomics; the phase convolution's GEMMs (oneDNN / BLAS) are reproducible run
// to run for a fixed thread count, and images are accumulated in order.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../host/op_checks.h"
#include "../common/conv_transpose2d.h"
#include "isa.h"
#include "large_output.h"
#include "parallel.h"
#include "phase_rows_avx512.h"

namespace fcnfast {
namespace {

using ConvTArgs = ConvTransposeArgs;  // csrc/host/op_checks.h

// ---------------------------------------------------------------------------
// phase plan
// ---------------------------------------------------------------------------

// One axis of the phase decomposition: block q = floor((y + padding) / stride),
// phase r = (y + padding) % stride, `taps` values of m per phase. The kept
// outputs lie in blocks [q_lo, q_lo + nq).
struct PhaseAxis {
  int64_t stride, dilation, kernel, padding, in;
  int64_t taps, q_lo, nq;
  int64_t crop_start, crop_len;

  // Kernel index of (phase r, tap m), or -1 when no kernel entry lands there.
  int64_t kernel_index(int64_t r, int64_t m) const {
    const int64_t num = r + m * stride;
    if (num % dilation != 0) return -1;
    const int64_t k = num / dilation;
    return k < kernel ? k : -1;
  }
};

PhaseAxis make_phase_axis(int64_t stride, int64_t dilation, int64_t kernel, int64_t padding,
                          int64_t in, int64_t crop_start, int64_t crop_len) {
  PhaseAxis a{stride, dilation, kernel, padding, in, 0, 0, 0, crop_start, crop_len};
  a.taps = (kernel - 1) * dilation / stride + 1;
  if (crop_len > 0) {
    a.q_lo = (crop_start + padding) / stride;
    a.nq = (crop_start + crop_len - 1 + padding) / stride + 1 - a.q_lo;
  }
  return a;
}

struct PhasePlan {
  PhaseAxis h, w;
  int64_t cin_g, cout_g;
  int64_t k_rows() const { return cin_g * h.taps * w.taps; }       // GEMM depth
  int64_t m_cols() const { return cout_g * h.stride * w.stride; }  // (co, ry, rx)
};

PhasePlan make_plan(const ConvTranspose2dGeom& g) {
  return PhasePlan{
      make_phase_axis(g.stride_h, g.dil_h, g.kernel_h, g.pad_h, g.in_h, g.crop_top, g.crop_h),
      make_phase_axis(g.stride_w, g.dil_w, g.kernel_w, g.pad_w, g.in_w, g.crop_left, g.crop_w),
      g.in_channels / g.groups, g.out_channels / g.groups};
}

bool force_direct() {
  const char* v = std::getenv("FCNFAST_CONV_TRANSPOSE_DIRECT");
  return v != nullptr && v[0] == '1';
}

// Small float32 deconvolutions at stride <= 2 (an FCN's upscore2, Lite0's k3 s2 layers) run as
// ATen's own transposed convolution (oneDNN) plus the crop: the phase decomposition's per-call
// work (finite checks, window copy, weight re-layout, result permutation) is fixed and lost to
// it there -- measured on the 2-core AVX2 VM, 2 threads: 0.20x PyTorch for C=11 k3 s2 on 12x12,
// 0.72x for C=21 k4 s2 on 16x16, 0.83x for C=150 k4 s2 on 16x16 (92 M multiply-adds), but 1.18x
// for C=150 k4 s2 on 34x34 (416 M). The result is the reference's expression itself. Larger
// strides keep the phase path (k16 s8 on 8x8 input: 1.36x), and so do the geometries the AVX-512
// row kernel (phase_rows_avx512.h) takes on CPUs that have it. FCNFAST_CONV_TRANSPOSE_ATEN=0 turns
// the route off (the tests run the kernels on every shape that way).
constexpr int64_t kAtenMaxMacs = int64_t{192} << 20;
// On AVX-512 CPUs (Zen 5 VM, 2 threads, k4 s2 on 16x16, benchmarks/conv_transpose_routes.py:
// routes alternated in one process) fcnfast's kernels beat ATen's route up to C=59 -- C=21
// 0.23 vs 0.42 ms (row kernel), C=32 0.30 vs 0.54, C=59 0.47 vs 0.61 ms (phase convolution,
// 14 M multiply-adds) -- and lose at C=150 (92 M): 2.72 vs 1.29 ms.
constexpr int64_t kAtenMinMacsAvx512 = int64_t{32} << 20;

bool use_aten_forward(const ConvTranspose2dGeom& g, int64_t batch, at::ScalarType dtype) {
  const char* v = std::getenv("FCNFAST_CONV_TRANSPOSE_ATEN");
  if ((v != nullptr && v[0] == '0') || force_direct() || dtype != at::kFloat) return false;
  if (g.stride_h > 2 || g.stride_w > 2) return false;
  // where the AVX-512 row kernel takes the layer it beats oneDNN
  if (cpu::phase_rows_eligible(g)) return false;
  const int64_t macs = batch * g.in_channels * (g.out_channels / g.groups) * g.in_h * g.in_w *
                       g.kernel_h * g.kernel_w;
  // and on AVX-512 CPUs the phase convolution wins the smaller ones too
  if (cpu::use_avx512() && macs < kAtenMinMacsAvx512) return false;
  return macs <= kAtenMaxMacs;
}

// The phase convolution multiplies stride^2 * taps^2 weight entries per (ci, co)
// where kernel^2 are non-zero; use it unless that wastes more than 2x.
bool use_phase_conv(const PhasePlan& p) {
  if (force_direct() || p.cin_g == 0 || p.cout_g == 0) return false;
  const int64_t dense = p.h.stride * p.w.stride * p.h.taps * p.w.taps;
  return dense <= 2 * p.h.kernel * p.w.kernel;
}

// The phase convolution multiplies zero-padded taps and zero-padded input
// borders; with a NaN/Inf operand 0 * Inf would create NaNs at outputs the
// reference never touches. Such inputs take the direct gather, which visits
// only the real taps (one cheap pass over inputs that are far smaller than
// the output). One read of the tensor, no temporaries (the double-precision
// sum used before converted the whole tensor first: a quarter of a small
// layer's time).
bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  const at::Tensor c = t.contiguous();
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "all_finite", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    constexpr acc_t kMax = std::numeric_limits<acc_t>::max();
    finite = at::parallel_reduce(
        0, c.numel(), int64_t(1) << 16, true,
        [&](int64_t b, int64_t e, bool ok) {
          // |v| <= max is false for +-Inf and NaN; a branch-free loop vectorises
          bool bad = false;
          for (int64_t i = b; i < e; ++i) bad |= !(std::abs(static_cast<acc_t>(p[i])) <= kMax);
          return ok && !bad;
        },
        [](bool a, bool b) { return a && b; });
  });
  return finite;
}

// Whether every (phase, tap) pair of the axis has a kernel entry (kernel ==
// taps * stride with dilation 1, as in FCN's k = 2s layers): then the phase
// weight has no structural zeros.
bool every_phase_tap_used(const PhaseAxis& a) {
  for (int64_t r = 0; r < a.stride; ++r)
    for (int64_t m = 0; m < a.taps; ++m)
      if (a.kernel_index(r, m) < 0) return false;
  return true;
}

// The phase weights W'' as a convolution weight:
// (groups * cout_g * s_h * s_w, cin_g, taps_h, taps_w), output channel
// (group, co, ry, rx), taps flipped (j = taps - 1 - m) so that a plain
// cross-correlation computes sum_m W''[m] * x[q - m]. Zero where a
// (phase, tap) pair has no kernel entry.
// Stored channels-last, the layout of the phase convolution's input: oneDNN
// would otherwise convert it on every call (a slow permuting copy that was a
// third of a k4 s2 layer's time).
at::Tensor phase_weight(const at::Tensor& weight, const PhasePlan& p, int64_t groups,
                        at::ScalarType acc_type) {
  auto w = weight.to(acc_type).contiguous();  // (cin, cout_g, kh, kw)
  const int64_t sh = p.h.stride, sw = p.w.stride, th = p.h.taps, tw = p.w.taps;
  auto wc = at::empty({groups * p.m_cols(), p.cin_g, th, tw},
                      w.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (!every_phase_tap_used(p.h) || !every_phase_tap_used(p.w)) wc.zero_();
  TORCH_INTERNAL_ASSERT(wc.is_contiguous(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, acc_type, "conv_transpose2d_phase_weight", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = wc.data_ptr<scalar_t>();
    const int64_t kh = p.h.kernel, kw = p.w.kernel;
    at::parallel_for(
        0, groups * p.m_cols(), cpu::grain_for(p.k_rows(), cpu::kConvMinWork),
        [&](int64_t b, int64_t e) {
          for (int64_t oc = b; oc < e; ++oc) {
            const int64_t rx = oc % sw, ry = (oc / sw) % sh, co = (oc / (sw * sh)) % p.cout_g;
            const int64_t grp = oc / p.m_cols();
            for (int64_t my = 0; my < th; ++my) {
              const int64_t ky = p.h.kernel_index(ry, my);
              if (ky < 0) continue;
              for (int64_t mx = 0; mx < tw; ++mx) {
                const int64_t kx = p.w.kernel_index(rx, mx);
                if (kx < 0) continue;
                for (int64_t cl = 0; cl < p.cin_g; ++cl) {
                  const int64_t ci = grp * p.cin_g + cl;
                  dst[((oc * th + (th - 1 - my)) * tw + (tw - 1 - mx)) * p.cin_g + cl] =
                      src[((ci * p.cout_g + co) * kh + ky) * kw + kx];
                }
              }
            }
          }
        });
  });
  return wc;
}

// Inverse of phase_weight for the gradient: grad_weight[ci, co, ky, kx] from
// the phase convolution's weight gradient (every kernel entry appears once).
template <typename acc_t, typename scalar_t>
void unphase_weight(const acc_t* dwc, const PhasePlan& p, int64_t cin, scalar_t* gw) {
  const int64_t sh = p.h.stride, sw = p.w.stride, kh = p.h.kernel, kw = p.w.kernel;
  const int64_t th = p.h.taps, tw = p.w.taps;
  at::parallel_for(
      0, cin, cpu::grain_for(p.cout_g * kh * kw, cpu::kConvMinWork), [&](int64_t b, int64_t e) {
        for (int64_t ci = b; ci < e; ++ci) {
          const int64_t grp = ci / p.cin_g, cl = ci % p.cin_g;
          for (int64_t co = 0; co < p.cout_g; ++co)
            for (int64_t ky = 0; ky < kh; ++ky) {
              const int64_t ry = ky * p.h.dilation % sh, my = ky * p.h.dilation / sh;
              for (int64_t kx = 0; kx < kw; ++kx) {
                const int64_t rx = kx * p.w.dilation % sw, mx = kx * p.w.dilation / sw;
                const int64_t oc = ((grp * p.cout_g + co) * sh + ry) * sw + rx;
                gw[((ci * p.cout_g + co) * kh + ky) * kw + kx] = static_cast<scalar_t>(
                    dwc[((oc * p.cin_g + cl) * th + (th - 1 - my)) * tw + (tw - 1 - mx)]);
              }
            }
        }
      });
}

// The input of the phase convolution: x rows [q_lo - (taps - 1), q_lo + nq)
// and likewise columns, zero outside x, channels-last, in the compute dtype.
// `rows`/`cols` return where the window overlaps x (window coordinates = x
// coordinates - origin).
struct InputWindow {
  int64_t origin_y, origin_x, height, width;  // window placement in x coordinates
  int64_t y0, y1, x0, x1;                     // overlap with x, in x coordinates
};

InputWindow input_window(const PhasePlan& p) {
  InputWindow w;
  w.origin_y = p.h.q_lo - (p.h.taps - 1);
  w.origin_x = p.w.q_lo - (p.w.taps - 1);
  w.height = p.h.nq + p.h.taps - 1;
  w.width = p.w.nq + p.w.taps - 1;
  w.y0 = std::max<int64_t>(w.origin_y, 0);
  w.y1 = std::max(w.y0, std::min(w.origin_y + w.height, p.h.in));
  w.x0 = std::max<int64_t>(w.origin_x, 0);
  w.x1 = std::max(w.x0, std::min(w.origin_x + w.width, p.w.in));
  return w;
}

at::Tensor window_view(const at::Tensor& t, const InputWindow& w, bool window_coords) {
  const int64_t oy = window_coords ? w.origin_y : 0, ox = window_coords ? w.origin_x : 0;
  return t.slice(2, w.y0 - oy, w.y1 - oy).slice(3, w.x0 - ox, w.x1 - ox);
}

// x must be contiguous (NCHW); the window is written channels-last.
template <typename scalar_t, typename acc_t>
at::Tensor phase_input(const at::Tensor& x, const InputWindow& w) {
  const auto opts = x.options()
                        .dtype(c10::CppTypeToScalarType<acc_t>::value)
                        .memory_format(at::MemoryFormat::ChannelsLast);
  const int64_t batch = x.size(0), C = x.size(1), in_h = x.size(2), in_w = x.size(3);
  at::Tensor win = at::empty({batch, C, w.height, w.width}, opts);
  const scalar_t* src = x.data_ptr<scalar_t>();
  acc_t* dst = win.data_ptr<acc_t>();
  at::parallel_for(0, batch * w.height, cpu::grain_for(w.width * C, cpu::kConvMinWork),
                   [&](int64_t b, int64_t e) {
                     for (int64_t r = b; r < e; ++r) {
                       const int64_t n = r / w.height, iy = w.origin_y + r % w.height;
                       acc_t* drow = dst + r * w.width * C;  // (n, y) row of the NHWC window
                       if (iy < 0 || iy >= in_h) {
                         std::fill(drow, drow + w.width * C, acc_t(0));
                         continue;
                       }
                       for (int64_t j = 0; j < w.width; ++j) {
                         const int64_t ix = w.origin_x + j;
                         acc_t* d = drow + j * C;
                         if (ix < 0 || ix >= in_w) {
                           std::fill(d, d + C, acc_t(0));
                           continue;
                         }
                         const scalar_t* s = src + (n * C * in_h + iy) * in_w + ix;
                         for (int64_t c = 0; c < C; ++c)
                           d[c] = static_cast<acc_t>(s[c * in_h * in_w]);
                       }
                     }
                   });
  return win;
}

// The kept output row of block row q and phase r along the height (crop
// coordinates), or -1 when it lies outside the crop.
inline int64_t out_row(const PhaseAxis& a, int64_t q, int64_t r) {
  const int64_t y = (a.q_lo + q) * a.stride + r - a.padding - a.crop_start;
  return (y >= 0 && y < a.crop_len) ? y : -1;
}

// Writes a finished output row: floats through cpu::store_row (streaming
// stores for large outputs, see large_output.h), other types converted.
inline void store_row(float* dst, const float* src, int64_t n, bool stream) {
  cpu::store_row(dst, src, n, stream);
}

template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* dst, const acc_t* src, int64_t n, bool /*stream*/) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// out[n, group channels, rows of block row qy, :] (plus the bias) from the
// phase convolution's result for that block row: rt[qx * ld + (co, ry, rx)].
// Along the width, block qx and phase rx give output column
// qx * s_w + rx - off: runs of s_w contiguous columns, assembled in `row`
// (crop_w elements) and then stored.
template <typename scalar_t, typename src_t, typename acc_t>
void scatter_row(const src_t* rt, int64_t ld, const PhasePlan& p, int64_t qy,
                 const scalar_t* bias_g, scalar_t* out_ng, acc_t* row, bool stream) {
  const int64_t sh = p.h.stride, sw = p.w.stride;
  const int64_t oh = p.h.crop_len, ow = p.w.crop_len;
  const int64_t off = p.w.padding + p.w.crop_start - p.w.q_lo * sw;
  for (int64_t co = 0; co < p.cout_g; ++co) {
    const acc_t b = bias_g ? static_cast<acc_t>(bias_g[co]) : acc_t(0);
    for (int64_t ry = 0; ry < sh; ++ry) {
      const int64_t y = out_row(p.h, qy, ry);
      if (y < 0) continue;
      const src_t* src = rt + (co * sh + ry) * sw;
      for (int64_t qx = 0; qx < p.w.nq; ++qx) {
        const int64_t x0 = qx * sw - off;
        const int64_t rx_lo = std::max<int64_t>(0, -x0), rx_hi = std::min<int64_t>(sw, ow - x0);
        const src_t* s = src + qx * ld;
        acc_t* r = row + x0;
        for (int64_t rx = rx_lo; rx < rx_hi; ++rx) r[rx] = static_cast<acc_t>(s[rx]) + b;
      }
      store_row(out_ng + (co * oh + y) * ow, row, ow, stream);
    }
  }
}

// The transpose of scatter_row: gt[qx * ld + (co, ry, rx)] = grad at that
// output position, zero where it lies outside the crop.
template <typename scalar_t, typename acc_t>
void gather_grad_row(const scalar_t* grad_ng, const PhasePlan& p, int64_t qy, acc_t* gt,
                     int64_t ld) {
  const int64_t sh = p.h.stride, sw = p.w.stride;
  const int64_t oh = p.h.crop_len, ow = p.w.crop_len;
  const int64_t off = p.w.padding + p.w.crop_start - p.w.q_lo * sw;
  for (int64_t co = 0; co < p.cout_g; ++co)
    for (int64_t ry = 0; ry < sh; ++ry) {
      const int64_t y = out_row(p.h, qy, ry);
      acc_t* dst = gt + (co * sh + ry) * sw;
      if (y < 0) {
        for (int64_t qx = 0; qx < p.w.nq; ++qx)
          std::fill(dst + qx * ld, dst + qx * ld + sw, acc_t(0));
        continue;
      }
      const scalar_t* grow = grad_ng + (co * oh + y) * ow;
      for (int64_t qx = 0; qx < p.w.nq; ++qx) {
        const int64_t x0 = qx * sw - off;
        const int64_t rx_lo = std::clamp<int64_t>(-x0, 0, sw);
        const int64_t rx_hi = std::clamp<int64_t>(ow - x0, rx_lo, sw);
        acc_t* d = dst + qx * ld;
        const scalar_t* g = grow + x0;
        for (int64_t rx = 0; rx < rx_lo; ++rx) d[rx] = acc_t(0);
        for (int64_t rx = rx_lo; rx < rx_hi; ++rx) d[rx] = static_cast<acc_t>(g[rx]);
        for (int64_t rx = rx_hi; rx < sw; ++rx) d[rx] = acc_t(0);
      }
    }
}

// The phase convolution (a plain strided-1 cross-correlation with taps_h x taps_w
// kernels and groups * cout_g * s_h * s_w output channels), channels-last.
at::Tensor phase_conv(const at::Tensor& input, const at::Tensor& wc, int64_t groups) {
#if AT_MKLDNN_ENABLED()
  // fp32 goes to oneDNN directly: ATen's heuristic sends small inputs (an FCN
  // k4 s2 layer on a 16x16 score map) to its im2col path, 1.6x slower here.
  if ((input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16) &&
      at::globalContext().userEnabledMkldnn())
    return at::mkldnn_convolution(input, wc, std::nullopt, {0, 0}, {1, 1}, {1, 1}, groups)
        .contiguous(at::MemoryFormat::ChannelsLast);
#endif
  return at::convolution(input, wc, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, groups)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

// Block rows per phase-convolution call: the result chunk stays near 8 MB, so
// it is still in the last-level cache when the permutation reads it back and
// glibc's allocator reuses it (far below its mmap threshold: no fresh zeroed
// pages per call), while oneDNN still gets large GEMMs and few parallel
// regions are entered (the FCN-8s 21-class case is three chunks). Measured on
// the 2-core bench machine, 21 classes: 8 MB chunks 3.8-4.2 ms, one 22 MB
// chunk 4.7-9 ms, 4 MB chunks 6 ms (oneDNN slows down on short inputs).
int64_t rows_per_chunk(const PhasePlan& p, int64_t groups, int64_t elem_size) {
  const int64_t row_bytes = p.w.nq * groups * p.m_cols() * elem_size;
  return std::clamp<int64_t>((int64_t(8) << 20) / std::max<int64_t>(1, row_bytes), 1, p.h.nq);
}

// conv_t: the phase convolution's operand (and result) type -- acc_t, or bfloat16 itself for a
// bfloat16 layer on a CPU with AVX512-BF16 (oneDNN's bf16 kernels accumulate in fp32; the
// operands are the layer's own bf16 values, so only the GEMM result is rounded, to bf16, before
// the bias is added).
template <typename scalar_t, typename conv_t>
void forward_phase_conv_as(const ConvTArgs& a, const PhasePlan& p, const at::Tensor& x,
                           const at::Tensor& weight, const scalar_t* bias, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& g = a.g;
  const at::ScalarType conv_type = c10::CppTypeToScalarType<conv_t>::value;
  const at::Tensor input = phase_input<scalar_t, conv_t>(x, input_window(p));
  const at::Tensor wc = phase_weight(weight, p, g.groups, conv_type);
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t nqw = p.w.nq, rows = p.h.nq, ld = g.groups * p.m_cols();
  const int64_t chunk = rows_per_chunk(p, g.groups, sizeof(conv_t));
  const bool stream = cpu::use_streaming_stores(out);
  for (int64_t n = 0; n < a.batch; ++n)
    for (int64_t q0 = 0; q0 < rows; q0 += chunk) {
      const int64_t q1 = std::min(q0 + chunk, rows);
      // block rows [q0, q1) need window rows [q0, q1 + taps_h - 1)
      const at::Tensor r =
          phase_conv(input.narrow(0, n, 1).narrow(2, q0, q1 - q0 + p.h.taps - 1), wc, g.groups);
      const conv_t* rp = r.data_ptr<conv_t>();
      // one unit = one block row of one group: a permutation of the phase
      // convolution's channels-last rows into the output
      at::parallel_for(
          0, g.groups * (q1 - q0), cpu::grain_for(nqw * p.m_cols(), cpu::kConvMinWork),
          [&](int64_t begin, int64_t end) {
            std::vector<acc_t> row(g.crop_w);
            for (int64_t u = begin; u < end; ++u) {
              const int64_t qy = q0 + u % (q1 - q0), grp = u / (q1 - q0);
              scalar_t* out_ng = op + (n * g.out_channels + grp * p.cout_g) * g.crop_h * g.crop_w;
              scatter_row(rp + (qy - q0) * nqw * ld + grp * p.m_cols(), ld, p, qy,
                          bias ? bias + grp * p.cout_g : nullptr, out_ng, row.data(), stream);
            }
            cpu::stream_fence();
          });
    }
}

template <typename scalar_t>
void forward_phase_conv(const ConvTArgs& a, const PhasePlan& p, const at::Tensor& x,
                        const at::Tensor& weight, const scalar_t* bias, at::Tensor& out) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (cpu::use_avx512_bf16())
      return forward_phase_conv_as<scalar_t, scalar_t>(a, p, x, weight, bias, out);
  }
  forward_phase_conv_as<scalar_t, at::opmath_type<scalar_t>>(a, p, x, weight, bias, out);
}

// conv_t as in forward_phase_conv_as: the phase GEMMs' operand type. The weight gradient is summed
// over images in acc_t either way.
template <typename scalar_t, typename conv_t>
void backward_phase_conv_as(const ConvTArgs& a, const PhasePlan& p, const at::Tensor& grad,
                            const at::Tensor& x, const at::Tensor& weight, at::Tensor* grad_x,
                            at::Tensor* grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& g = a.g;
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::ScalarType conv_type = c10::CppTypeToScalarType<conv_t>::value;
  const int64_t nqw = p.w.nq, rows = p.h.nq, ld = g.groups * p.m_cols();
  const InputWindow win = input_window(p);
  const at::Tensor input = phase_input<scalar_t, conv_t>(x, win);
  const at::Tensor wc = phase_weight(weight, p, g.groups, conv_type);
  // one image's gradient permuted into the phase convolution's output layout
  at::Tensor gt =
      cpu::empty_large({1, ld, rows, nqw}, input.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor dwc = grad_weight ? at::zeros_like(wc, wc.options().dtype(acc_type)) : at::Tensor();
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  conv_t* gtp = gt.data_ptr<conv_t>();
  // images in a fixed order (the weight gradient sums them in that order)
  for (int64_t n = 0; n < a.batch; ++n) {
    at::parallel_for(0, g.groups * rows, cpu::grain_for(nqw * p.m_cols(), cpu::kConvMinWork),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t u = begin; u < end; ++u) {
                         const int64_t qy = u % rows, grp = u / rows;
                         const scalar_t* grad_ng =
                             gp + (n * g.out_channels + grp * p.cout_g) * g.crop_h * g.crop_w;
                         gather_grad_row(grad_ng, p, qy, gtp + qy * nqw * ld + grp * p.m_cols(),
                                         ld);
                       }
                     });
    const at::Tensor input_n = input.narrow(0, n, 1);
    auto grads = at::convolution_backward(gt, input_n, wc, std::nullopt, {1, 1}, {0, 0}, {1, 1},
                                          false, {0, 0}, g.groups,
                                          {grad_x != nullptr, grad_weight != nullptr, false});
    if (grad_x) {
      window_view(grad_x->narrow(0, n, 1), win, false)
          .copy_(window_view(std::get<0>(grads), win, true));
    }
    if (grad_weight) dwc.add_(std::get<1>(grads));  // promotes a bf16 gradient to acc_t
  }
  if (grad_weight) {
    const at::Tensor dwc_c = dwc.contiguous();
    unphase_weight(dwc_c.data_ptr<acc_t>(), p, g.in_channels, grad_weight->data_ptr<scalar_t>());
  }
}

template <typename scalar_t>
void backward_phase_conv(const ConvTArgs& a, const PhasePlan& p, const at::Tensor& grad,
                         const at::Tensor& x, const at::Tensor& weight, at::Tensor* grad_x,
                         at::Tensor* grad_weight) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (cpu::use_avx512_bf16())
      return backward_phase_conv_as<scalar_t, scalar_t>(a, p, grad, x, weight, grad_x, grad_weight);
  }
  backward_phase_conv_as<scalar_t, at::opmath_type<scalar_t>>(a, p, grad, x, weight, grad_x,
                                                              grad_weight);
}

// ---------------------------------------------------------------------------
// direct per-pixel path
// ---------------------------------------------------------------------------

template <typename scalar_t>
void forward_direct(const ConvTArgs& a, const at::Tensor& x, const at::Tensor& weight,
                    const scalar_t* bias, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& g = a.g;
  const auto plan = make_conv_plan(g);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t rows = a.batch * g.out_channels * g.crop_h;
  const int64_t taps = (g.in_channels / g.groups) * g.kernel_h * g.kernel_w;
  at::parallel_for(
      0, rows, cpu::grain_for(g.crop_w * taps, cpu::kConvMinWork), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const int64_t y = r % g.crop_h, nc = r / g.crop_h, co = nc % g.out_channels,
                        n = nc / g.out_channels;
          const scalar_t* x_n = xp + n * g.in_channels * g.in_h * g.in_w;
          const acc_t bv = bias ? static_cast<acc_t>(bias[co]) : acc_t(0);
          scalar_t* orow = op + r * g.crop_w;
          for (int64_t xo = 0; xo < g.crop_w; ++xo)
            orow[xo] =
                static_cast<scalar_t>(conv_transpose2d_output_pixel<scalar_t, acc_t>(
                                          g, plan, x_n, wp, co, y + g.crop_top, xo + g.crop_left) +
                                      bv);
        }
      });
}

template <typename scalar_t>
void backward_direct(const ConvTArgs& a, const at::Tensor& grad, const at::Tensor& x,
                     const at::Tensor& weight, at::Tensor* grad_x, at::Tensor* grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& g = a.g;
  const auto plan = make_conv_plan(g);
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const int64_t x_img = g.in_channels * g.in_h * g.in_w;
  const int64_t g_img = g.out_channels * g.crop_h * g.crop_w;
  if (grad_x) {
    scalar_t* gx = grad_x->data_ptr<scalar_t>();
    const int64_t taps = (g.out_channels / g.groups) * g.kernel_h * g.kernel_w;
    at::parallel_for(0, a.batch * g.in_channels * g.in_h,
                     cpu::grain_for(g.in_w * taps, cpu::kConvMinWork), [&](int64_t b, int64_t e) {
                       for (int64_t r = b; r < e; ++r) {
                         const int64_t iy = r % g.in_h, nc = r / g.in_h, ci = nc % g.in_channels,
                                       n = nc / g.in_channels;
                         for (int64_t ix = 0; ix < g.in_w; ++ix)
                           gx[r * g.in_w + ix] = static_cast<scalar_t>(
                               conv_transpose2d_grad_input_pixel<scalar_t, acc_t>(
                                   g, plan, gp + n * g_img, wp, ci, iy, ix));
                       }
                     });
  }
  if (grad_weight) {
    scalar_t* gw = grad_weight->data_ptr<scalar_t>();
    const int64_t cout_g = g.out_channels / g.groups;
    const int64_t khw = g.kernel_h * g.kernel_w;
    const int64_t per_elem = a.batch * g.in_h * g.in_w;
    at::parallel_for(0, grad_weight->numel(), cpu::grain_for(per_elem, cpu::kConvMinWork),
                     [&](int64_t b, int64_t e) {
                       for (int64_t i = b; i < e; ++i) {
                         const int64_t kx = i % g.kernel_w, ky = (i / g.kernel_w) % g.kernel_h;
                         const int64_t cl = (i / khw) % cout_g, ci = i / (khw * cout_g);
                         acc_t acc = acc_t(0);
                         for (int64_t n = 0; n < a.batch; ++n)
                           acc += conv_transpose2d_grad_weight_image<scalar_t, acc_t>(
                               g, plan, xp + n * x_img, gp + n * g_img, ci, cl, ky, kx);
                         gw[i] = static_cast<scalar_t>(acc);
                       }
                     });
  }
}

// The AVX-512 row kernel (fp32, FCN geometries; csrc/cpu/phase_rows_avx512.h)
// when it applies; false: the caller takes another path.
template <typename scalar_t>
bool forward_phase_rows(const ConvTranspose2dGeom&, const at::Tensor&, const at::Tensor&,
                        const scalar_t*, at::Tensor&) {
  return false;
}

template <>
bool forward_phase_rows<float>(const ConvTranspose2dGeom& g, const at::Tensor& x,
                               const at::Tensor& weight, const float* bias, at::Tensor& out) {
  if (!cpu::phase_rows_eligible(g)) return false;
  cpu::phase_rows_forward(g, x, weight, bias, out);
  return true;
}

// ---------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------

at::Tensor conv_transpose2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef output_padding,
                                int64_t groups, at::IntArrayRef dilation, at::IntArrayRef crop) {
  const ConvTArgs a = check_conv_transpose2d(x, weight, bias, stride, padding, output_padding,
                                             groups, dilation, crop);
  const auto& g = a.g;
  if (use_aten_forward(g, a.batch, x.scalar_type()) && a.batch > 0 && g.crop_h > 0 &&
      g.crop_w > 0) {
    const auto full =
        at::conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation);
    return full.narrow(2, g.crop_top, g.crop_h).narrow(3, g.crop_left, g.crop_w).contiguous();
  }
  // a reused block when one is free: no page faults (large_output.h)
  auto out = cpu::empty_large({a.batch, g.out_channels, g.crop_h, g.crop_w}, x.options());
  if (out.numel() == 0) return out;
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  at::Tensor bc = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  const PhasePlan plan = make_plan(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "conv_transpose2d", [&] {
        const scalar_t* bp = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
        if (use_phase_conv(plan) && all_finite(xc) && all_finite(wc)) {
          if (!forward_phase_rows(g, xc, wc, bp, out))
            forward_phase_conv<scalar_t>(a, plan, xc, wc, bp, out);
        } else {
          forward_direct<scalar_t>(a, xc, wc, bp, out);
        }
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, at::IntArrayRef crop, std::array<bool, 3> output_mask) {
  const ConvTArgs a = check_conv_transpose2d_backward(grad, x, weight, stride, padding,
                                                      output_padding, groups, dilation, crop);
  const auto& g = a.g;
  // outputs not asked for are distinct empty tensors (outputs must not alias)
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = output_mask[0] ? at::zeros(x.sizes(), x.options()) : empty();
  at::Tensor gw = output_mask[1] ? at::zeros(weight.sizes(), weight.options()) : empty();
  at::Tensor gb = empty();
  if (output_mask[2]) {
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    gb = grad.sum({0, 2, 3}, false, acc).to(x.scalar_type());
  }
  if (grad.numel() == 0 || x.numel() == 0 || !(output_mask[0] || output_mask[1])) {
    return {gx, gw, gb};
  }
  auto gc = grad.contiguous();
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  const PhasePlan plan = make_plan(g);
  at::Tensor* gx_p = output_mask[0] ? &gx : nullptr;
  at::Tensor* gw_p = output_mask[1] ? &gw : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "conv_transpose2d_backward", [&] {
        if (use_phase_conv(plan) && all_finite(gc) && all_finite(xc) && all_finite(wc))
          backward_phase_conv<scalar_t>(a, plan, gc, xc, wc, gx_p, gw_p);
        else
          backward_direct<scalar_t>(a, gc, xc, wc, gx_p, gw_p);
      });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fcnfast, CPU, m) {
  m.impl("conv_transpose2d", &conv_transpose2d_cpu);
  m.impl("conv_transpose2d_backward", &conv_transpose2d_backward_cpu);
}

}  // namespace fcnfast

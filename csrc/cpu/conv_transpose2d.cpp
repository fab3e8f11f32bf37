// CPU kernels for conv_transpose2d with a fused output crop:
//   out = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding,
//                            groups, dilation)[..., top:top+h, left:left+w]
//
// Two paths, both computing only the kept outputs:
//
// * Phase GEMM (the FCN case and any geometry where it is dense enough).
//   Write a full-output position as y + padding = q * stride + r (block q,
//   phase r). Its taps are the k with k * dilation = r + m * stride for some
//   m >= 0, and they read input q - m. So, per block (qy, qx),
//     out[co, r, q] = sum_{ci, m} W''[(co, ry, rx), (ci, my, mx)] * x[ci, qy - my, qx - mx]
//   which is one dense GEMM over all blocks: R^T = cols^T @ W''^T with cols
//   the (in_channels * taps) x blocks gather of x (64x smaller than the output
//   for FCN-8s) and W'' the weight with its taps regrouped by phase. The
//   output is a permutation of R (each output pixel is one entry: no
//   scatter-add). The backward is the same algebra transposed:
//     dW''  = cols @ G^T,  dcols = W''^T @ G,  grad_x = sum over taps of dcols
//   with G the permuted gradient, again gathers only.
//
// * Direct gather (dilated / sparse geometries, and FCNFAST_CONV_TRANSPOSE_DIRECT=1
//   for testing): every output pixel and every gradient element is one call of
//   the per-pixel functions in csrc/common/conv_transpose2d.h, the same math
//   the CUDA kernels run.
//
// Every path is deterministic: fixed summation orders, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/conv_transpose2d.h"

namespace fcnfast {
namespace {

struct ConvTArgs {
  ConvTranspose2dGeom g;
  int64_t batch;
};

// Validates the arguments shared by the forward and the backward and returns
// the geometry with the crop resolved against the full output size.
ConvTArgs check_conv_transpose2d(const at::Tensor& x, const at::Tensor& weight,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef output_padding, int64_t groups,
                                 at::IntArrayRef dilation, at::IntArrayRef crop) {
  check_defined(x, "x");
  check_defined(weight, "weight");
  check_floating(x, "x");
  check_dim(x, 4, "x");
  check_dim(weight, 4, "weight");
  check_same(x, "x", weight, "weight");
  auto s = pair_arg(stride, "stride");
  auto p = pair_arg(padding, "padding");
  auto op = pair_arg(output_padding, "output_padding");
  auto d = pair_arg(dilation, "dilation");
  TORCH_CHECK_VALUE(s[0] > 0 && s[1] > 0, "fcnfast: stride must be positive, got (", s[0], ", ",
                    s[1], ")");
  TORCH_CHECK_VALUE(d[0] > 0 && d[1] > 0, "fcnfast: dilation must be positive, got (", d[0],
                    ", ", d[1], ")");
  TORCH_CHECK_VALUE(p[0] >= 0 && p[1] >= 0, "fcnfast: padding must be non-negative, got (", p[0],
                    ", ", p[1], ")");
  TORCH_CHECK_VALUE(op[0] >= 0 && op[1] >= 0,
                    "fcnfast: output_padding must be non-negative, got (", op[0], ", ", op[1],
                    ")");
  for (int axis = 0; axis < 2; ++axis) {
    TORCH_CHECK_VALUE(op[axis] < std::max(s[axis], d[axis]), "fcnfast: output_padding (", op[0],
                      ", ", op[1], ") must be smaller than stride (", s[0], ", ", s[1],
                      ") or dilation (", d[0], ", ", d[1], ")");
  }
  TORCH_CHECK_VALUE(groups > 0, "fcnfast: groups must be a positive int, got ", groups);
  const int64_t cin = x.size(1);
  TORCH_CHECK_VALUE(weight.size(0) == cin, "fcnfast: weight.shape[0] (", weight.size(0),
                    ") must equal the input channels x.shape[1] (", cin, ")");
  TORCH_CHECK_VALUE(cin % groups == 0, "fcnfast: groups (", groups,
                    ") must divide the input channels (", cin, ")");
  const int64_t kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK_VALUE(kh > 0 && kw > 0, "fcnfast: weight kernel size must be positive, got ", kh,
                    "x", kw);
  check_index32(x.numel(), "x");
  check_index32(weight.numel(), "weight");
  const int64_t full_h = conv_transpose_out_size(x.size(2), kh, s[0], p[0], op[0], d[0]);
  const int64_t full_w = conv_transpose_out_size(x.size(3), kw, s[1], p[1], op[1], d[1]);
  TORCH_CHECK_VALUE(full_h > 0 && full_w > 0, "fcnfast: conv_transpose2d output would be ",
                    full_h, "x", full_w, " for input ", shape_str(x), ", weight ",
                    shape_str(weight));
  Crop c = check_crop(crop, full_h, full_w);
  const int64_t cout = weight.size(1) * groups;
  // Refuse sizes past 32-bit indexing before allocating anything (the products
  // are evaluated in steps so that they cannot overflow int64 either).
  check_index32(full_h, "the full output height");
  check_index32(full_w, "the full output width");
  check_index32(c.height * c.width, "one output plane");
  check_index32(cout * c.height * c.width, "one output image");
  check_index32(x.size(0) * cout * c.height * c.width, "the output");
  ConvTArgs a;
  a.batch = x.size(0);
  a.g = ConvTranspose2dGeom{cin,   x.size(2), x.size(3), cout,     groups,  kh,     kw,
                            s[0],  s[1],      p[0],      p[1],     d[0],    d[1],   c.top,
                            c.left, c.height, c.width};
  return a;
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t cout) {
  if (!bias.has_value() || !bias->defined()) return;
  check_dim(*bias, 1, "bias");
  check_same(x, "x", *bias, "bias");
  TORCH_CHECK_VALUE(bias->size(0) == cout, "fcnfast: bias has ", bias->size(0),
                    " elements, expected the output channels ", cout);
}

// ---------------------------------------------------------------------------
// phase GEMM plan
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
  int64_t k_rows() const { return cin_g * h.taps * w.taps; }         // GEMM depth
  int64_t m_cols() const { return cout_g * h.stride * w.stride; }    // (co, ry, rx)
  int64_t blocks() const { return h.nq * w.nq; }
};

PhasePlan make_plan(const ConvTranspose2dGeom& g) {
  return PhasePlan{
      make_phase_axis(g.stride_h, g.dil_h, g.kernel_h, g.pad_h, g.in_h, g.crop_top, g.crop_h),
      make_phase_axis(g.stride_w, g.dil_w, g.kernel_w, g.pad_w, g.in_w, g.crop_left, g.crop_w),
      g.in_channels / g.groups, g.out_channels / g.groups};
}

// at::parallel_for grain so that a chunk carries at least ~64K multiply-adds:
// small problems then run inline, without the cost of a parallel region.
int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kMinWork = int64_t(1) << 16;
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_item));
}

bool force_direct() {
  const char* v = std::getenv("FCNFAST_CONV_TRANSPOSE_DIRECT");
  return v != nullptr && v[0] == '1';
}

// The dense GEMM multiplies stride^2 * taps^2 weight entries per (ci, co)
// where kernel^2 are non-zero; use it unless that wastes more than 2x.
bool use_phase_gemm(const PhasePlan& p) {
  if (force_direct()) return false;
  const int64_t dense = p.h.stride * p.w.stride * p.h.taps * p.w.taps;
  return dense <= 2 * p.h.kernel * p.w.kernel;
}

// W''^T for every group: (groups, cin_g * taps_h * taps_w, cout_g * s_h * s_w)
// in the compute dtype, zero where a (phase, tap) pair has no kernel entry.
at::Tensor phase_weight(const at::Tensor& weight, const PhasePlan& p, int64_t groups,
                        at::ScalarType acc_type) {
  auto w = weight.to(acc_type).contiguous();  // (cin, cout_g, kh, kw)
  auto wt = at::zeros({groups, p.k_rows(), p.m_cols()}, w.options());
  const int64_t sh = p.h.stride, sw = p.w.stride, th = p.h.taps, tw = p.w.taps;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "conv_transpose2d_phase_weight", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = wt.data_ptr<scalar_t>();
    const int64_t cin = weight.size(0), kh = p.h.kernel, kw = p.w.kernel;
    at::parallel_for(0, cin, grain_for(th * tw * p.m_cols()), [&](int64_t b, int64_t e) {
      for (int64_t ci = b; ci < e; ++ci) {
        const int64_t grp = ci / p.cin_g, cl = ci % p.cin_g;
        for (int64_t my = 0; my < th; ++my)
          for (int64_t mx = 0; mx < tw; ++mx) {
            scalar_t* row = dst + (grp * p.k_rows() + (cl * th + my) * tw + mx) * p.m_cols();
            for (int64_t co = 0; co < p.cout_g; ++co)
              for (int64_t ry = 0; ry < sh; ++ry) {
                const int64_t ky = p.h.kernel_index(ry, my);
                if (ky < 0) continue;
                for (int64_t rx = 0; rx < sw; ++rx) {
                  const int64_t kx = p.w.kernel_index(rx, mx);
                  if (kx < 0) continue;
                  row[(co * sh + ry) * sw + rx] = src[((ci * p.cout_g + co) * kh + ky) * kw + kx];
                }
              }
          }
      }
    });
  });
  return wt;
}

// Inverse of phase_weight for the gradient: grad_weight[ci, co, ky, kx] from
// dW''^T (groups, k_rows, m_cols).
template <typename acc_t, typename scalar_t>
void unphase_weight(const acc_t* dwt, const PhasePlan& p, int64_t cin, scalar_t* gw) {
  const int64_t sh = p.h.stride, sw = p.w.stride, kh = p.h.kernel, kw = p.w.kernel;
  const int64_t dh = p.h.dilation, dw = p.w.dilation;
  at::parallel_for(0, cin, grain_for(p.cout_g * kh * kw), [&](int64_t b, int64_t e) {
    for (int64_t ci = b; ci < e; ++ci) {
      const int64_t grp = ci / p.cin_g, cl = ci % p.cin_g;
      for (int64_t co = 0; co < p.cout_g; ++co)
        for (int64_t ky = 0; ky < kh; ++ky) {
          const int64_t ry = ky * dh % sh, my = ky * dh / sh;
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int64_t rx = kx * dw % sw, mx = kx * dw / sw;
            const int64_t row = grp * p.k_rows() + (cl * p.h.taps + my) * p.w.taps + mx;
            gw[((ci * p.cout_g + co) * kh + ky) * kw + kx] =
                static_cast<scalar_t>(dwt[row * p.m_cols() + (co * sh + ry) * sw + rx]);
          }
        }
    }
  });
}

// cols[(ci, my, mx), (qy - qy0) * nq_w + qx] = x[ci, q_lo_h + qy - my, q_lo_w + qx - mx]
// (zero outside x) for the block rows qy in [qy0, qy1) of one image and group
// and the group's input channels [cl0, cl1). Each cols row is a contiguous
// copy of an x row segment.
template <typename scalar_t, typename acc_t>
void gather_cols(const scalar_t* x_ng, const PhasePlan& p, int64_t qy0, int64_t qy1, acc_t* cols,
                 int64_t cl0, int64_t cl1) {
  const int64_t nqw = p.w.nq, ncols = (qy1 - qy0) * nqw;
  const int64_t in_h = p.h.in, in_w = p.w.in;
  for (int64_t cl = cl0; cl < cl1; ++cl)
    for (int64_t my = 0; my < p.h.taps; ++my)
      for (int64_t mx = 0; mx < p.w.taps; ++mx) {
        acc_t* row = cols + ((cl * p.h.taps + my) * p.w.taps + mx) * ncols;
        // ix = q_lo_w + qx - mx lies in [0, in_w) for qx in [qx_lo, qx_hi)
        const int64_t shift = p.w.q_lo - mx;
        const int64_t qx_lo = std::clamp<int64_t>(-shift, 0, nqw);
        const int64_t qx_hi = std::clamp<int64_t>(in_w - shift, qx_lo, nqw);
        for (int64_t qy = qy0; qy < qy1; ++qy) {
          acc_t* dst = row + (qy - qy0) * nqw;
          const int64_t iy = p.h.q_lo + qy - my;
          if (iy < 0 || iy >= in_h) {
            std::fill(dst, dst + nqw, acc_t(0));
            continue;
          }
          const scalar_t* src = x_ng + (cl * in_h + iy) * in_w + shift;
          std::fill(dst, dst + qx_lo, acc_t(0));
          for (int64_t qx = qx_lo; qx < qx_hi; ++qx) dst[qx] = static_cast<acc_t>(src[qx]);
          std::fill(dst + qx_hi, dst + nqw, acc_t(0));
        }
      }
}

// The kept output positions of block row qy and phase ry along the height:
// returns the output row (crop coordinates) or -1 when outside the crop.
inline int64_t out_row(const PhaseAxis& a, int64_t q, int64_t r) {
  const int64_t y = (a.q_lo + q) * a.stride + r - a.padding - a.crop_start;
  return (y >= 0 && y < a.crop_len) ? y : -1;
}

// out[n, group channels, rows of block row qy, :] from rt (nq_w, m_cols) of that row
// (plus the bias). Along the width, block qx and phase rx give output column
// (q_lo_w + qx) * s_w + rx - pad_w - left: runs of s_w contiguous columns.
template <typename scalar_t, typename acc_t>
void scatter_row(const acc_t* rt, const PhasePlan& p, int64_t qy, const scalar_t* bias_g,
                 scalar_t* out_ng) {
  const int64_t sh = p.h.stride, sw = p.w.stride, mc = p.m_cols();
  const int64_t oh = p.h.crop_len, ow = p.w.crop_len;
  for (int64_t co = 0; co < p.cout_g; ++co) {
    const acc_t b = bias_g ? static_cast<acc_t>(bias_g[co]) : acc_t(0);
    for (int64_t ry = 0; ry < sh; ++ry) {
      const int64_t y = out_row(p.h, qy, ry);
      if (y < 0) continue;
      scalar_t* orow = out_ng + (co * oh + y) * ow;
      const acc_t* src = rt + (co * sh + ry) * sw;
      // output column x = qx * sw + rx - off, off = pad_w + left - q_lo_w * sw
      const int64_t off = p.w.padding + p.w.crop_start - p.w.q_lo * sw;
      for (int64_t qx = 0; qx < p.w.nq; ++qx) {
        const int64_t x0 = qx * sw - off;
        const int64_t rx_lo = std::max<int64_t>(0, -x0), rx_hi = std::min<int64_t>(sw, ow - x0);
        const acc_t* s = src + qx * mc;
        scalar_t* o = orow + x0;
        for (int64_t rx = rx_lo; rx < rx_hi; ++rx) o[rx] = static_cast<scalar_t>(s[rx] + b);
      }
    }
  }
}

// gt[(qy - qy0) * nq_w + qx, (co, ry, rx)] = grad at that output position, zero
// where it lies outside the crop. The transpose of scatter_row.
template <typename scalar_t, typename acc_t>
void gather_grad_row(const scalar_t* grad_ng, const PhasePlan& p, int64_t qy, acc_t* gt) {
  const int64_t sh = p.h.stride, sw = p.w.stride, mc = p.m_cols();
  const int64_t oh = p.h.crop_len, ow = p.w.crop_len;
  const int64_t off = p.w.padding + p.w.crop_start - p.w.q_lo * sw;
  for (int64_t co = 0; co < p.cout_g; ++co)
    for (int64_t ry = 0; ry < sh; ++ry) {
      const int64_t y = out_row(p.h, qy, ry);
      acc_t* dst = gt + (co * sh + ry) * sw;
      if (y < 0) {
        for (int64_t qx = 0; qx < p.w.nq; ++qx) std::fill(dst + qx * mc, dst + qx * mc + sw, acc_t(0));
        continue;
      }
      const scalar_t* grow = grad_ng + (co * oh + y) * ow;
      for (int64_t qx = 0; qx < p.w.nq; ++qx) {
        const int64_t x0 = qx * sw - off;
        const int64_t rx_lo = std::max<int64_t>(0, -x0), rx_hi = std::min<int64_t>(sw, ow - x0);
        acc_t* d = dst + qx * mc;
        const scalar_t* g = grow + x0;
        for (int64_t rx = 0; rx < rx_lo; ++rx) d[rx] = acc_t(0);
        for (int64_t rx = rx_lo; rx < rx_hi; ++rx) d[rx] = static_cast<acc_t>(g[rx]);
        for (int64_t rx = std::max(rx_hi, rx_lo); rx < sw; ++rx) d[rx] = acc_t(0);
      }
    }
}

// grad_x[ci, iy, :] = sum over taps (my, mx) of dcols[(ci, my, mx), block (iy + my, ix + mx)]
// for one image and group; dcols is (k_rows, blocks) over the whole kept block range.
template <typename scalar_t, typename acc_t>
void gather_grad_input(const acc_t* dcols, const PhasePlan& p, scalar_t* gx_ng) {
  const int64_t in_h = p.h.in, in_w = p.w.in, nqh = p.h.nq, nqw = p.w.nq;
  const int64_t nb = p.blocks();
  at::parallel_for(0, p.cin_g * in_h, grain_for(in_w * p.h.taps * p.w.taps), [&](int64_t b, int64_t e) {
    std::vector<acc_t> acc(in_w);
    for (int64_t r = b; r < e; ++r) {
      const int64_t cl = r / in_h, iy = r % in_h;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t my = 0; my < p.h.taps; ++my) {
        const int64_t qy = iy + my - p.h.q_lo;
        if (qy < 0 || qy >= nqh) continue;
        for (int64_t mx = 0; mx < p.w.taps; ++mx) {
          const acc_t* src =
              dcols + ((cl * p.h.taps + my) * p.w.taps + mx) * nb + qy * nqw;
          // qx = ix + mx - q_lo_w in [0, nqw)
          const int64_t shift = mx - p.w.q_lo;
          const int64_t ix_lo = std::clamp<int64_t>(-shift, 0, in_w);
          const int64_t ix_hi = std::clamp<int64_t>(nqw - shift, ix_lo, in_w);
          for (int64_t ix = ix_lo; ix < ix_hi; ++ix) acc[ix] += src[ix + shift];
        }
      }
      scalar_t* dst = gx_ng + (cl * in_h + iy) * in_w;
      for (int64_t ix = 0; ix < in_w; ++ix) dst[ix] = static_cast<scalar_t>(acc[ix]);
    }
  });
}

template <typename scalar_t>
void forward_phase_gemm(const ConvTArgs& a, const PhasePlan& p, const at::Tensor& x,
                        const at::Tensor& weight, const scalar_t* bias, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& g = a.g;
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor wt = phase_weight(weight, p, g.groups, acc_type);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t nqw = p.w.nq, rows = p.h.nq;
  const int64_t units = a.batch * g.groups * rows;
  const auto opts = wt.options();
  // One unit = one block row of one image and group: gather its cols, one GEMM,
  // permute into the output while the result is still in cache.
  at::parallel_for(0, units, grain_for(nqw * p.k_rows() * p.m_cols()), [&](int64_t begin, int64_t end) {
    at::Tensor cols = at::empty({p.k_rows(), nqw}, opts);
    at::Tensor rt = at::empty({nqw, p.m_cols()}, opts);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t qy = u % rows, ng = u / rows, grp = ng % g.groups, n = ng / g.groups;
      const scalar_t* x_ng = xp + (n * g.in_channels + grp * p.cin_g) * g.in_h * g.in_w;
      gather_cols(x_ng, p, qy, qy + 1, cols.data_ptr<acc_t>(), 0, p.cin_g);
      at::mm_out(rt, cols.t(), wt[grp]);
      scalar_t* out_ng = op + (n * g.out_channels + grp * p.cout_g) * g.crop_h * g.crop_w;
      scatter_row(rt.data_ptr<acc_t>(), p, qy, bias ? bias + grp * p.cout_g : nullptr, out_ng);
    }
  });
}

template <typename scalar_t>
void backward_phase_gemm(const ConvTArgs& a, const PhasePlan& p, const at::Tensor& grad,
                         const at::Tensor& x, const at::Tensor& weight, at::Tensor* grad_x,
                         at::Tensor* grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& g = a.g;
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor wt = phase_weight(weight, p, g.groups, acc_type);
  const auto opts = wt.options();
  const int64_t nb = p.blocks(), rows = p.h.nq;
  at::Tensor gt = at::empty({nb, p.m_cols()}, opts);
  at::Tensor cols = grad_weight ? at::empty({p.k_rows(), nb}, opts) : at::Tensor();
  at::Tensor dcols = grad_x ? at::empty({p.k_rows(), nb}, opts) : at::Tensor();
  at::Tensor dwt = grad_weight ? at::zeros({g.groups, p.k_rows(), p.m_cols()}, opts) : at::Tensor();
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  // Images and groups in a fixed order; each step is a deterministic GEMM or gather.
  for (int64_t n = 0; n < a.batch; ++n)
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const scalar_t* grad_ng = gp + (n * g.out_channels + grp * p.cout_g) * g.crop_h * g.crop_w;
      at::parallel_for(0, rows, grain_for(p.w.nq * p.m_cols()), [&](int64_t b, int64_t e) {
        for (int64_t qy = b; qy < e; ++qy)
          gather_grad_row(grad_ng, p, qy, gt.data_ptr<acc_t>() + qy * p.w.nq * p.m_cols());
      });
      if (grad_weight) {
        const scalar_t* x_ng = xp + (n * g.in_channels + grp * p.cin_g) * g.in_h * g.in_w;
        const int64_t per_channel = p.h.taps * p.w.taps * nb;
        at::parallel_for(0, p.cin_g, grain_for(per_channel), [&](int64_t b, int64_t e) {
          gather_cols(x_ng, p, 0, rows, cols.data_ptr<acc_t>(), b, e);
        });
        at::Tensor d = dwt[grp];
        d.addmm_(cols, gt);
      }
      if (grad_x) {
        at::mm_out(dcols, wt[grp], gt.t());
        scalar_t* gx_ng = grad_x->data_ptr<scalar_t>() +
                          (n * g.in_channels + grp * p.cin_g) * g.in_h * g.in_w;
        gather_grad_input(dcols.data_ptr<acc_t>(), p, gx_ng);
      }
    }
  if (grad_weight)
    unphase_weight(dwt.data_ptr<acc_t>(), p, g.in_channels, grad_weight->data_ptr<scalar_t>());
}

// ---------------------------------------------------------------------------
// direct per-pixel path
// ---------------------------------------------------------------------------

template <typename scalar_t>
void forward_direct(const ConvTArgs& a, const at::Tensor& x, const at::Tensor& weight,
                    const scalar_t* bias, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& g = a.g;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t rows = a.batch * g.out_channels * g.crop_h;
  const int64_t taps = (g.in_channels / g.groups) * g.kernel_h * g.kernel_w;
  at::parallel_for(0, rows, grain_for(g.crop_w * taps), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t y = r % g.crop_h, nc = r / g.crop_h, co = nc % g.out_channels,
                    n = nc / g.out_channels;
      const scalar_t* x_n = xp + n * g.in_channels * g.in_h * g.in_w;
      const acc_t bv = bias ? static_cast<acc_t>(bias[co]) : acc_t(0);
      scalar_t* orow = op + r * g.crop_w;
      for (int64_t xo = 0; xo < g.crop_w; ++xo)
        orow[xo] = static_cast<scalar_t>(
            conv_transpose2d_output_pixel<scalar_t, acc_t>(g, x_n, wp, co, y + g.crop_top,
                                                           xo + g.crop_left) +
            bv);
    }
  });
}

template <typename scalar_t>
void backward_direct(const ConvTArgs& a, const at::Tensor& grad, const at::Tensor& x,
                     const at::Tensor& weight, at::Tensor* grad_x, at::Tensor* grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& g = a.g;
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const int64_t x_img = g.in_channels * g.in_h * g.in_w;
  const int64_t g_img = g.out_channels * g.crop_h * g.crop_w;
  if (grad_x) {
    scalar_t* gx = grad_x->data_ptr<scalar_t>();
    const int64_t taps = (g.out_channels / g.groups) * g.kernel_h * g.kernel_w;
    at::parallel_for(0, a.batch * g.in_channels * g.in_h, grain_for(g.in_w * taps), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t iy = r % g.in_h, nc = r / g.in_h, ci = nc % g.in_channels,
                      n = nc / g.in_channels;
        for (int64_t ix = 0; ix < g.in_w; ++ix)
          gx[r * g.in_w + ix] = static_cast<scalar_t>(
              conv_transpose2d_grad_input_pixel<scalar_t, acc_t>(g, gp + n * g_img, wp, ci, iy,
                                                                 ix));
      }
    });
  }
  if (grad_weight) {
    scalar_t* gw = grad_weight->data_ptr<scalar_t>();
    const int64_t cout_g = g.out_channels / g.groups;
    const int64_t khw = g.kernel_h * g.kernel_w;
    const int64_t per_elem = a.batch * g.in_h * g.in_w;
    at::parallel_for(0, grad_weight->numel(), grain_for(per_elem), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t kx = i % g.kernel_w, ky = (i / g.kernel_w) % g.kernel_h;
        const int64_t cl = (i / khw) % cout_g, ci = i / (khw * cout_g);
        acc_t acc = acc_t(0);
        for (int64_t n = 0; n < a.batch; ++n)
          acc += conv_transpose2d_grad_weight_image<scalar_t, acc_t>(g, xp + n * x_img,
                                                                     gp + n * g_img, ci, cl, ky, kx);
        gw[i] = static_cast<scalar_t>(acc);
      }
    });
  }
}

// ---------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------

at::Tensor conv_transpose2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef output_padding,
                                int64_t groups, at::IntArrayRef dilation, at::IntArrayRef crop) {
  ConvTArgs a = check_conv_transpose2d(x, weight, stride, padding, output_padding, groups,
                                       dilation, crop);
  check_bias(bias, x, a.g.out_channels);
  const auto& g = a.g;
  auto out = at::empty({a.batch, g.out_channels, g.crop_h, g.crop_w}, x.options());
  if (out.numel() == 0) return out;
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  at::Tensor bc = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  const PhasePlan plan = make_plan(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_transpose2d", [&] {
    const scalar_t* bp = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
    if (use_phase_gemm(plan))
      forward_phase_gemm<scalar_t>(a, plan, xc, wc, bp, out);
    else
      forward_direct<scalar_t>(a, xc, wc, bp, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, at::IntArrayRef crop, std::array<bool, 3> output_mask) {
  check_defined(grad, "grad");
  ConvTArgs a = check_conv_transpose2d(x, weight, stride, padding, output_padding, groups,
                                       dilation, crop);
  const auto& g = a.g;
  check_dim(grad, 4, "grad");
  check_same(x, "x", grad, "grad");
  TORCH_CHECK_VALUE(grad.size(0) == a.batch && grad.size(1) == g.out_channels &&
                        grad.size(2) == g.crop_h && grad.size(3) == g.crop_w,
                    "fcnfast: grad has shape ", shape_str(grad), ", expected [", a.batch, ", ",
                    g.out_channels, ", ", g.crop_h, ", ", g.crop_w, "] (the cropped output)");
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_transpose2d_backward", [&] {
    if (use_phase_gemm(plan))
      backward_phase_gemm<scalar_t>(a, plan, gc, xc, wc, gx_p, gw_p);
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

// Per-pixel math of conv_transpose2d (transposed convolution + output crop),
// shared by the CPU kernels (csrc/cpu/conv_transpose2d.cpp) and the CUDA
// kernels. Torch-free and C++17, like geometry.h.
//
// Semantics (PyTorch layouts, all tensors contiguous NCHW):
//   out = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding,
//                            groups, dilation)[..., top:top+h, left:left+w]
//   x      (N, in_channels, in_h, in_w)
//   weight (in_channels, out_channels / groups, kernel_h, kernel_w)
//   out    (N, out_channels, crop_h, crop_w)
// Input channel ci belongs to group ci / (in_channels / groups); in that
// group, local output channel c feeds global output channel
// group * (out_channels / groups) + c.
//
// Phase decomposition: full-output position y (0 <= y < full size) receives
// tap k from input position i exactly when y + padding - k * dilation ==
// i * stride. For a fixed y these taps form an arithmetic progression
// (TapRange), so every function below is a pure gather: one output (or one
// gradient element) is a short sum computed by one thread, no atomics, a
// fixed summation order, hence bitwise reproducible.
//
// Every function takes one image (pointers already offset by n) and
// accumulates in Acc (float for float/bfloat16/half inputs, double for double).
#pragma once

#include "fast_div.h"
#include "geometry.h"

namespace fcnfast {

// Geometry of one conv_transpose2d call. out_channels is the total
// (weight.size(1) * groups). crop_* is the kept window of the full output.
// I is the index type: int64_t on the CPU, int in the CUDA kernels (see
// fast_div.h); every function below computes in I.
template <typename I>
struct ConvTranspose2dGeomT {
  I in_channels, in_h, in_w;
  I out_channels, groups;
  I kernel_h, kernel_w;
  I stride_h, stride_w;
  I pad_h, pad_w;
  I dil_h, dil_w;
  I crop_top, crop_left, crop_h, crop_w;
};
using ConvTranspose2dGeom = ConvTranspose2dGeomT<int64_t>;

template <typename I>
FCN_HD I gcd_of(I a, I b) {
  while (b != 0) {
    I t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// One axis of the geometry with everything a pixel needs precomputed: the
// per-call constants of the phase rule and the divisors (Div: PlainDiv on the
// CPU, FastDiv on the GPU; fast_div.h). Built once per call (CPU) or per block
// (GPU) by make_conv_plan, never per pixel.
template <typename I, typename Div>
struct TapAxis {
  I kernel, padding, in;   // the geometry of this axis (stride, dilation: by_stride.d, ...)
  I crop_start, crop_len;  // the kept window of the full output
  I dil_mod;               // dilation % stride
  Div by_stride, by_dilation;
  Div by_k_step, by_i_step;  // stride / g, dilation / g, g = gcd(stride, dilation)
};

// The per-call plan of the pixel functions: both axes and the channel groups.
template <typename I, typename Div>
struct ConvTranspose2dPlan {
  TapAxis<I, Div> h, w;
  I cin_g, cout_g;  // input and output channels per group
  Div by_cin_g, by_cout_g;
};

template <typename I, typename MakeDiv>
FCN_HD auto make_tap_axis(I kernel, I stride, I padding, I dilation, I in, I crop_start, I crop_len,
                          MakeDiv make_div) -> TapAxis<I, decltype(make_div(I(1)))> {
  const I g = gcd_of(stride, dilation);
  return {kernel,
          padding,
          in,
          crop_start,
          crop_len,
          dilation % stride,
          make_div(stride),
          make_div(dilation),
          make_div(stride / g),
          make_div(dilation / g)};
}

template <typename I, typename MakeDiv>
FCN_HD auto make_conv_plan(const ConvTranspose2dGeomT<I>& g, MakeDiv make_div)
    -> ConvTranspose2dPlan<I, decltype(make_div(I(1)))> {
  const I cin_g = g.in_channels / g.groups, cout_g = g.out_channels / g.groups;
  return {make_tap_axis(g.kernel_h, g.stride_h, g.pad_h, g.dil_h, g.in_h, g.crop_top, g.crop_h,
                        make_div),
          make_tap_axis(g.kernel_w, g.stride_w, g.pad_w, g.dil_w, g.in_w, g.crop_left, g.crop_w,
                        make_div),
          cin_g,
          cout_g,
          make_div(cin_g > 0 ? cin_g : I(1)),
          make_div(cout_g > 0 ? cout_g : I(1))};
}

// The CPU's plan: plain division in int64_t.
FCN_HD ConvTranspose2dPlan<int64_t, PlainDiv<int64_t>> make_conv_plan(
    const ConvTranspose2dGeom& g) {
  return make_conv_plan(g, MakePlainDiv());
}

// The taps that reach one full-output position along one axis:
//   k = k_first + j * k_step (kernel index), i = i_first - j * i_step (input
//   index), for j in [0, count). count == 0: no tap lands there.
template <typename I>
struct TapRange {
  I k_first, k_step, i_first, i_step, count;
};

template <typename I, typename Div>
FCN_HD TapRange<I> conv_transpose_tap_range(const TapAxis<I, Div>& ax, I y) {
  const I stride = ax.by_stride.d, k_step = ax.by_k_step.d;
  TapRange<I> r{0, k_step, 0, ax.by_i_step.d, 0};
  const I a = y + ax.padding;  // >= 0
  const I qa = ax.by_stride.div(a), ra = a - qa * stride;
  // The first tap k0: k0 * dilation == a (mod stride), among k = 0 .. stride/g - 1
  // (the residues of k*dilation modulo stride repeat with period stride/g);
  // kd = k * dilation % stride, stepped without dividing.
  const I k_end = k_step < ax.kernel ? k_step : ax.kernel;
  I k0 = -1;
  for (I k = 0, kd = 0; k < k_end; ++k) {
    if (kd == ra) {
      k0 = k;
      break;
    }
    kd += ax.dil_mod;
    if (kd >= stride) kd -= stride;
  }
  if (k0 < 0) return r;
  // a - k0*dilation is a multiple of stride; k0*dilation - ra >= 0 is one too
  const I i0 = qa - ax.by_stride.div(k0 * ax.by_dilation.d - ra);
  // j must keep k < kernel and 0 <= i0 - j*i_step < in.
  const I j_lo = i0 - ax.in + 1 > 0 ? ceil_div_by(i0 - ax.in + 1, ax.by_i_step) : I(0);
  I j_hi = ceil_div_by(ax.kernel - k0, ax.by_k_step);
  const I j_in = i0 >= 0 ? ax.by_i_step.div(i0) + 1 : I(0);
  if (j_in < j_hi) j_hi = j_in;
  if (j_hi <= j_lo) return r;
  r.k_first = k0 + j_lo * r.k_step;
  r.i_first = i0 - j_lo * r.i_step;
  r.count = j_hi - j_lo;
  return r;
}

// Input positions i (half-open [*lo, *hi)) whose tap k lands inside the kept
// window [crop_start, crop_start + crop_len) of the full output along one axis:
// y = i * stride - padding + k * dilation.
template <typename I, typename Div>
FCN_HD void conv_transpose_input_range(const TapAxis<I, Div>& ax, I k, I* lo, I* hi) {
  const I base = ax.padding - k * ax.by_dilation.d;
  I a = ceil_div_by(ax.crop_start + base, ax.by_stride);
  I b = floor_div_by(ax.crop_start + ax.crop_len - 1 + base, ax.by_stride) + 1;
  if (a < 0) a = 0;
  if (b > ax.in) b = ax.in;
  *lo = a;
  *hi = b > a ? b : a;
}

// Kernel taps k (half-open [*lo, *hi)) through which input position i reaches
// the kept window of the full output along one axis.
template <typename I, typename Div>
FCN_HD void conv_transpose_kernel_range(const TapAxis<I, Div>& ax, I i, I* lo, I* hi) {
  const I base = i * ax.by_stride.d - ax.padding;  // y = base + k * dilation
  I a = ceil_div_by(ax.crop_start - base, ax.by_dilation);
  I b = floor_div_by(ax.crop_start + ax.crop_len - 1 - base, ax.by_dilation) + 1;
  if (a < 0) a = 0;
  if (b > ax.kernel) b = ax.kernel;
  *lo = a;
  *hi = b > a ? b : a;
}

// Forward: out[n, co, y - crop_top, x - crop_left] without the bias, where
// (y, x) is a full-output position. x_n = x[n] (in_channels, in_h, in_w),
// w = weight. Sum order: input channel, then kernel row, then kernel column.
template <typename T, typename Acc, typename I, typename Div>
FCN_HD Acc conv_transpose2d_output_pixel(const ConvTranspose2dGeomT<I>& g,
                                         const ConvTranspose2dPlan<I, Div>& plan, const T* x_n,
                                         const T* w, I co, I y, I x) {
  const TapRange<I> ty = conv_transpose_tap_range(plan.h, y);
  const TapRange<I> tx = conv_transpose_tap_range(plan.w, x);
  Acc acc = Acc(0);
  if (ty.count == 0 || tx.count == 0) return acc;
  const I cout_g = plan.cout_g, cin_g = plan.cin_g;
  const I group = plan.by_cout_g.div(co), c_local = co - group * cout_g;
  const I khw = g.kernel_h * g.kernel_w;
  for (I ci = group * cin_g; ci < (group + 1) * cin_g; ++ci) {
    const T* xc = x_n + ci * g.in_h * g.in_w;
    const T* wc = w + (ci * cout_g + c_local) * khw;
    for (I jy = 0; jy < ty.count; ++jy) {
      const I ky = ty.k_first + jy * ty.k_step, iy = ty.i_first - jy * ty.i_step;
      for (I jx = 0; jx < tx.count; ++jx) {
        const I kx = tx.k_first + jx * tx.k_step, ix = tx.i_first - jx * tx.i_step;
        acc += Acc(xc[iy * g.in_w + ix]) * Acc(wc[ky * g.kernel_w + kx]);
      }
    }
  }
  return acc;
}

// Backward w.r.t. x: grad_x[n, ci, iy, ix]. grad_n = grad[n] (out_channels,
// crop_h, crop_w): the gradient of the cropped output (zero outside the crop).
// A strided correlation of grad with the weight. Sum order: output channel,
// kernel row, kernel column.
template <typename T, typename Acc, typename I, typename Div>
FCN_HD Acc conv_transpose2d_grad_input_pixel(const ConvTranspose2dGeomT<I>& g,
                                             const ConvTranspose2dPlan<I, Div>& plan,
                                             const T* grad_n, const T* w, I ci, I iy, I ix) {
  I ky0, ky1, kx0, kx1;
  conv_transpose_kernel_range(plan.h, iy, &ky0, &ky1);
  conv_transpose_kernel_range(plan.w, ix, &kx0, &kx1);
  Acc acc = Acc(0);
  const I cout_g = plan.cout_g;
  const I group = plan.by_cin_g.div(ci);
  const I khw = g.kernel_h * g.kernel_w;
  const I y0 = iy * g.stride_h - g.pad_h - g.crop_top;
  const I x0 = ix * g.stride_w - g.pad_w - g.crop_left;
  for (I c = 0; c < cout_g; ++c) {
    const T* gc = grad_n + (group * cout_g + c) * g.crop_h * g.crop_w;
    const T* wc = w + (ci * cout_g + c) * khw;
    for (I ky = ky0; ky < ky1; ++ky) {
      const T* grow = gc + (y0 + ky * g.dil_h) * g.crop_w + x0;
      for (I kx = kx0; kx < kx1; ++kx)
        acc += Acc(grow[kx * g.dil_w]) * Acc(wc[ky * g.kernel_w + kx]);
    }
  }
  return acc;
}

// Backward w.r.t. the weight, one image's contribution to
// grad_weight[ci, c_local, ky, kx]: sum over the input positions whose tap
// (ky, kx) lands in the crop of x_n[ci, iy, ix] * grad_n[co, y, x]. Callers
// sum the images in a fixed order. Sum order: input row, input column.
template <typename T, typename Acc, typename I, typename Div>
FCN_HD Acc conv_transpose2d_grad_weight_image(const ConvTranspose2dGeomT<I>& g,
                                              const ConvTranspose2dPlan<I, Div>& plan, const T* x_n,
                                              const T* grad_n, I ci, I c_local, I ky, I kx) {
  I iy0, iy1, ix0, ix1;
  conv_transpose_input_range(plan.h, ky, &iy0, &iy1);
  conv_transpose_input_range(plan.w, kx, &ix0, &ix1);
  const I cout_g = plan.cout_g;
  const I co = plan.by_cin_g.div(ci) * cout_g + c_local;
  const T* xc = x_n + ci * g.in_h * g.in_w;
  const T* gc = grad_n + co * g.crop_h * g.crop_w;
  const I dy = ky * g.dil_h - g.pad_h - g.crop_top;
  const I dx = kx * g.dil_w - g.pad_w - g.crop_left;
  Acc acc = Acc(0);
  for (I iy = iy0; iy < iy1; ++iy) {
    const T* xrow = xc + iy * g.in_w;
    const T* grow = gc + (iy * g.stride_h + dy) * g.crop_w + dx;
    for (I ix = ix0; ix < ix1; ++ix) acc += Acc(xrow[ix]) * Acc(grow[ix * g.stride_w]);
  }
  return acc;
}

}  // namespace fcnfast

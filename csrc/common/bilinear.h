// Tap math of the frozen FCN bilinear upsampling, shared by the CPU and CUDA kernels.
//
// bilinear_upsample2d(x, s) is a depthwise transposed convolution with kernel
// k = 2s, stride s, no padding, and Caffe's bilinear filter w(t) (t = 0..2s-1),
// so the full output has (H+1)*s rows. Because k = 2*stride, every output
// position Y (full-output coordinates, before the crop) receives exactly two
// input positions along an axis (the phase rule, see geometry.h):
//
//   q = Y / s, r = Y % s
//   input hi = q     with tap t = r      weight w(r)     = (r + 0.5) / s
//   input lo = q - 1 with tap t = r + s  weight w(r + s) = 1 - (r + 0.5) / s
//
// and an input that lies outside [0, in_size) simply contributes nothing (it
// is not multiplied by a zero weight: 0 * Inf would be NaN where the reference
// has none). The 2-D filter is the outer product, so the op is separable.
//
// Arithmetic order (the CPU kernels follow it exactly, so upsample_argmax and
// upsample_cross_entropy see the very values bilinear_upsample2d returns):
//   forward:  h(row)   = fma(x[row][lo_x], w_lo_x, x[row][hi_x] * w_hi_x)   (horizontal first)
//             out(Y,X) = fma(h(lo_y), w_lo_y, h(hi_y) * w_hi_y)              (then vertical)
//   backward: G(X)     = fma-accumulated over the band rows Y, ascending: G = fma(w_y(Y),
//   grad[Y][X], G)
//             gx(i,j)  = fma-accumulated over the band columns X, ascending: gx = fma(w_x(X), G(X),
//             gx)
// where a missing tap is a missing term (a CPU kernel may instead read a zero:
// fma(0, w, p) == p and fma(v, w, 0 * w') == v * w, bitwise, for finite w).
//
// Torch-free; FCN_HD functions compile for host and device. Index math is in
// the index type I of the caller (int64_t on the CPU, int on the GPU; see
// fast_div.h).
#pragma once

#include "fast_div.h"
#include "geometry.h"

#if !defined(__CUDACC_RTC__) && !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace fcnfast {

// a * b + c with one rounding. The kernels spell every multiply-add as an
// explicit fma so the compiler's contraction choices (which differ between
// vectorised and scalar loops) cannot change the result: the forward, the
// argmax and the cross-entropy kernels then see bitwise the same values.
template <typename T>
FCN_HD T bl_fma(T a, T b, T c) {
#if defined(__CUDA_ARCH__) || defined(__CUDACC_RTC__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// The two input taps feeding output position `y` (full-output coordinate).
template <typename T, typename I = int64_t>
struct BilinearTaps {
  I lo;         // input index of the lower tap (= hi - 1); may be -1
  T w_lo;       // weight of input `lo`
  T w_hi;       // weight of input `lo + 1`
  bool has_lo;  // 0 <= lo < in_size
  bool has_hi;  // 0 <= lo + 1 < in_size
};

// Caffe weight of tap t (0 <= t < 2*scale) of the kernel-2*scale bilinear filter.
template <typename T, typename I>
FCN_HD T bilinear_tap_weight(I t, I scale) {
  return caffe_bilinear_1d<T>(t, I(2) * scale);
}

// Taps of output position `y` of an axis whose input has `in_size` positions.
// `scale` divides y: a PlainDiv / FastDiv (fast_div.h), or an integer.
template <typename T, typename I, typename Div>
FCN_HD BilinearTaps<T, I> bilinear_taps(I y, const Div& scale, I in_size) {
  const I s = scale.d, q = scale.div(y), r = y - q * s;
  BilinearTaps<T, I> taps;
  taps.lo = q - 1;
  taps.w_lo = bilinear_tap_weight<T>(r + s, s);
  taps.w_hi = bilinear_tap_weight<T>(r, s);
  taps.has_lo = q - 1 >= 0 && q - 1 < in_size;
  taps.has_hi = q < in_size;
  return taps;
}
template <typename T, typename I>
FCN_HD BilinearTaps<T, I> bilinear_taps(I y, I scale, I in_size) {
  return bilinear_taps<T>(y, PlainDiv<I>{scale}, in_size);
}

// Horizontal pass of one input row at output column X: the documented h(row).
template <typename T, typename Acc, typename I>
FCN_HD Acc bilinear_row_value(const T* row, const BilinearTaps<Acc, I>& tx) {
  if (tx.has_lo && tx.has_hi)
    return bl_fma(Acc(row[tx.lo]), tx.w_lo, Acc(row[tx.lo + 1]) * tx.w_hi);
  if (tx.has_lo) return Acc(row[tx.lo]) * tx.w_lo;
  if (tx.has_hi) return Acc(row[tx.lo + 1]) * tx.w_hi;
  return Acc(0);
}

// Value of one output pixel (Y, X in full-output coordinates) of one channel
// plane `x` (in_h x in_w, row-major), accumulated in Acc, in the documented
// order (horizontal, then vertical).
template <typename T, typename Acc, typename I, typename Scale>
FCN_HD Acc bilinear_pixel(const T* x, I in_h, I in_w, const Scale& scale, I Y, I X) {
  const BilinearTaps<Acc, I> ty = bilinear_taps<Acc>(Y, scale, in_h);
  const BilinearTaps<Acc, I> tx = bilinear_taps<Acc>(X, scale, in_w);
  const Acc h_lo = ty.has_lo ? bilinear_row_value<T, Acc>(x + ty.lo * in_w, tx) : Acc(0);
  const Acc h_hi = ty.has_hi ? bilinear_row_value<T, Acc>(x + (ty.lo + 1) * in_w, tx) : Acc(0);
  if (ty.has_lo && ty.has_hi) return bl_fma(h_lo, ty.w_lo, h_hi * ty.w_hi);
  if (ty.has_lo) return h_lo * ty.w_lo;
  if (ty.has_hi) return h_hi * ty.w_hi;
  return Acc(0);
}

// Output rows (or columns) that input position `i` feeds, intersected with the
// kept window [crop_start, crop_start + crop_len), as crop-relative indices
// [*begin, *end) (empty when *begin >= *end). Input i feeds full positions
// [i*s, i*s + 2s).
template <typename I>
FCN_HD void bilinear_band(I i, I scale, I crop_start, I crop_len, I* begin, I* end) {
  I b = i * scale - crop_start, e = b + I(2) * scale;
  *begin = b < 0 ? 0 : b;
  *end = e > crop_len ? crop_len : e;
}

// Gradient of one input pixel (i, j) of one plane from the crop-relative
// gradient plane `grad` (crop_h x crop_w, row-major) of the crop at
// (top, left): a gather over its (2s)x(2s) window, in the documented order
// (vertical over the band rows, then horizontal over the band columns).
template <typename T, typename Acc, typename I>
FCN_HD Acc bilinear_grad_pixel(const T* grad, I crop_h, I crop_w, I top, I left, I scale, I i,
                               I j) {
  I y0, y1, x0, x1;
  bilinear_band(i, scale, top, crop_h, &y0, &y1);
  bilinear_band(j, scale, left, crop_w, &x0, &x1);
  Acc out = Acc(0);
  for (I x = x0; x < x1; ++x) {
    Acc g = Acc(0);
    for (I y = y0; y < y1; ++y) {
      g = bl_fma(bilinear_tap_weight<Acc>(top + y - i * scale, scale), Acc(grad[y * crop_w + x]),
                 g);
    }
    out = bl_fma(bilinear_tap_weight<Acc>(left + x - j * scale, scale), g, out);
  }
  return out;
}

}  // namespace fcnfast

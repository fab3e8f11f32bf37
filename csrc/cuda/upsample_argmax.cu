// CUDA kernel for upsample_argmax: bilinear_upsample2d(x, scale, crop).argmax(1)
// without materialising the C x H x W scores. One thread per kept output pixel
// walks the classes; each score is rounded to the storage dtype first (the
// value bilinear_upsample2d would return). Ties go to the lowest class and a
// NaN wins (first NaN), as torch.argmax. Scores come from csrc/common/bilinear.h
// bilinear_pixel, the values bilinear_upsample2d computes.
#include "cuda/kernel_utils.cuh"  // first: NVRTC integer types
#include "common/bilinear.h"
#ifndef __CUDACC_RTC__
#include "cuda/launchers.h"
#endif

namespace fcnfast {
namespace cuda {

template <typename T>
__global__ void upsample_argmax_kernel(const T* __restrict__ x, int64_t* __restrict__ labels,
                                       int total, int channels, int in_h, int in_w, int scale,
                                       int top, int left, int out_h, int out_w) {
  typedef typename AccOf<T>::type Acc;
  const int in_plane = in_h * in_w;
  const FastDivs<3>& f = block_fast_divs({out_w, out_h, scale});
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    int oxy[2];
    const int n = split_index(f, 2, idx, oxy);
    const int ox = oxy[0], oy = oxy[1];
    const T* xn = x + n * channels * in_plane;
    int best = 0;
    Acc best_v = Acc(0);
    for (int c = 0; c < channels; ++c) {
      const Acc v = round_to<T>(
          bilinear_pixel<T, Acc>(xn + c * in_plane, in_h, in_w, f.d[2], top + oy, left + ox));
      if (c == 0 || (v > best_v && best_v == best_v) || (v != v && best_v == best_v)) {
        best = c;
        best_v = v;
      }
    }
    labels[idx] = best;
  }
}

#ifndef __CUDACC_RTC__
cudaError_t upsample_argmax(DType dtype, const void* x, int64_t* labels, const UpsampleShape& s,
                            cudaStream_t stream) {
  const long long total = static_cast<long long>(s.n) * s.out_h * s.out_w;
  if (total == 0 || s.channels == 0) return cudaSuccess;
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    return launch(upsample_argmax_kernel<T>, grid_for(total), stream, static_cast<const T*>(x),
                  labels, static_cast<int>(total), s.channels, s.in_h, s.in_w, s.scale, s.top,
                  s.left, s.out_h, s.out_w);
  });
}
#endif  // __CUDACC_RTC__

}  // namespace cuda
}  // namespace fcnfast

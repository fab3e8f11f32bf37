// Division of non-negative indices by a divisor fixed for a whole kernel launch
// (a stride, a dilation, a tensor extent), shared by the CPU and CUDA kernels.
//
//   PlainDiv<I>: n / d. The CPU's choice: a 64-bit divide is one instruction.
//   FastDiv:     32-bit n / d as a multiply-high, an add and a shift
//                (Granlund & Montgomery 1994, the scheme of PyTorch's
//                IntDivider), exact for 0 <= n, d < 2^31. On the GPU an integer
//                divide is a ~20-instruction sequence; the CUDA kernels build
//                their FastDivs once per block and reuse them for every element.
// floor_div_by / ceil_div_by extend either to negative numerators.
//
// Index type: the CPU kernels index in int64_t, the CUDA kernels in int (their
// bindings refuse sizes past INT32_MAX / 2, so every intermediate fits), which
// keeps 64-bit divisions -- a subroutine call on the GPU -- out of the kernels.
// Torch-free; FCN_HD functions compile for host and device.
#pragma once

#include "geometry.h"  // <cstdint>; under NVRTC, csrc/cuda/kernel_utils.cuh defines the types

namespace fcnfast {

template <typename I>
struct PlainDiv {
  I d;
  FCN_HD I div(I n) const { return n / d; }
};

struct MakePlainDiv {
  template <typename I>
  FCN_HD PlainDiv<I> operator()(I d) const {
    return PlainDiv<I>{d};
  }
};

struct FastDiv {
  int d;
  uint32_t m, s;
  FCN_HD int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(u, m);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(u) * m) >> 32);
#endif
    return static_cast<int>((hi + u) >> s);  // hi <= u < 2^31: the add cannot wrap
  }
};

// d in [1, 2^31): s = ceil(log2 d), m = floor(2^32 * (2^s - d) / d) + 1. The
// quotient is taken bit by bit (2^s - d < d, so it has 32 bits): no division
// at all, not even the 64-bit one a GPU runs as a subroutine.
struct MakeFastDiv {
  FCN_HD FastDiv operator()(int d) const {
    const uint64_t ud = static_cast<uint64_t>(d);
    uint32_t s = 0;
    while ((uint64_t(1) << s) < ud) ++s;
    uint64_t rem = (uint64_t(1) << s) - ud;  // < ud
    uint32_t q = 0;
    for (int bit = 0; bit < 32; ++bit) {
      rem <<= 1;
      q <<= 1;
      if (rem >= ud) {
        rem -= ud;
        q |= 1u;
      }
    }
    return FastDiv{d, q + 1u, s};
  }
};

// floor(n / d) and ceil(n / d) for any sign of n (d > 0); |n| + d must fit I.
template <typename I, typename Div>
FCN_HD I floor_div_by(I n, const Div& d) {
  return n >= 0 ? d.div(n) : -d.div(-n + d.d - 1);
}
template <typename I, typename Div>
FCN_HD I ceil_div_by(I n, const Div& d) {
  return n > 0 ? d.div(n + d.d - 1) : -d.div(-n);
}

}  // namespace fcnfast

// Device helpers shared by the fcnfast CUDA kernels (csrc/cuda/*.cu).
//
// Torch-free and NVRTC-compatible: the same .cu sources are compiled by nvcc
// into the extension and by NVRTC through CuPy (fcnfast/_cupy.py). Kernels are
// templates in namespace fcnfast::cuda, instantiated by the host launchers
// under nvcc and by name expressions (e.g.
// "fcnfast::cuda::skip_add_crop_kernel<__half>") under NVRTC. Host code sits
// behind `#ifndef __CUDACC_RTC__`. Include paths are relative to csrc/.
#pragma once

#ifdef __CUDACC_RTC__
// NVRTC has no <cstdint>; the kernels and csrc/common (fast_div.h) need these.
#ifndef FCNFAST_RTC_INT_TYPES
#define FCNFAST_RTC_INT_TYPES
typedef long long int64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#endif
#else
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>
#endif

// PyTorch's CUDAExtension defines these to keep at::Half unambiguous; these
// files include no torch header, and the shared csrc/common functions convert
// with Acc(x), which needs the __half / __nv_bfloat16 conversion operators.
#undef __CUDA_NO_HALF_OPERATORS__
#undef __CUDA_NO_HALF_CONVERSIONS__
#undef __CUDA_NO_HALF2_OPERATORS__
#undef __CUDA_NO_BFLOAT16_CONVERSIONS__
#undef __CUDA_NO_BFLOAT16_OPERATORS__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/fast_div.h"
#include "common/geometry.h"

namespace fcnfast {
namespace cuda {

// Threads per block of every kernel. Reductions assume exactly this many.
constexpr int kBlock = 256;

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T>
struct AccOf {
  typedef float type;
};
template <>
struct AccOf<double> {
  typedef double type;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type v) {
  return T(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round an accumulated value to the storage type and back: the fused kernels
// (argmax, cross-entropy) then see the values bilinear_upsample2d would store.
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type round_to(typename AccOf<T>::type v) {
  return to_acc(from_acc<T>(v));
}

// A per-launch constant that is costly to compute (FastDivs: fast_div.h),
// computed by thread 0 once per block and read by every thread from shared
// memory. Every thread of the block must call it (it has a barrier). One
// shared slot per (V, Make) type: two calls in one kernel need two Make types.
template <typename V, typename Make>
__device__ __forceinline__ const V& block_constant(const Make& make) {
  __shared__ V value;
  if (threadIdx.x == 0) value = make();
  __syncthreads();
  return value;
}

// FastDivs of a launch's fixed divisors (tensor extents, a scale), built once per
// block: block_fast_divs({out_w, out_h, scale}).d[k]. One call per kernel.
template <int N>
struct FastDivs {
  FastDiv d[N];
};

template <int N>
__device__ __forceinline__ const FastDivs<N>& block_fast_divs(const int (&divisors)[N]) {
  return block_constant<FastDivs<N>>([&] {
    FastDivs<N> f;
    for (int k = 0; k < N; ++k) f.d[k] = MakeFastDiv()(divisors[k]);
    return f;
  });
}

// A flat index over the extents f.d[0] (innermost) .. f.d[n - 1]: coord[k] for
// k < n; returns what is left (the outer index).
template <int N>
__device__ __forceinline__ int split_index(const FastDivs<N>& f, int n, int idx, int* coord) {
  for (int k = 0; k < n; ++k) {
    const int q = f.d[k].div(idx);
    coord[k] = idx - q * f.d[k].d;
    idx = q;
  }
  return idx;
}

// Deterministic reductions over groups of `group` consecutive threads (group a
// power of two dividing kBlock): a fixed shared-memory tree per group combining
// with `combine` (Sum, Min), so each result depends only on the inputs and the
// group size. Every thread of the block must call it with the same group (the
// barriers are block-wide); every thread gets the result of its group.
struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct Min {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return b < a ? b : a;
  }
};

template <typename Acc, typename Combine>
__device__ __forceinline__ Acc group_reduce(Acc v, int group, Combine combine) {
  __shared__ Acc buf[kBlock];
  buf[threadIdx.x] = v;
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x) & (group - 1);
  for (int half = group / 2; half > 0; half >>= 1) {
    if (lane < half) buf[threadIdx.x] = combine(buf[threadIdx.x], buf[threadIdx.x + half]);
    __syncthreads();
  }
  const Acc total = buf[threadIdx.x - lane];
  __syncthreads();  // buf may be reused by the next call
  return total;
}

template <typename Acc>
__device__ __forceinline__ Acc group_sum(Acc v, int group) {
  return group_reduce(v, group, Sum());
}

// Sum over the whole block (blockDim.x == kBlock).
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v) {
  return group_sum(v, kBlock);
}

// Minimum over the whole block (the first bad pixel of upsample_cross_entropy).
__device__ __forceinline__ int block_min(int v) { return group_reduce(v, kBlock, Min()); }

// Grid-stride loops. Sizes are int32 (the host checks every tensor against
// INT32_MAX); the counter is unsigned so i + stride cannot overflow.
#define FCN_GRID_STRIDE(i, n)                                                 \
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)(n); \
       i += blockDim.x * gridDim.x)
// One block per output element: block-level grid-stride over outputs.
#define FCN_BLOCK_STRIDE(b, n) for (unsigned b = blockIdx.x; b < (unsigned)(n); b += gridDim.x)

// Sum over a (planes = outer*channels, size) tensor of the entries of one
// channel: out[c] = sum_{o, p} v[(o*channels + c)*size + p]. One block per
// channel, fixed order (the bias gradients).
template <typename T>
__global__ void channel_sum_kernel(const T* __restrict__ v, T* __restrict__ out, int outer,
                                   int channels, int size) {
  typedef typename AccOf<T>::type Acc;
  const int count = outer * size;
  FCN_BLOCK_STRIDE(c, channels) {
    Acc acc = Acc(0);
    for (int j = threadIdx.x; j < count; j += kBlock) {
      const int o = j / size, p = j - o * size;
      acc += to_acc(v[(o * channels + static_cast<int>(c)) * size + p]);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[c] = from_acc<T>(acc);
  }
}

#ifndef __CUDACC_RTC__
// ---- host side (nvcc only) ----

// Blocks for a grid-stride loop over n elements (n > 0).
inline unsigned grid_for(long long n) {
  long long blocks = (n + kBlock - 1) / kBlock;
  if (blocks > 65535) blocks = 65535;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}
// Blocks for one-block-per-output kernels (n > 0).
inline unsigned blocks_for(long long n) {
  return static_cast<unsigned>(n > (1 << 20) ? (1 << 20) : (n < 1 ? 1 : n));
}

// Every kernel launch of the host launchers goes through launch(): under nvcc
// it is kernel<<<grid, kBlock, 0, stream>>>(args...); the CPU emulator
// (tests/cuda_emulator/emulator.cpp) compiles the launchers with the host
// compiler and FCNFAST_CUDA_EMULATOR defined, and supplies emu_launch, which
// runs the grid on the CPU. So the launchers' own grid sizes, workspace layout
// and argument order are what the emulator tests execute. Returns the launch
// error (cudaSuccess on the emulator).
#ifdef FCNFAST_CUDA_EMULATOR
template <typename... P, typename... A>
cudaError_t emu_launch(void (*kernel)(P...), unsigned grid, A&&... args);
#endif
template <typename... P, typename... A>
inline cudaError_t launch(void (*kernel)(P...), unsigned grid, cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
#ifdef FCNFAST_CUDA_EMULATOR
  (void)stream;
  return emu_launch(kernel, grid, std::forward<A>(args)...);
#else
  kernel<<<grid, kBlock, 0, stream>>>(std::forward<A>(args)...);
  return cudaGetLastError();
#endif
}

// Threads that share one output of the tiled reductions (the grad_weight
// kernels): the smallest power of two, up to kBlock, that leaves each thread at
// most 64 of the `count` terms. A function of the shape only, so the summation
// order (and the result) does not depend on the device. fcnfast/_cupy.py has
// the same rule.
inline int reduction_group(long long count) {
  int group = 1;
  while (group < kBlock && group * 64LL < count) group *= 2;
  return group;
}

// Blocks for `outputs` tiled reductions of `group` threads each (kBlock / group
// outputs per block; outputs > 0): the grad_weight kernels.
inline unsigned blocks_for_groups(long long outputs, int group) {
  return blocks_for((outputs - 1) / (kBlock / group) + 1);
}

// grad_bias[c] = the sum of grad (outer, channels, size) over outer and size, when
// asked for (grad_bias not null) and after no earlier error: the last step of the
// backward launchers with a bias.
template <typename T>
cudaError_t launch_bias_grad(cudaError_t err, const T* grad, void* grad_bias, int outer,
                             int channels, int size, cudaStream_t stream) {
  if (err != cudaSuccess || grad_bias == nullptr || channels <= 0) return err;
  return launch(channel_sum_kernel<T>, blocks_for(channels), stream, grad,
                static_cast<T*>(grad_bias), outer, channels, size);
}

// Calls f(T{}) with T the kernel storage type of dtype.
template <typename F>
cudaError_t dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      return f(float{});
    case 1:
      return f(double{});
    case 2:
      return f(__half{});
    case 3:
      return f(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}
#endif

}  // namespace cuda
}  // namespace fcnfast

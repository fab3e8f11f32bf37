// Planted defects (test only; included at the end of emulator.cpp).
//
// A deliberately racy reduction.
// Every thread stores its value to shared memory and the last thread sums them
// -- without the __syncthreads() in between. The reader has the highest thread
// index, so running the threads in ascending order (each to its next barrier)
// hides the race; test_cuda_emulated.py checks that the descending and random
// orders catch it.
namespace fcnfast {
namespace cuda {

template <typename T>
__global__ void planted_tail_sum_kernel(const T* __restrict__ in, T* __restrict__ out) {
  __shared__ T buf[kBlock];
  buf[threadIdx.x] = in[blockIdx.x * kBlock + threadIdx.x];
  // (the missing barrier)
  if (threadIdx.x == kBlock - 1) {
    double sum = 0;
    for (int j = 0; j < kBlock; ++j) sum += buf[j];
    out[blockIdx.x] = T(sum);
  }
  __syncthreads();          // keeps the barrier count uniform (no divergent-barrier report)
  buf[threadIdx.x] = T(0);  // what the next block would otherwise read as stale data
}

}  // namespace cuda
}  // namespace fcnfast

// in: blocks x kBlock floats; out: blocks sums.
extern "C" int fcn_emu_planted_tail_sum(const float* in, float* out, unsigned blocks) {
  return static_cast<int>(
      fcnfast::cuda::emu_launch(&fcnfast::cuda::planted_tail_sum_kernel<float>, blocks, in, out));
}

// A barrier thread 0 skips (undefined on a GPU): the emulator must report it.
namespace fcnfast {
namespace cuda {
template <typename T>
__global__ void planted_divergent_barrier_kernel(T* __restrict__ out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[blockIdx.x] = T(1);
}
}  // namespace cuda
}  // namespace fcnfast

// Returns -1 when the emulator reports the divergent barrier, else 0.
extern "C" int fcn_emu_planted_divergent_barrier(float* out) {
  emu::divergent = false;
  fcnfast::cuda::emu_launch(&fcnfast::cuda::planted_divergent_barrier_kernel<float>, 1, out);
  return emu::divergent ? -1 : 0;
}

// A CPU emulator for the fcnfast CUDA kernels (tests only, no GPU needed).
//
// Compiles csrc/cuda/*.cu with the host compiler, taking the kernel-only
// branch the NVRTC (CuPy) build takes, and runs a launch as the GPU would
// schedule it: every block of the grid in turn, each with its kBlock threads as
// user-space contexts (ucontext) switched round-robin at every __syncthreads(),
// so no thread passes a barrier before all have reached it; __shared__ memory
// is static (one block runs at a time). test_cuda_emulated.py drives it through the CuPy
// backend's own launch code (fcnfast/_cupy.py) via ctypes, so the kernels, the
// launch arguments and the grid rules are all exercised against the CPU ops.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace emu {
uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;
ucontext_t scheduler;
std::vector<ucontext_t> threads;
unsigned current = 0;
}  // namespace emu

// Back to the scheduler, which resumes the other threads of the block first.
inline void __syncthreads() { swapcontext(&emu::threads[emu::current], &emu::scheduler); }

// float overloads for the kernels' unqualified math calls
using std::exp;
using std::fma;
using std::log;

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define FCNFAST_RTC_INT_TYPES  // <cstdint> is already there
#define __CUDACC_RTC__         // the kernel-only branch, as NVRTC compiles it

#include "cuda/bilinear_upsample2d.cu"
#include "cuda/conv_transpose2d.cu"
#include "cuda/score_skip.cu"
#include "cuda/skip_add_crop.cu"
#include "cuda/upsample_argmax.cu"
#include "cuda/upsample_cross_entropy.cu"

namespace {

template <typename... P, std::size_t... I>
void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_reference_t<P>*>(args[I])...);
}

std::function<void()> thread_body;
std::vector<char> done;

void thread_entry() {
  thread_body();
  done[emu::current] = 1;
}  // returns to uc_link: the scheduler

template <typename... P>
void launch(void (*kernel)(P...), void** args, unsigned grid) {
  const unsigned threads = fcnfast::cuda::kBlock;
  constexpr std::size_t kStack = 1 << 16;
  static std::vector<std::vector<char>> stacks(threads, std::vector<char>(kStack));
  emu::threads.resize(threads);
  done.assign(threads, 0);
  emu::grid_dim = dim3(grid);
  emu::block_dim = dim3(threads);
  thread_body = [&] { call(kernel, args, std::index_sequence_for<P...>{}); };
  for (unsigned b = 0; b < grid; ++b) {
    emu::block_idx = uint3{b, 0, 0};
    for (unsigned t = 0; t < threads; ++t) {
      getcontext(&emu::threads[t]);
      emu::threads[t].uc_stack.ss_sp = stacks[t].data();
      emu::threads[t].uc_stack.ss_size = kStack;
      emu::threads[t].uc_link = &emu::scheduler;
      makecontext(&emu::threads[t], thread_entry, 0);
      done[t] = 0;
    }
    for (unsigned left = threads; left > 0;) {
      left = 0;
      for (unsigned t = 0; t < threads; ++t) {
        if (done[t]) continue;
        emu::current = t;
        emu::thread_idx = uint3{t, 0, 0};
        swapcontext(&emu::scheduler, &emu::threads[t]);
        left += done[t] ? 0 : 1;
      }
    }
  }
}

using Launcher = std::function<void(void**, unsigned)>;

std::unordered_map<std::string, Launcher>& registry() {
  static std::unordered_map<std::string, Launcher> r;
  return r;
}

template <typename... P>
void add(const std::string& name, void (*kernel)(P...)) {
  registry()[name] = [kernel](void** args, unsigned grid) { launch(kernel, args, grid); };
}

#define FCN_EMU_KERNELS(X)                                                                   \
  X(skip_add_crop_kernel) X(skip_add_crop_backward_kernel) X(score_skip_kernel)             \
  X(score_skip_grad_feature_kernel) X(score_skip_grad_weight_kernel) X(channel_sum_kernel)  \
  X(conv_transpose2d_kernel) X(conv_transpose2d_grad_x_kernel)                              \
  X(conv_transpose2d_grad_weight_kernel) X(bilinear_upsample2d_kernel)                      \
  X(bilinear_upsample2d_backward_kernel) X(upsample_argmax_kernel) X(ce_pixel_kernel)       \
  X(ce_finalize_kernel) X(ce_grad_x_kernel)

template <typename T>
void add_all(const std::string& type) {
#define FCN_EMU_ADD(k) add("fcnfast::cuda::" #k "<" + type + ">", &fcnfast::cuda::k<T>);
  FCN_EMU_KERNELS(FCN_EMU_ADD)
#undef FCN_EMU_ADD
}

struct Init {
  Init() {
    add_all<float>("float");
    add_all<double>("double");
    add_all<__half>("__half");
    add_all<__nv_bfloat16>("__nv_bfloat16");
  }
} init;

}  // namespace

// Runs the kernel named by its NVRTC name expression; args as cuLaunchKernel's
// kernelParams. Returns 0, or 1 for an unknown kernel.
extern "C" int fcn_emu_launch(const char* name_expression, void** args, unsigned grid) {
  auto it = registry().find(name_expression);
  if (it == registry().end()) return 1;
  it->second(args, grid);
  return 0;
}

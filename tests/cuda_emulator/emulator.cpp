// A CPU emulator for the fcnfast CUDA kernels and their host launchers (tests only, no GPU).
//
// Compiles csrc/cuda/*.cu with the host compiler twice over in one library:
//   * the host launchers (conv_transpose2d(), ...: the code a CUDA build of the
//     extension runs) with FCNFAST_CUDA_EMULATOR defined, so their launch()
//     calls (kernel_utils.cuh) come here instead of <<<>>>: the launchers' grid
//     sizes, workspace layout and argument order are what runs. Exported as
//     fcn_emu_<op>(dtype, pointers..., shape ints) below.
//   * the kernel table the CuPy backend launches by NVRTC name expression
//     (fcn_emu_launch), driven through fcnfast/_cupy.py's own launch code.
// A launch runs as the GPU would schedule it: every block of the grid, each with
// its kBlock threads as user-space contexts (ucontext); at every __syncthreads()
// a thread hands control back, and the next round resumes the waiting threads,
// so no thread passes a barrier before all have reached it. The order in which
// blocks run and threads resume (fcn_emu_set_order) is ascending, descending or
// seeded random, reshuffled every round: a missing barrier, where a thread reads
// shared memory another thread has not written yet, then shows up whichever
// thread index the reader has. __shared__ memory is static (one block at a time).
// A barrier reached by some threads of a block while others have exited is
// reported as an error (divergent __syncthreads is undefined on a GPU).
#include <cuda_runtime.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "host/pending_checks.h"  // torch-free: its bookkeeping is tested with a fake check

namespace emu {
uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;
ucontext_t scheduler;
std::vector<ucontext_t> threads;
std::vector<char> done;
unsigned current = 0;
int order = 0;  // 0 ascending, 1 descending, 2 random
std::mt19937_64 rng;
bool divergent = false;  // a barrier some threads of a block never reached
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
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define FCNFAST_CUDA_EMULATOR  // the launchers' launch() calls emu_launch

#include "cuda/bilinear_upsample2d.cu"
#include "cuda/conv_transpose2d.cu"
#include "cuda/score_skip.cu"
#include "cuda/skip_add_crop.cu"
#include "cuda/upsample_argmax.cu"
#include "cuda/upsample_cross_entropy.cu"
#ifdef FCN_EMU_PLANTED
#include FCN_EMU_PLANTED  // test-only kernels (the planted race), see test_cuda_emulated.py
#endif

namespace emu {

std::function<void()> thread_body;

void thread_entry() {
  thread_body();
  done[current] = 1;
}  // returns to uc_link: the scheduler

// 0..n-1 in the current order.
std::vector<unsigned> schedule(unsigned n) {
  std::vector<unsigned> v(n);
  std::iota(v.begin(), v.end(), 0u);
  if (order == 1) std::reverse(v.begin(), v.end());
  if (order == 2) std::shuffle(v.begin(), v.end(), rng);
  return v;
}

void run(unsigned grid, std::function<void()> body) {
  const unsigned n = fcnfast::cuda::kBlock;
  constexpr std::size_t kStack = 1 << 16;
  static std::vector<std::vector<char>> stacks(n, std::vector<char>(kStack));
  threads.resize(n);
  done.assign(n, 0);
  grid_dim = dim3(grid);
  block_dim = dim3(n);
  thread_body = std::move(body);
  for (unsigned b : schedule(grid)) {
    block_idx = uint3{b, 0, 0};
    for (unsigned t = 0; t < n; ++t) {
      getcontext(&threads[t]);
      threads[t].uc_stack.ss_sp = stacks[t].data();
      threads[t].uc_stack.ss_size = kStack;
      threads[t].uc_link = &scheduler;
      makecontext(&threads[t], thread_entry, 0);
      done[t] = 0;
    }
    for (unsigned left = n; left > 0;) {
      for (unsigned t : schedule(n)) {
        if (done[t]) continue;
        current = t;
        thread_idx = uint3{t, 0, 0};
        swapcontext(&scheduler, &threads[t]);
      }
      // every thread still running waits at a barrier; some having exited while
      // others wait is a divergent barrier (finish the launch, report it)
      left = 0;
      for (unsigned t = 0; t < n; ++t) left += done[t] ? 0 : 1;
      if (left > 0 && left < n) divergent = true;
    }
  }
}

}  // namespace emu

namespace fcnfast {
namespace cuda {
// launch() of the launchers (kernel_utils.cuh): run the grid here.
template <typename... P, typename... A>
cudaError_t emu_launch(void (*kernel)(P...), unsigned grid, A&&... args) {
  std::tuple<std::remove_cv_t<std::remove_reference_t<P>>...> values(std::forward<A>(args)...);
  emu::run(grid, [&] { std::apply(kernel, values); });
  return cudaSuccess;
}
}  // namespace cuda
}  // namespace fcnfast

namespace {

// ---- the CuPy launch table: kernels by NVRTC name expression, cuLaunchKernel-style args ----

template <typename... P, std::size_t... I>
std::tuple<std::remove_cv_t<P>...> unpack(void** args, std::index_sequence<I...>) {
  return {*static_cast<std::remove_cv_t<P>*>(args[I])...};
}

using Launcher = std::function<void(void**, unsigned)>;

std::unordered_map<std::string, Launcher>& registry() {
  static std::unordered_map<std::string, Launcher> r;
  return r;
}

template <typename... P>
void add(const std::string& name, void (*kernel)(P...)) {
  registry()[name] = [kernel](void** args, unsigned grid) {
    auto values = unpack<P...>(args, std::index_sequence_for<P...>{});
    emu::run(grid, [&] { std::apply(kernel, values); });
  };
}

// clang-format does not settle on one layout of this macro
// clang-format off
#define FCN_EMU_KERNELS(X)                                                                   \
  X(skip_add_crop_kernel) X(skip_add_crop_backward_kernel) X(score_skip_kernel)             \
  X(score_skip_grad_feature_kernel) X(score_skip_grad_weight_kernel) X(channel_sum_kernel)  \
  X(conv_transpose2d_kernel) X(conv_transpose2d_grad_x_kernel)                              \
  X(conv_transpose2d_grad_weight_kernel) X(bilinear_upsample2d_kernel)                      \
  X(bilinear_upsample2d_backward_kernel) X(upsample_argmax_kernel) X(ce_pixel_kernel)       \
  X(ce_finalize_kernel) X(ce_grad_x_kernel) FCN_EMU_PLANTED_KERNELS(X)
// clang-format on

#ifndef FCN_EMU_PLANTED_KERNELS
#define FCN_EMU_PLANTED_KERNELS(X)
#endif

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

// ---- the compiled launchers (launchers.h): shapes as int arrays in struct field order ----

template <typename S>
S shape_of(const int* v) {
  static_assert(std::is_trivially_copyable_v<S> && sizeof(S) % sizeof(int) == 0, "int struct");
  S s;
  std::memcpy(&s, v, sizeof s);
  return s;
}

using fcnfast::cuda::ConvTranspose2dShape;
using fcnfast::cuda::DType;
using fcnfast::cuda::ScoreSkipShape;
using fcnfast::cuda::UpsampleShape;

// Runs a launcher; returns its cudaError_t, or -1 for a divergent barrier.
template <typename F>
int checked(F&& f) {
  emu::divergent = false;
  const int rc = static_cast<int>(f());
  return emu::divergent ? -1 : rc;
}

}  // namespace

extern "C" {

// order: 0 ascending, 1 descending, 2 random (seeded) block and thread order.
void fcn_emu_set_order(int order, unsigned long long seed) {
  emu::order = order;
  emu::rng.seed(seed);
}

// Runs the kernel named by its NVRTC name expression; args as cuLaunchKernel's
// kernelParams. Returns 0, 1 for an unknown kernel, -1 for a divergent barrier.
int fcn_emu_launch(const char* name_expression, void** args, unsigned grid) {
  auto it = registry().find(name_expression);
  if (it == registry().end()) return 1;
  return checked([&] {
    it->second(args, grid);
    return 0;
  });
}

// v: planes, h, w, skip_h, skip_w, oy, ox
int fcn_emu_skip_add_crop(int dt, const void* coarse, const void* skip, void* out, const int* v) {
  return checked([&] {
    return fcnfast::cuda::skip_add_crop(DType(dt), coarse, skip, out, v[0], v[1], v[2], v[3], v[4],
                                        v[5], v[6], nullptr);
  });
}
int fcn_emu_skip_add_crop_backward(int dt, const void* grad, void* grad_skip, const int* v) {
  return checked([&] {
    return fcnfast::cuda::skip_add_crop_backward(DType(dt), grad, grad_skip, v[0], v[1], v[2], v[3],
                                                 v[4], v[5], v[6], nullptr);
  });
}
int fcn_emu_score_skip(int dt, const void* coarse, const void* feature, const void* weight,
                       const void* bias, double scale, void* out, const int* v) {
  return checked([&] {
    return fcnfast::cuda::score_skip(DType(dt), coarse, feature, weight, bias, scale, out,
                                     shape_of<ScoreSkipShape>(v), nullptr);
  });
}
int fcn_emu_score_skip_backward(int dt, const void* grad, const void* feature, const void* weight,
                                double scale, void* gf, void* gw, void* gb, const int* v) {
  return checked([&] {
    return fcnfast::cuda::score_skip_backward(DType(dt), grad, feature, weight, scale, gf, gw, gb,
                                              shape_of<ScoreSkipShape>(v), nullptr);
  });
}
int fcn_emu_conv_transpose2d(int dt, const void* x, const void* weight, const void* bias, void* out,
                             const int* v) {
  return checked([&] {
    return fcnfast::cuda::conv_transpose2d(DType(dt), x, weight, bias, out,
                                           shape_of<ConvTranspose2dShape>(v), nullptr);
  });
}
int fcn_emu_conv_transpose2d_backward(int dt, const void* grad, const void* x, const void* weight,
                                      void* gx, void* gw, void* gb, const int* v) {
  return checked([&] {
    return fcnfast::cuda::conv_transpose2d_backward(DType(dt), grad, x, weight, gx, gw, gb,
                                                    shape_of<ConvTranspose2dShape>(v), nullptr);
  });
}
int fcn_emu_bilinear_upsample2d(int dt, const void* x, void* out, const int* v) {
  return checked([&] {
    return fcnfast::cuda::bilinear_upsample2d(DType(dt), x, out, shape_of<UpsampleShape>(v),
                                              nullptr);
  });
}
int fcn_emu_bilinear_upsample2d_backward(int dt, const void* grad, void* gx, const int* v) {
  return checked([&] {
    return fcnfast::cuda::bilinear_upsample2d_backward(DType(dt), grad, gx,
                                                       shape_of<UpsampleShape>(v), nullptr);
  });
}
int fcn_emu_upsample_argmax(int dt, const void* x, int64_t* labels, const int* v) {
  return checked([&] {
    return fcnfast::cuda::upsample_argmax(DType(dt), x, labels, shape_of<UpsampleShape>(v),
                                          nullptr);
  });
}
long long fcn_emu_ce_workspace_bytes(const int* v) {
  return static_cast<long long>(
      fcnfast::cuda::upsample_cross_entropy_workspace_bytes(shape_of<UpsampleShape>(v)));
}
int fcn_emu_upsample_cross_entropy(int dt, const void* x, const int64_t* target,
                                   long long ignore_index, int mean, void* loss, int64_t* bad_label,
                                   void* workspace, const int* v) {
  return checked([&] {
    return fcnfast::cuda::upsample_cross_entropy(DType(dt), x, target, ignore_index, mean != 0,
                                                 loss, bad_label, workspace,
                                                 shape_of<UpsampleShape>(v), nullptr);
  });
}
int fcn_emu_upsample_cross_entropy_backward(int dt, const void* grad_loss, const void* x,
                                            const int64_t* target, long long ignore_index, int mean,
                                            void* gx, void* workspace, const int* v) {
  return checked([&] {
    return fcnfast::cuda::upsample_cross_entropy_backward(DType(dt), grad_loss, x, target,
                                                          ignore_index, mean != 0, gx, workspace,
                                                          shape_of<UpsampleShape>(v), nullptr);
  });
}

// ---- csrc/host/pending_checks.h with a fake check (the CUDA binding's uses events) ----
// A script from Python: add checks by id (failed or not), complete them, poll or
// wait; a waited check counts as completed.

}  // extern "C"

namespace {

struct FakeCheck {
  int id;
  bool fails;
  bool ready() { return fake_done().count(id) > 0; }
  void wait() {
    fake_done().insert(id);
    ++fake_waits();
  }
  bool failed() const { return fails; }
  static std::unordered_set<int>& fake_done() {
    static std::unordered_set<int> s;
    return s;
  }
  static int& fake_waits() {
    static int n = 0;
    return n;
  }
};

fcnfast::PendingChecks<FakeCheck>& fake_checks() {
  static fcnfast::PendingChecks<FakeCheck> p;
  return p;
}

}  // namespace

extern "C" {

void fcn_emu_pending_reset() {
  fake_checks().wait_all();
  FakeCheck::fake_done().clear();
  FakeCheck::fake_waits() = 0;
}
void fcn_emu_pending_add(int id, int fails) { fake_checks().add(FakeCheck{id, fails != 0}); }
void fcn_emu_pending_complete(int id) { FakeCheck::fake_done().insert(id); }
// The id of the failed check reported, or -1.
int fcn_emu_pending_poll() {
  const auto c = fake_checks().poll();
  return c ? c->id : -1;
}
int fcn_emu_pending_wait_all() {
  const auto c = fake_checks().wait_all();
  return c ? c->id : -1;
}
long long fcn_emu_pending_size() { return static_cast<long long>(fake_checks().size()); }
int fcn_emu_pending_waits() { return FakeCheck::fake_waits(); }
long long fcn_emu_pending_max() {
  return static_cast<long long>(fcnfast::PendingChecks<FakeCheck>::kMaxPending);
}

}  // extern "C"

#include "planted_race.cuh"

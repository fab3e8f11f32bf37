// The fcnfast._C extension: the schemas of the FCN ops for the PyTorch
// dispatcher and a small pybind11 module with build information.
//
// Where the kernels register (TORCH_LIBRARY_IMPL):
//   CPU   csrc/cpu/<op>.cpp, each file its own op(s) and backward(s);
//   CUDA  csrc/cuda/bindings_cuda.cpp, all ops at once (host wrappers around
//         the launchers of csrc/cuda/<op>.cu); only in a CUDA build. The CuPy
//         backend (fcnfast/_cupy.py) registers the same names from Python.
// csrc/cpu/dense_crf.cpp defines its own schemas (dense_crf,
// permutohedral_filter: TORCH_LIBRARY_FRAGMENT) and CPU kernels. An op without
// a kernel for a device falls back to fcnfast.reference in Python (fcnfast.ops);
// the Autograd, fake and autocast kernels are registered from Python (fcnfast/ops.py,
// fcnfast/_autocast.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/large_output.h"

#ifdef FCNFAST_WITH_CUDA
namespace fcnfast {
void check_pending_cuda_errors();  // csrc/cuda/bindings_cuda.cpp
}  // namespace fcnfast
#endif

#ifndef FCNFAST_VERSION
#define FCNFAST_VERSION "unknown"
#endif
#ifndef FCNFAST_TORCH_VERSION
#define FCNFAST_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(fcnfast, m) {
  // crop is always explicit (top, left, height, width); Python resolves None.
  m.def(
      "conv_transpose2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] output_padding, int groups, int[2] dilation, SymInt[4] crop) -> Tensor");
  // Returns (grad_x, grad_weight, grad_bias); an entry not asked for in
  // output_mask is an empty tensor.
  m.def(
      "conv_transpose2d_backward(Tensor grad, Tensor x, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] output_padding, int groups, int[2] dilation, SymInt[4] crop, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  m.def("bilinear_upsample2d(Tensor x, int scale, SymInt[4] crop) -> Tensor");
  m.def(
      "bilinear_upsample2d_backward(Tensor grad, SymInt in_height, SymInt in_width, int scale, "
      "SymInt[4] crop) -> Tensor");

  m.def("skip_add_crop(Tensor coarse, Tensor skip, int[2] offset) -> Tensor");
  m.def(
      "skip_add_crop_backward(Tensor grad, SymInt skip_height, SymInt skip_width, int[2] offset) "
      "-> Tensor");

  m.def(
      "score_skip(Tensor coarse, Tensor feature, Tensor weight, Tensor? bias, float scale, "
      "int[2] offset) -> Tensor");
  // Returns (grad_feature, grad_weight, grad_bias); grad_coarse is grad itself.
  m.def(
      "score_skip_backward(Tensor grad, Tensor feature, Tensor weight, float scale, "
      "int[2] offset, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  m.def("upsample_argmax(Tensor x, int scale, SymInt[4] crop) -> Tensor");
  m.def(
      "upsample_cross_entropy(Tensor x, Tensor target, int scale, SymInt[4] crop, "
      "int ignore_index, str reduction) -> Tensor");
  m.def(
      "upsample_cross_entropy_backward(Tensor grad_loss, Tensor x, Tensor target, int scale, "
      "SymInt[4] crop, int ignore_index, str reduction) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fcnfast native kernels (ops are registered under torch.ops.fcnfast)";
  m.attr("__version__") = FCNFAST_VERSION;
  m.attr("torch_version") = FCNFAST_TORCH_VERSION;
#ifdef FCNFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  // the cache of large CPU output blocks (csrc/cpu/large_output.h)
  m.def(
      "cpu_output_cache_stats",
      [] {
        const auto s = fcnfast::cpu::large_output_cache_stats();
        pybind11::dict d;
        d["cached_bytes"] = s.cached_bytes;
        d["cached_blocks"] = s.cached_blocks;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        return d;
      },
      "bytes and blocks held by fcnfast's cache of large CPU outputs, and its hit/miss counts");
  m.def("cpu_output_cache_clear", &fcnfast::cpu::large_output_cache_clear,
        "return every cached large CPU output block to the operating system");
#ifdef FCNFAST_WITH_CUDA
  // the CUDA ops' device-side checks reported lazily (upsample_cross_entropy's labels)
  // the GIL is released while it waits; a bad label is a Python ValueError with the
  // ops' words (no C++ backtrace)
  m.def(
      "check_pending_errors",
      [] {
        try {
          fcnfast::check_pending_cuda_errors();
        } catch (const c10::ValueError& e) {
          throw pybind11::value_error(e.what_without_backtrace());
        }
      },
      pybind11::call_guard<pybind11::gil_scoped_release>(),
      "wait for the device-side checks of earlier CUDA calls; raise the first failure");
#endif
#ifdef FCNFAST_SANITIZE
  m.attr("sanitize") = FCNFAST_SANITIZE;
#else
  m.attr("sanitize") = "";
#endif
}

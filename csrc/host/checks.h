// Host-side argument checks shared by the CPU and CUDA bindings: the building
// blocks of csrc/host/op_checks.h (one check function per op).
//
// Every failure is a c10::Error (ValueError in Python) whose message names the
// argument and the offending values, in the same words as fcnfast/_geometry.py
// (the Python checks of the reference, the public ops and the CuPy backend).
//
// csrc/host/ holds the headers that depend on ATen (this one and op_checks.h):
// only host C++ files include them (csrc/cpu/*.cpp, csrc/cuda/bindings_cuda.cpp).
// csrc/common/ is torch-free: the .cu kernels include it, NVRTC (the CuPy
// backend) compiles it at run time and the wheel ships it under fcnfast/_csrc.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <array>
#include <initializer_list>
#include <limits>
#include <string>

namespace fcnfast {

inline std::string sizes_str(at::IntArrayRef sizes);
inline std::string shape_str(const at::Tensor& t) { return sizes_str(t.sizes()); }

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "fcnfast: ", name, " must be a torch.Tensor, got None");
}

// Floating dtypes a kernel accepts. `allow_reduced` admits bf16/fp16.
inline void check_floating(const at::Tensor& t, const char* name, bool allow_reduced = true) {
  auto st = t.scalar_type();
  bool ok = st == at::kFloat || st == at::kDouble ||
            (allow_reduced && (st == at::kBFloat16 || st == at::kHalf));
  TORCH_CHECK_VALUE(ok, "fcnfast: ", name, " must be a floating tensor (float32, float64",
                    allow_reduced ? ", bfloat16, float16" : "", "), got ", st);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, "fcnfast: ", name, " must be a ", dim, "-D tensor, got shape ",
                    shape_str(t));
}

// A defined tensor of `dim` dimensions, floating when `floating` (the order of
// fcnfast/_geometry.py's check_tensor).
inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim, bool floating = true) {
  check_defined(t, name);
  check_dim(t, dim, name);
  if (floating) check_floating(t, name);
}

inline void check_same(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "fcnfast: ", na, " and ", nb,
                    " must be on the same device, got ", a.device(), " and ", b.device());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), "fcnfast: ", na, " and ", nb,
                    " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_device(const at::Tensor& t, at::DeviceType type, const char* name) {
  TORCH_CHECK_VALUE(t.device().type() == type, "fcnfast: ", name, " must be on ",
                    c10::DeviceTypeName(type), ", got ", t.device());
}

// The 32-bit index limits, one value for every backend (CPU, CUDA, CuPy and the
// Python checks in fcnfast/_geometry.py, which repeat these numbers):
//
// * kIndexLimit: the elements of any tensor an op reads or writes. The CUDA
//   kernels (and the CPU's vectorised loops) address elements with int32.
// * kExtentLimit = kIndexLimit / 2: any one size or geometry parameter (stride,
//   padding, dilation, the full output height/width plus padding and the
//   dilated kernel, the upsampled full size). The CUDA kernels add two such
//   values in int32 (an output position plus the padding, a position minus a
//   dilated tap), so each must stay below half the int32 range. The CPU
//   kernels compute these in int64 and could go further, but the same limit
//   applies there so that an input refused on one backend is refused on all.
constexpr int64_t kIndexLimit = std::numeric_limits<int32_t>::max();
constexpr int64_t kExtentLimit = kIndexLimit / 2;

inline std::string sizes_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (d) s += ", ";
    s += std::to_string(sizes[d]);
  }
  return s + "]";
}

// A tensor of the given sizes (each >= 0) fits kIndexLimit elements; the
// product is formed without overflow: sizes taken from arguments (a backward's
// input size, a crop, a scale) can multiply past int64 before the check sees
// them, and a wrapped product could pass it.
inline void check_index32(at::IntArrayRef sizes, const char* name) {
  int64_t numel = 1;
  bool overflow = false;
  for (int64_t s : sizes) {
    if (s == 0) return;  // empty, whatever the other sizes
    overflow = overflow || c10::mul_overflows(numel, s, &numel);
  }
  if (!overflow && numel <= kIndexLimit) return;
  TORCH_CHECK_VALUE(false, "fcnfast: ", name, " of size ", sizes_str(sizes), " has ",
                    overflow ? std::string("more than 2^63") : std::to_string(numel),
                    " elements, more than 32-bit indexing allows (", kIndexLimit, ")");
}
inline void check_index32(std::initializer_list<int64_t> sizes, const char* name) {
  check_index32(at::IntArrayRef(sizes.begin(), sizes.size()), name);
}

// The element count alone (dense_crf's lattice sizes).
inline void check_index32(int64_t numel, const char* name) {
  TORCH_CHECK_VALUE(numel <= kIndexLimit, "fcnfast: ", name, " has ", numel,
                    " elements, more than 32-bit indexing allows (", kIndexLimit, ")");
}

// One size or geometry value (or a pair of them) within kExtentLimit.
inline void check_extent(int64_t value, const char* what) {
  TORCH_CHECK_VALUE(value <= kExtentLimit, "fcnfast: ", what, " ", value,
                    " is larger than 32-bit indexing allows (", kExtentLimit, ")");
}
inline void check_extent(const std::array<int64_t, 2>& v, const char* what) {
  TORCH_CHECK_VALUE(v[0] <= kExtentLimit && v[1] <= kExtentLimit, "fcnfast: ", what, " (", v[0],
                    ", ", v[1], ") is larger than 32-bit indexing allows (", kExtentLimit, ")");
}

// A 2-element int list argument (stride, padding, ...). A single value means
// the same for both axes.
inline std::array<int64_t, 2> pair_arg(at::IntArrayRef v, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 1 || v.size() == 2, "fcnfast: ", name,
                    " must be an int or a pair of ints, got ", sizes_str(v));
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

struct Crop {
  int64_t top, left, height, width;
};

// crop = (top, left, height, width) inside a full output of full_h x full_w.
inline Crop check_crop(at::IntArrayRef crop, int64_t full_h, int64_t full_w) {
  TORCH_CHECK_VALUE(crop.size() == 4, "fcnfast: crop must be (top, left, height, width), got ",
                    sizes_str(crop));
  Crop c{crop[0], crop[1], crop[2], crop[3]};
  TORCH_CHECK_VALUE(c.top >= 0 && c.left >= 0 && c.height >= 0 && c.width >= 0 &&
                        c.height <= full_h - c.top && c.width <= full_w - c.left,  // no overflow
                    "fcnfast: crop (top=", c.top, ", left=", c.left, ", height=", c.height,
                    ", width=", c.width, ") lies outside the full output of size ", full_h, "x",
                    full_w);
  return c;
}

}  // namespace fcnfast

// Host-side argument checks shared by the CPU and CUDA bindings.
//
// Every failure is a c10::Error (RuntimeError / ValueError in Python) whose
// message names the argument and the offending values. Only host C++ files
// include this header; the .cu kernels stay torch-free.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <array>
#include <initializer_list>
#include <limits>
#include <string>

namespace fcnfast {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + "]";
}

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "fcnfast: ", name, " must be a tensor, got None");
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
  TORCH_CHECK_VALUE(t.dim() == dim, "fcnfast: ", name, " must be a ", dim,
                    "-D tensor, got shape ", shape_str(t));
}

inline void check_same(const at::Tensor& a, const char* na, const at::Tensor& b,
                       const char* nb) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "fcnfast: ", na, " and ", nb,
                    " must be on the same device, got ", a.device(), " and ", b.device());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), "fcnfast: ", na, " and ", nb,
                    " must have the same dtype, got ", a.scalar_type(), " and ",
                    b.scalar_type());
}

inline void check_device(const at::Tensor& t, at::DeviceType type, const char* name) {
  TORCH_CHECK_VALUE(t.device().type() == type, "fcnfast: ", name, " must be on ",
                    c10::DeviceTypeName(type), ", got ", t.device());
}

// Kernels index with 32-bit integers on the GPU and in vectorised CPU loops;
// refuse sizes that would overflow rather than compute garbage.
inline void check_index32(int64_t numel, const char* name) {
  TORCH_CHECK_VALUE(numel <= std::numeric_limits<int32_t>::max(), "fcnfast: ", name,
                    " has ", numel, " elements, more than 32-bit indexing allows (",
                    std::numeric_limits<int32_t>::max(), ")");
}

// check_index32 for a tensor of the given sizes (each >= 0), multiplied without
// overflow: sizes taken from arguments (a backward's input size, a crop, a scale)
// can multiply past int64 before the check sees them, and a wrapped product
// could pass it.
inline void check_index32_sizes(std::initializer_list<int64_t> sizes, const char* name) {
  int64_t numel = 1;
  bool overflow = false;
  for (int64_t s : sizes) {
    if (s == 0) return;  // empty, whatever the other sizes
    overflow = overflow || c10::mul_overflows(numel, s, &numel);
  }
  if (!overflow && numel <= std::numeric_limits<int32_t>::max()) return;
  std::string shape = "[";
  for (int64_t s : sizes) shape += (shape.size() > 1 ? ", " : "") + std::to_string(s);
  TORCH_CHECK_VALUE(false, "fcnfast: ", name, " of size ", shape, "] has ",
                    overflow ? std::string("more than 2^63") : std::to_string(numel),
                    " elements, more than 32-bit indexing allows (",
                    std::numeric_limits<int32_t>::max(), ")");
}

// A 2-element int list argument (stride, padding, ...). A single value means
// the same for both axes.
inline std::array<int64_t, 2> pair_arg(at::IntArrayRef v, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 1 || v.size() == 2, "fcnfast: ", name,
                    " must have 1 or 2 elements, got ", v.size());
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

struct Crop {
  int64_t top, left, height, width;
};

// crop = (top, left, height, width) inside a full output of full_h x full_w.
inline Crop check_crop(at::IntArrayRef crop, int64_t full_h, int64_t full_w) {
  TORCH_CHECK_VALUE(crop.size() == 4, "fcnfast: crop must be (top, left, height, width), got ",
                    crop.size(), " values");
  Crop c{crop[0], crop[1], crop[2], crop[3]};
  TORCH_CHECK_VALUE(c.top >= 0 && c.left >= 0 && c.height >= 0 && c.width >= 0 &&
                        c.top + c.height <= full_h && c.left + c.width <= full_w,
                    "fcnfast: crop (top=", c.top, ", left=", c.left, ", height=", c.height,
                    ", width=", c.width, ") lies outside the full output of size ", full_h,
                    "x", full_w);
  return c;
}

}  // namespace fcnfast

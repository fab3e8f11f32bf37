// Writing large, freshly allocated CPU outputs: huge pages and streaming stores.
#pragma once

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

namespace fcnfast {
namespace cpu {

// Large outputs are written once right after allocation. Allocations this big
// are fresh mmap()s, and with 4 KB pages their first-touch page faults can
// cost more than the kernel itself (~20 ms for a 59 MB output on a 2-core VM:
// one fault per 4 KB). Ask for transparent huge pages on the 2 MB-aligned
// interior, 512x fewer faults. Advisory only: a no-op where THP is disabled
// or unsupported, and harmless on memory that is already mapped.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t bytes = static_cast<uintptr_t>(t.numel()) * t.element_size();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (begin + kHuge - 1) & ~(kHuge - 1), e = (begin + bytes) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Whether to write `t` with non-temporal (streaming) stores. They skip the
// read-for-ownership of every cache line, which pays off only for outputs far
// beyond the caches; on small outputs (an FCN k4 s2 layer: < 1 MB, rows of
// 34 floats) partial-line streaming stores were 70% of the op's time.
inline bool use_streaming_stores(const at::Tensor& t) {
  return t.nbytes() >= (size_t(8) << 20);
}

}  // namespace cpu
}  // namespace fcnfast

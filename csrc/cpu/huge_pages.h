// Transparent huge pages for large, freshly allocated CPU outputs.
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

}  // namespace cpu
}  // namespace fcnfast

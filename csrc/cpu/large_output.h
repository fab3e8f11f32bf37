// Writing large, freshly allocated CPU outputs: huge pages and streaming stores.
#pragma once

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

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

// Writes a finished float row. With `stream` (a large output, written once and
// not read back soon) non-temporal stores skip the read-for-ownership of every
// output cache line; otherwise plain stores. Callers issue stream_fence()
// before the data is read.
inline void store_row(float* dst, const float* src, int64_t n, bool stream) {
#if defined(__AVX__)
  if (!stream) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31) != 0; ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
#else
  (void)stream;
  std::memcpy(dst, src, n * sizeof(float));
#endif
}

// Orders this thread's non-temporal stores before later writes (the end of the
// parallel region then publishes them to the other threads).
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace cpu
}  // namespace fcnfast

// Writing large, freshly allocated CPU outputs: huge pages and streaming stores.
#pragma once

#include <ATen/ATen.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace fcnfast {
namespace cpu {

// Large outputs (and large scratch buffers) come from empty_large(): 2 MB-aligned
// anonymous mappings kept in a small process-wide cache when freed
// (large_output.cpp). Why: an FCN output is 21-143 MB per image, and every
// fresh mapping is page-faulted in on first write. glibc hands out blocks above
// its 32 MB mmap ceiling (C=59, 150) as fresh mmaps on every call, and even
// 21 MB blocks go back to the kernel now and then, so steady-state calls paid
// 4 KB page faults (bilinear x8 at C=59/150: 19-33 % of copy bandwidth), and
// madvise(MADV_HUGEPAGE) on them made the kernel compact memory synchronously
// inside the fault (THP defrag=madvise): 125-170 ms calls in a fresh process
// instead of 1.1 ms. A reused block is already mapped: no faults at all.
//
// FCNFAST_CPU_OUTPUT_CACHE_MB (read on every release; default 1024) bounds the
// bytes held by freed blocks; 0 returns every block to the kernel at once.
// Huge pages: fresh blocks get MADV_NOHUGEPAGE (4 KB pages, never a compaction
// stall) unless FCNFAST_HUGE_PAGES=1 asks MADV_HUGEPAGE. Why, measured on both
// THP settings: large_output.cpp and benchmarks/results/cpu.md.
// Sizes below kLargeOutputBytes use at::empty (glibc's heap reuses them).
constexpr size_t kLargeOutputBytes = size_t(4) << 20;

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options,
                       at::MemoryFormat format = at::MemoryFormat::Contiguous);

struct LargeOutputCacheStats {
  int64_t cached_bytes, cached_blocks, hits, misses;
};
LargeOutputCacheStats large_output_cache_stats();
void large_output_cache_clear();

// Whether to write `t` with non-temporal (streaming) stores. They skip the
// read-for-ownership of every cache line, which pays off only for outputs far
// beyond the caches; on small outputs (an FCN k4 s2 layer: < 1 MB, rows of
// 34 floats) partial-line streaming stores were 70% of the op's time.
inline bool use_streaming_stores(const at::Tensor& t) { return t.nbytes() >= (size_t(8) << 20); }

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

// The cache of large CPU output blocks behind cpu::empty_large (see large_output.h
// for why it exists).
#include "large_output.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdlib>
#include <deque>
#include <mutex>

namespace fcnfast {
namespace cpu {
namespace {

#if defined(__linux__)

constexpr size_t kHuge = size_t(2) << 20;

size_t env_value(const char* name, size_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  return (end == v || x < 0) ? fallback : static_cast<size_t>(x);
}

struct Block {
  void* ptr;
  size_t bytes;      // mapped (a multiple of 2 MB)
  size_t requested;  // what the current tensor asked for (profiler accounting)
};

// Huge-page advice for a fresh block (FCNFAST_HUGE_PAGES: 1 MADV_HUGEPAGE,
// otherwise MADV_NOHUGEPAGE). The cache makes later calls fault-free either
// way; the advice only moves the first call per block. Measured on the 2-core
// VM (benchmarks/results/cpu.md), bilinear x8 C=150 (143 MB), CPU ms of the
// first call: THP enabled=madvise: none/NOHUGEPAGE 148-178 (36.6k 4 KB
// faults), HUGEPAGE 66-285; enabled=always: kernel's choice (huge pages)
// 206-344, NOHUGEPAGE 153-166, HUGEPAGE 48-67. HUGEPAGE is a gamble under
// defrag=madvise (synchronous compaction when no free 2 MB page is at hand:
// 125-170 ms calls in issue 19), and so is the kernel's own THP under
// defrag=always, so the default is the predictable one: 4 KB pages. (Pre-
// faulting fresh blocks with MADV_POPULATE_WRITE on all threads: no gain.)
void advise_fresh_block(void* p, size_t bytes) {
  const size_t mode = env_value("FCNFAST_HUGE_PAGES", 0);
#if defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
  madvise(p, bytes, mode == 1 ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
#else
  (void)p;
  (void)bytes;
  (void)mode;
#endif
}

// A 2 MB-aligned anonymous mapping of `bytes` (a multiple of 2 MB): aligned so
// that the kernel can back all of it with huge pages where THP allows.
Block* map_block(size_t bytes) {
  void* raw =
      mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t r = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t a = (r + kHuge - 1) & ~(kHuge - 1);
  if (a > r) munmap(raw, a - r);
  if (r + kHuge > a) munmap(reinterpret_cast<void*>(a + bytes), r + kHuge - a);
  advise_fresh_block(reinterpret_cast<void*>(a), bytes);
  return new Block{reinterpret_cast<void*>(a), bytes, 0};
}

void unmap_block(Block* b) {
  munmap(b->ptr, b->bytes);
  delete b;
}

class BlockCache {
 public:
  // A cached block of at least `bytes` and at most twice that (a much larger
  // block would pin memory the caller does not use), the smallest such; null
  // when none.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if ((*it)->bytes >= bytes && (*it)->bytes <= 2 * bytes &&
          (best == free_.end() || (*it)->bytes < (*best)->bytes))
        best = it;
    if (best == free_.end()) {
      ++misses_;
      return nullptr;
    }
    Block* b = *best;
    free_.erase(best);
    cached_ -= b->bytes;
    ++hits_;
    return b;
  }

  // Keeps a freed block, dropping the least recently freed ones beyond the limit.
  void give(Block* b) {
    const size_t limit = env_value("FCNFAST_CPU_OUTPUT_CACHE_MB", 1024) << 20;
    std::deque<Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(b);
      cached_ += b->bytes;
      while (cached_ > limit && !free_.empty()) {
        drop.push_back(free_.front());
        cached_ -= free_.front()->bytes;
        free_.pop_front();
      }
    }
    for (Block* d : drop) unmap_block(d);  // outside the lock: munmap is slow
  }

  void clear() {
    std::deque<Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      cached_ = 0;
    }
    for (Block* d : drop) unmap_block(d);
  }

  LargeOutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(free_.size()), hits_, misses_};
  }

 private:
  std::mutex mu_;
  std::deque<Block*> free_;  // least recently freed first
  size_t cached_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still return here.
BlockCache& cache() {
  static BlockCache* c = new BlockCache;
  return *c;
}

// What the profiler (and so `fcnfast bench`'s peak memory) sees, as the CPU
// allocator reports it.
void report(void* ptr, int64_t delta) {
  if (c10::memoryProfilingEnabled())
    c10::reportMemoryUsageToProfiler(ptr, delta, 0, 0, c10::Device(c10::DeviceType::CPU));
}

void release(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  report(b->ptr, -static_cast<int64_t>(b->requested));
  cache().give(b);
}

class LargeOutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kLargeOutputBytes) return c10::GetCPUAllocator()->allocate(n);  // a resize_ to small
    const size_t bytes = (n + kHuge - 1) & ~(kHuge - 1);
    Block* b = cache().take(bytes);
    if (b == nullptr) b = map_block(bytes);
    if (b == nullptr)
      return c10::GetCPUAllocator()->allocate(n);  // out of address space: let it report
    b->requested = n;
    report(b->ptr, static_cast<int64_t>(n));
    return {b->ptr, b, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

#endif  // __linux__

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options,
                       at::MemoryFormat format) {
#if defined(__linux__)
  const size_t bytes =
      static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (options.device().is_cpu() && !options.pinned_memory() && bytes >= kLargeOutputBytes) {
    static LargeOutputAllocator* alloc = new LargeOutputAllocator;
    return at::detail::empty_generic(sizes, alloc, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), format);
  }
#endif
  return at::empty(sizes, options.memory_format(format));
}

LargeOutputCacheStats large_output_cache_stats() {
#if defined(__linux__)
  return cache().stats();
#else
  return {0, 0, 0, 0};
#endif
}

void large_output_cache_clear() {
#if defined(__linux__)
  cache().clear();
#endif
}

}  // namespace cpu
}  // namespace fcnfast

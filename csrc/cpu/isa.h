// Run-time instruction-set checks for the kernels compiled beyond the AVX2 baseline.
#pragma once

#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FCNFAST_HAVE_AVX512_KERNELS 1
#include <immintrin.h>
#endif

#include <cstdint>

namespace fcnfast {
namespace cpu {

// Whether the AVX-512 kernels may run: the CPU (and OS) support AVX-512F and
// FCNFAST_NO_AVX512=1 is not set. The variable is read on every call so that
// tests can run both paths in one process.
inline bool use_avx512() {
#if defined(FCNFAST_HAVE_AVX512_KERNELS)
  static const bool cpu_has = __builtin_cpu_supports("avx512f");
  const char* off = std::getenv("FCNFAST_NO_AVX512");
  return cpu_has && !(off != nullptr && off[0] == '1');
#else
  return false;
#endif
}

// Whether bfloat16 layers may run their GEMMs in bfloat16 (oneDNN's AVX512-BF16 kernels, fp32
// accumulation) instead of converting to fp32 first: the CPU has AVX512-BF16 and
// FCNFAST_NO_AVX512=1 is not set. Without the instructions oneDNN would emulate them.
inline bool use_avx512_bf16() {
#if defined(FCNFAST_HAVE_AVX512_KERNELS)
  static const bool cpu_has = __builtin_cpu_supports("avx512bf16");
  return cpu_has && use_avx512();
#else
  return false;
#endif
}

#if defined(FCNFAST_HAVE_AVX512_KERNELS)
// The 16-lane mask selecting the first `lanes` lanes (none for lanes <= 0).
inline __mmask16 lane_mask(int64_t lanes) {
  return lanes >= 16 ? __mmask16(0xFFFF) : lanes <= 0 ? __mmask16(0) : __mmask16((1u << lanes) - 1);
}
#endif

}  // namespace cpu
}  // namespace fcnfast

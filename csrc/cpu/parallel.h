// at::parallel_for grain shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fcnfast {
namespace cpu {

// Minimum elementary operations per at::parallel_for chunk, per kernel family
// (each tuned on its inner loop): small steps run inline, without a parallel
// region, whose barrier costs a scheduler time slice when the cores are shared.
constexpr int64_t kRowMinWork = int64_t(1) << 14;     // streamed bilinear rows (bilinear_rows.h)
constexpr int64_t kWindowMinWork = int64_t(1) << 16;  // score_skip's window loops
constexpr int64_t kConvMinWork = int64_t(1) << 18;    // conv_transpose2d's phase / direct loops
constexpr int64_t kCrfMinWork = int64_t(1) << 20;     // the dense CRF's lattice and blur passes

// Items per chunk so that one chunk carries at least `min_work` operations when
// each item costs `work_per_item` (at least one item).
inline int64_t grain_for(int64_t work_per_item, int64_t min_work) {
  return std::max<int64_t>(1, min_work / std::max<int64_t>(1, work_per_item));
}

}  // namespace cpu
}  // namespace fcnfast

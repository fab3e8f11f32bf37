// CPU mean-field inference for the fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011) with
// Potts compatibility, a Gaussian smoothness kernel and a bilateral appearance kernel.
//
// Per image, with P = H*W pixels and logits z (C x P):
//   Q = softmax(z);  repeat `iterations` times:
//     Q = softmax(z + spatial_weight * msg_s(Q) + bilateral_weight * msg_b(Q))
//   msg_m(Q)_i = n_i * sum_{j != i} k_m(i, j) n_j Q_j,   n_i = (sum_{j != i} k_m(i, j))^(-1/2)
// (symmetric normalisation as in densecrf v2 / pydensecrf; n_i = 0 when the row sum is below
// 1e-4 of the self weight, i.e. a pixel with no neighbour under that kernel gets no message).
//   spatial:   k_s = exp(-|p_i - p_j|^2 / (2 spatial_std^2)), an exact separable Gaussian blur
//              truncated at 4 std (relative tail error <= exp(-8) = 3.4e-4);
//   bilateral: k_b = exp(-|p_i - p_j|^2 / (2 theta_a^2) - |I_i - I_j|^2 / (2 theta_b^2)), the
//              permutohedral lattice operator L ~ c k_b (Adams et al. 2010) with its own diagonal
//              L_ii removed exactly (csrc/cpu/permutohedral.h); c cancels in the normalisation.
// fcnfast.crf.dense_crf_reference computes the same with exact kernels in O(P^2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "../host/checks.h"
#include "isa.h"
#include "parallel.h"
#include "permutohedral.h"
#include "vec8.h"

namespace fcnfast {
namespace {

// A row sum below this fraction of the self weight counts as "no neighbours" (no message).
constexpr float kIsolated = 1e-4f;
constexpr double kTruncate = 4.0;  // spatial Gaussian radius in standard deviations

// parallel(begin, end, work_per_item, fn): at::parallel_for with a grain from the work
// estimate (multiply-adds; cpu::kCrfMinWork per chunk: below it the fork/join costs more, and
// on a machine shared with other jobs waiting for a descheduled thread costs milliseconds).
auto parallel = [](int64_t begin, int64_t end, int64_t work_per_item, auto&& fn) {
  at::parallel_for(begin, end, cpu::grain_for(work_per_item, cpu::kCrfMinWork),
                   [&](int64_t b, int64_t e) { fn(b, e); });
};

// Scratch buffers of the CRF (P x Cp floats each, 24 MB for a 500x500 image with 21 labels).
// Fresh pages cost a page fault each on first touch -- measured on the 2-core VM at about
// 1 ms per MB, as much as the whole filtering -- so released buffers are kept, up to
// kPoolBytes in all, for the next call (the next image of a data set, the next tile).
// Contents are unspecified: every buffer is written in full before it is read.
class BufferPool {
 public:
  static constexpr int64_t kPoolBytes = int64_t{256} << 20;

  static BufferPool& instance() {
    static BufferPool pool;
    return pool;
  }

  std::unique_ptr<float[]> take(int64_t size, int64_t& capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // the smallest kept buffer that fits without wasting more than half of it
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second >= size && it->second <= 2 * size &&
            (best == free_.end() || it->second < best->second)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        capacity = best->second;
        kept_ -= capacity * static_cast<int64_t>(sizeof(float));
        auto data = std::move(best->first);
        free_.erase(best);
        return data;
      }
    }
    capacity = size;
    return std::make_unique_for_overwrite<float[]>(size);
  }

  void give(std::unique_ptr<float[]> data, int64_t capacity) {
    const int64_t bytes = capacity * static_cast<int64_t>(sizeof(float));
    std::lock_guard<std::mutex> lock(mutex_);
    if (kept_ + bytes > kPoolBytes) return;  // freed here
    kept_ += bytes;
    free_.emplace_back(std::move(data), capacity);
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<std::unique_ptr<float[]>, int64_t>> free_;
  int64_t kept_ = 0;
};

// A float buffer from the pool, returned to it when destroyed.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t size) : data_(BufferPool::instance().take(size, capacity_)) {}
  Buffer(Buffer&&) = default;
  Buffer& operator=(Buffer&& other) {
    release();
    data_ = std::move(other.data_);
    capacity_ = other.capacity_;
    return *this;
  }
  ~Buffer() { release(); }
  float* get() const { return data_.get(); }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  void release() {
    if (data_) BufferPool::instance().give(std::move(data_), capacity_);
  }
  int64_t capacity_ = 0;  // before data_: take() sets it while data_ is initialised
  std::unique_ptr<float[]> data_;
};

// dst[k] = g0 src[k] + sum_t g_t (a_t[k] + b_t[k]) for k in [0, n): one output row of a
// symmetric FIR filter, eight lanes at a time with 4 vector accumulators held in registers
// across all taps (one store per output instead of one per tap). A tap with one side outside
// the image is passed as (a, a, g / 2), which is exact in float.
struct TapPair {
  const float* a;
  const float* b;
  float g;
};

void symmetric_taps(const float* src, float g0, const TapPair* taps, int64_t num_taps, float* dst,
                    int64_t n) {
  using simd::Vec8;
  const Vec8 w0 = Vec8::broadcast(g0);
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    Vec8 acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = w0 * Vec8::load(src + k + 8 * u);
    for (int64_t t = 0; t < num_taps; ++t) {
      const Vec8 g = Vec8::broadcast(taps[t].g);
      for (int u = 0; u < 4; ++u) {
        const int64_t o = k + 8 * u;
        acc[u] = fmadd(g, Vec8::load(taps[t].a + o) + Vec8::load(taps[t].b + o), acc[u]);
      }
    }
    for (int u = 0; u < 4; ++u) acc[u].store(dst + k + 8 * u);
  }
  for (; k + 8 <= n; k += 8) {
    Vec8 acc = w0 * Vec8::load(src + k);
    for (int64_t t = 0; t < num_taps; ++t) {
      acc = fmadd(Vec8::broadcast(taps[t].g), Vec8::load(taps[t].a + k) + Vec8::load(taps[t].b + k),
                  acc);
    }
    acc.store(dst + k);
  }
  for (; k < n; ++k) {
    float acc = g0 * src[k];
    for (int64_t t = 0; t < num_taps; ++t)
      acc = std::fma(taps[t].g, taps[t].a[k] + taps[t].b[k], acc);
    dst[k] = acc;
  }
}

#if defined(FCNFAST_HAVE_AVX512_KERNELS)
// symmetric_taps on 16-lane vectors (4 accumulators of 16, then masked 16-lane tails): per
// element the same operations in the same order, so the same bits as the 8-lane version.
__attribute__((target("avx512f"))) void symmetric_taps_avx512(const float* src, float g0,
                                                              const TapPair* taps, int64_t num_taps,
                                                              float* dst, int64_t n) {
  const __m512 w0 = _mm512_set1_ps(g0);
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    __m512 acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_mul_ps(w0, _mm512_loadu_ps(src + k + 16 * u));
    for (int64_t t = 0; t < num_taps; ++t) {
      const __m512 g = _mm512_set1_ps(taps[t].g);
      for (int u = 0; u < 4; ++u) {
        const int64_t o = k + 16 * u;
        const __m512 pair =
            _mm512_add_ps(_mm512_loadu_ps(taps[t].a + o), _mm512_loadu_ps(taps[t].b + o));
        acc[u] = _mm512_fmadd_ps(g, pair, acc[u]);
      }
    }
    for (int u = 0; u < 4; ++u) _mm512_storeu_ps(dst + k + 16 * u, acc[u]);
  }
  for (; k < n; k += 16) {
    const __mmask16 m = cpu::lane_mask(n - k);
    __m512 acc = _mm512_mul_ps(w0, _mm512_maskz_loadu_ps(m, src + k));
    for (int64_t t = 0; t < num_taps; ++t) {
      const __m512 pair = _mm512_add_ps(_mm512_maskz_loadu_ps(m, taps[t].a + k),
                                        _mm512_maskz_loadu_ps(m, taps[t].b + k));
      acc = _mm512_fmadd_ps(_mm512_set1_ps(taps[t].g), pair, acc);
    }
    _mm512_mask_storeu_ps(dst + k, m, acc);
  }
}
#endif

using TapsFn = void (*)(const float*, float, const TapPair*, int64_t, float*, int64_t);

// The AVX-512 version where the CPU has it (and FCNFAST_NO_AVX512 is not 1), else the 8-lane one.
TapsFn symmetric_taps_kernel() {
#if defined(FCNFAST_HAVE_AVX512_KERNELS)
  if (cpu::use_avx512()) return &symmetric_taps_avx512;
#endif
  return &symmetric_taps;
}

// Exact Gaussian blur of an H x W image with `cs` floats per pixel (channels last), zero outside,
// separable: the horizontal pass row by row (each row read once, from a copy with zero margins),
// then the vertical pass in column strips narrow enough that the 2 radius + 1 rows of a strip
// stay in the L2 cache while the strip is swept downwards.
class SpatialBlur {
 public:
  SpatialBlur(int64_t h, int64_t w, double std) : h_(h), w_(w) {
    const int64_t reach = std::max(h, w) - 1;
    radius_ = std::min<int64_t>(static_cast<int64_t>(std::ceil(kTruncate * std)), reach);
    taps_.resize(radius_ + 1);
    for (int64_t t = 0; t <= radius_; ++t) {
      taps_[t] = static_cast<float>(std::exp(-0.5 * t * t / (std * std)));
    }
  }

  // out = G (scale * in): each pixel's `cs` values multiplied by scale[pixel] (none when null)
  // as its row is copied for the horizontal pass, so the CRF blurs n * Q without writing it.
  void apply(const float* in, float* out, int64_t cs, const float* scale = nullptr) {
    const int64_t row = w_ * cs, margin = radius_ * cs;
    if (tmp_size_ < h_ * row) {
      tmp_ = Buffer(h_ * row);
      tmp_size_ = h_ * row;
    }
    float* tmp = tmp_.get();
    const TapsFn filter_row = symmetric_taps_kernel();
    parallel(0, h_, row * 2 * (radius_ + 1), [&](int64_t begin, int64_t end) {  // horizontal
      std::vector<float> line(row + 2 * margin, 0.0f);
      float* center = line.data() + margin;
      std::vector<TapPair> taps(radius_);
      for (int64_t t = 1; t <= radius_; ++t)
        taps[t - 1] = {center - t * cs, center + t * cs, taps_[t]};
      for (int64_t y = begin; y < end; ++y) {
        if (scale == nullptr) {
          std::copy(in + y * row, in + (y + 1) * row, center);
        } else {
          for (int64_t x = 0; x < w_; ++x) {
            const float sx = scale[y * w_ + x];
            for (int64_t c = 0; c < cs; ++c) center[x * cs + c] = sx * in[(y * w_ + x) * cs + c];
          }
        }
        filter_row(center, taps_[0], taps.data(), radius_, tmp + y * row, row);
      }
    });
    const int64_t strips = (row + kStrip - 1) / kStrip;
    parallel(0, strips, h_ * kStrip * 2 * (radius_ + 1), [&](int64_t begin, int64_t end) {
      std::vector<TapPair> taps(radius_);
      for (int64_t s = begin; s < end; ++s) {
        const int64_t k0 = s * kStrip, n = std::min(kStrip, row - k0);
        for (int64_t y = 0; y < h_; ++y) {
          int64_t used = 0;
          for (int64_t t = 1; t <= radius_; ++t) {  // vertical taps that exist for this row
            const bool up = y - t >= 0, down = y + t < h_;
            if (up && down) {
              taps[used++] = {tmp + (y - t) * row + k0, tmp + (y + t) * row + k0, taps_[t]};
            } else if (up || down) {
              const float* only = tmp + (up ? y - t : y + t) * row + k0;
              taps[used++] = {only, only, 0.5f * taps_[t]};
            }
          }
          filter_row(tmp + y * row + k0, taps_[0], taps.data(), used, out + y * row + k0, n);
        }
      }
    });
  }

 private:
  static constexpr int64_t kStrip = 512;  // floats per strip: 25 rows x 2 KiB for std 3
  int64_t h_, w_, radius_;
  std::vector<float> taps_;
  Buffer tmp_;  // the horizontally blurred image, reused across iterations
  int64_t tmp_size_ = 0;
};

// n_i = (row_sum_i - self_i)^(-1/2), 0 for isolated pixels.
void normaliser(const float* row_sum, const float* self, int64_t P, float* n) {
  for (int64_t i = 0; i < P; ++i) {
    const float others = row_sum[i] - self[i];
    n[i] = others > kIsolated * self[i] ? 1.0f / std::sqrt(others) : 0.0f;
  }
}

void check_lattice_features(const float* f, int64_t count, const char* what) {
  TORCH_CHECK_VALUE(permutohedral::features_in_range(f, count), "fcnfast: ", what,
                    " must be finite and at most ", permutohedral::kMaxFeature,
                    " in absolute value (NaN/Inf in the image, or a tiny bilateral std?)");
}

// Labels padded to whole 8-lane vectors: every per-pixel and per-vertex row is Cp floats.
int64_t padded_labels(int64_t C) { return (C + 7) / 8 * 8; }

// 8 x 8 transpose: dst[r * dst_stride + c] = src[c * src_stride + r], r, c < 8.
inline void transpose8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
#ifdef FCNFAST_VEC8_AVX2
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * src_stride);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    r[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * dst_stride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * dst_stride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
  }
#else
  for (int r = 0; r < 8; ++r) {
    for (int c = 0; c < 8; ++c) dst[r * dst_stride + c] = src[c * src_stride + r];
  }
#endif
}

// z (P x Cp, channels last) from logits (C x P); the padding lanes are -inf, so the softmax
// gives them probability exactly 0 and they carry zeros through every filter. Whole 8 x 8
// tiles (8 labels x 8 pixels) are transposed in registers, the edges element by element.
void pack_logits(const float* logits, int64_t C, int64_t P, int64_t Cp, float* z) {
  constexpr int64_t kBlock = 64;  // pixels per block: the block's rows stay in L1
  const float pad = -std::numeric_limits<float>::infinity();
  parallel(0, (P + kBlock - 1) / kBlock, kBlock * Cp, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kBlock, i1 = std::min(P, i0 + kBlock);
      const int64_t full_i = i0 + (i1 - i0) / 8 * 8, full_c = C / 8 * 8;
      for (int64_t c = 0; c < full_c; c += 8) {
        for (int64_t i = i0; i < full_i; i += 8)
          transpose8x8(logits + c * P + i, P, z + i * Cp + c, Cp);
        for (int64_t i = full_i; i < i1; ++i) {
          for (int64_t cc = c; cc < c + 8; ++cc) z[i * Cp + cc] = logits[cc * P + i];
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t c = full_c; c < Cp; ++c) z[i * Cp + c] = c < C ? logits[c * P + i] : pad;
      }
    }
  });
}

// out (C x P) from Q (P x Cp).
void unpack_labels(const float* Q, int64_t C, int64_t P, int64_t Cp, float* out) {
  constexpr int64_t kBlock = 64;
  parallel(0, (P + kBlock - 1) / kBlock, kBlock * C, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kBlock, i1 = std::min(P, i0 + kBlock);
      const int64_t full_i = i0 + (i1 - i0) / 8 * 8, full_c = C / 8 * 8;
      for (int64_t c = 0; c < full_c; c += 8) {
        for (int64_t i = i0; i < full_i; i += 8)
          transpose8x8(Q + i * Cp + c, Cp, out + c * P + i, P);
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t from = c < full_c ? full_i : i0;  // the rest of the block's pixels
        for (int64_t i = from; i < i1; ++i) out[c * P + i] = Q[i * Cp + c];
      }
    }
  });
}

// One pairwise term of the mean-field update: weight, normaliser n and self weight (the
// kernel's diagonal) per pixel.
struct PairwiseTerm {
  float weight = 0.0f;
  std::vector<float> n, self;
};

// A term's message to one pixel: its filtered n * Q row and w n_i, self_i n_i.
struct Message {
  const float* filtered;
  float wn, sn;
};

// Q_i = softmax(z_i + sum_t w_t n_i (filtered_t,i - self_t,i n_i Q_i)) for one pixel of Cp =
// 8 nv labels, in place: the energy of each 8-label vector overwrites Q_i's once all T
// messages have read it.
inline void update_pixel(const float* zi, const Message* msg, int64_t T, int64_t nv, float* q) {
  using simd::Vec8;
  Vec8 top = Vec8::broadcast(-std::numeric_limits<float>::infinity());
  for (int64_t v = 0; v < nv; ++v) {
    Vec8 e = Vec8::load(zi + 8 * v);
    const Vec8 qv = Vec8::load(q + 8 * v);
    for (int64_t t = 0; t < T; ++t) {
      e = fmadd(Vec8::broadcast(msg[t].wn),
                Vec8::load(msg[t].filtered + 8 * v) - Vec8::broadcast(msg[t].sn) * qv, e);
    }
    top = max(top, e);
    e.store(q + 8 * v);
  }
  const Vec8 shift = Vec8::broadcast(top.hmax());
  Vec8 total = Vec8::zero();
  for (int64_t v = 0; v < nv; ++v) {
    const Vec8 p = simd::exp_nonpositive(Vec8::load(q + 8 * v) - shift);
    total = total + p;
    p.store(q + 8 * v);
  }
  const Vec8 inv = Vec8::broadcast(1.0f / total.hsum());
  for (int64_t v = 0; v < nv; ++v) (Vec8::load(q + 8 * v) * inv).store(q + 8 * v);
}

// The filters of one image: the spatial blur and the bilateral lattice, each with its term
// (null when that term's weight is 0).
struct Filters {
  SpatialBlur* blur = nullptr;
  const PairwiseTerm* spatial = nullptr;
  const permutohedral::Lattice* lattice = nullptr;
  const PairwiseTerm* bilateral = nullptr;
  permutohedral::Workspace work;  // the lattice's vertex buffers, reused by every iteration
  float* blurred = nullptr;       // P x Cp: the spatial blur's output
};

// One mean-field iteration on Q (P x Cp): the spatial blur of n Q into f.blurred, the
// lattice's splat and blur of n Q, then one pass over the pixels in memory order that slices
// each block of pixels into L1-sized scratch and updates them at once: the lattice's filtered
// image is never written and read back (P x Cp floats, 24 MB at 500x500 with 21 labels).
void mean_field_iteration(const float* z, Filters& f, int64_t P, int64_t Cp, float* Q) {
  const float* vertex_values = f.lattice ? f.lattice->splat_blur(Q, Cp, parallel, f.work) : nullptr;
  if (f.blur) f.blur->apply(Q, f.blurred, Cp, f.spatial->n.data());
  constexpr int64_t kBlock = 16;  // pixels sliced at once
  const int64_t nv = Cp / 8;
  const int64_t per_pixel = Cp * (8 + (f.lattice ? 2 * (f.lattice->dims() + 1) : 0));
  parallel(0, (P + kBlock - 1) / kBlock, kBlock * per_pixel, [&](int64_t begin, int64_t end) {
    std::vector<float> sliced(f.lattice ? kBlock * Cp : 0);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kBlock, n = std::min(kBlock, P - i0);
      if (f.lattice) f.lattice->slice_rows(vertex_values, sliced.data(), Cp, i0, i0 + n);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t i = i0 + k;
        Message msg[2];
        int64_t T = 0;
        if (f.blur) {
          const PairwiseTerm& t = *f.spatial;
          msg[T++] = {f.blurred + i * Cp, t.weight * t.n[i], t.self[i] * t.n[i]};
        }
        if (f.lattice) {
          const PairwiseTerm& t = *f.bilateral;
          msg[T++] = {sliced.data() + k * Cp, t.weight * t.n[i], t.self[i] * t.n[i]};
        }
        update_pixel(z + i * Cp, msg, T, nv, Q + i * Cp);
      }
    }
  });
}

struct CrfParams {
  int64_t iterations;
  double spatial_std, spatial_weight, bilateral_spatial_std, bilateral_color_std, bilateral_weight;
};

// The bilateral features (P x (2 + K)) in std units: x, y, then the appearance channels.
std::vector<float> bilateral_features(const float* appearance, int64_t H, int64_t W, int64_t K,
                                      const CrfParams& p) {
  const int64_t P = H * W, d = 2 + K;
  std::vector<float> features(P * d);
  for (int64_t i = 0; i < P; ++i) {
    float* f = features.data() + i * d;
    f[0] = static_cast<float>((i % W) / p.bilateral_spatial_std);
    f[1] = static_cast<float>((i / W) / p.bilateral_spatial_std);
    for (int64_t k = 0; k < K; ++k) {
      f[2 + k] = static_cast<float>(appearance[k * P + i] / p.bilateral_color_std);
    }
  }
  return features;
}

// One image: logits and the returned Q are C x P (planar, as in NCHW), appearance K x P.
void mean_field_image(const float* logits, const float* appearance, int64_t H, int64_t W, int64_t C,
                      int64_t K, const CrfParams& p, float* out) {
  const int64_t P = H * W, Cp = padded_labels(C);
  auto new_term = [&](double weight) {
    PairwiseTerm t;
    t.weight = static_cast<float>(weight);
    t.n.resize(P);
    t.self.assign(P, 1.0f);
    return t;
  };
  PairwiseTerm spatial, bilateral;
  Filters filters;
  std::vector<float> ones(P, 1.0f), sums(P);

  SpatialBlur blur(H, W, p.spatial_std);
  if (p.spatial_weight != 0.0) {
    spatial = new_term(p.spatial_weight);  // exact kernel: self weight k(0) = 1
    blur.apply(ones.data(), sums.data(), 1);
    normaliser(sums.data(), spatial.self.data(), P, spatial.n.data());
    filters.blur = &blur;
    filters.spatial = &spatial;
  }
  std::unique_ptr<permutohedral::Lattice> lattice;
  if (p.bilateral_weight != 0.0) {
    const int d = static_cast<int>(2 + K);
    std::vector<float> features = bilateral_features(appearance, H, W, K, p);
    check_lattice_features(features.data(), P * d, "dense_crf: appearance / bilateral_color_std");
    lattice = std::make_unique<permutohedral::Lattice>(features.data(), P, d, parallel);
    bilateral = new_term(p.bilateral_weight);
    lattice->self_weights(bilateral.self.data(), parallel);
    {  // row sums: the filter of ones, in lane 0 of 8 (pooled buffers, no copies)
      Buffer in(P * 8), filtered(P * 8);
      for (int64_t i = 0; i < P * 8; ++i) in.get()[i] = i % 8 == 0 ? 1.0f : 0.0f;
      lattice->filter_padded(in.get(), filtered.get(), 8, parallel, filters.work);
      for (int64_t i = 0; i < P; ++i) sums[i] = filtered.get()[i * 8];
    }
    normaliser(sums.data(), bilateral.self.data(), P, bilateral.n.data());
    lattice->scale_inputs(bilateral.n.data());  // from here on it filters n * Q
    filters.lattice = lattice.get();
    filters.bilateral = &bilateral;
  }

  Buffer z(P * Cp), Q(P * Cp);
  pack_logits(logits, C, P, Cp, z.get());
  parallel(0, P, Cp * 8, [&](int64_t begin, int64_t end) {  // Q = softmax(z)
    for (int64_t i = begin; i < end; ++i)
      update_pixel(z.get() + i * Cp, nullptr, 0, Cp / 8, Q.get() + i * Cp);
  });
  Buffer blurred;
  if (filters.blur) blurred = Buffer(P * Cp);
  filters.blurred = blurred.get();
  for (int64_t it = 0; it < p.iterations; ++it) {
    mean_field_iteration(z.get(), filters, P, Cp, Q.get());
  }
  unpack_labels(Q.get(), C, P, Cp, out);
}

void check_params(const CrfParams& p) {
  TORCH_CHECK_VALUE(p.iterations >= 0, "fcnfast: dense_crf iterations must be >= 0, got ",
                    p.iterations);
  const std::pair<const char*, double> stds[] = {{"spatial_std", p.spatial_std},
                                                 {"bilateral_spatial_std", p.bilateral_spatial_std},
                                                 {"bilateral_color_std", p.bilateral_color_std}};
  for (const auto& [name, value] : stds) {
    TORCH_CHECK_VALUE(std::isfinite(value) && value > 0.0, "fcnfast: dense_crf ", name,
                      " must be a positive finite number, got ", value);
  }
  TORCH_CHECK_VALUE(std::isfinite(p.spatial_weight) && std::isfinite(p.bilateral_weight),
                    "fcnfast: dense_crf weights must be finite, got spatial_weight=",
                    p.spatial_weight, ", bilateral_weight=", p.bilateral_weight);
}

// Both inputs defined, `dim`-D, float32, on the CPU.
void check_float_cpu_inputs(const at::Tensor& a, const char* na, const at::Tensor& b,
                            const char* nb, int64_t dim, const char* op) {
  check_defined(a, na);
  check_defined(b, nb);
  check_dim(a, dim, na);
  check_dim(b, dim, nb);
  TORCH_CHECK_VALUE(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "fcnfast: ", op,
                    " takes float32 ", na, " and ", nb, ", got ", a.scalar_type(), " and ",
                    b.scalar_type());
  check_device(a, at::kCPU, na);
  check_device(b, at::kCPU, nb);
}

at::Tensor dense_crf_cpu(const at::Tensor& logits, const at::Tensor& appearance, int64_t iterations,
                         double spatial_std, double spatial_weight, double bilateral_spatial_std,
                         double bilateral_color_std, double bilateral_weight) {
  check_float_cpu_inputs(logits, "unary_logits", appearance, "appearance", 4, "dense_crf");
  TORCH_CHECK_VALUE(logits.size(0) == appearance.size(0) && logits.size(2) == appearance.size(2) &&
                        logits.size(3) == appearance.size(3),
                    "fcnfast: dense_crf unary_logits ", shape_str(logits), " and appearance ",
                    shape_str(appearance), " must agree in batch, height and width");
  const int64_t N = logits.size(0), C = logits.size(1), H = logits.size(2), W = logits.size(3);
  const int64_t K = appearance.size(1);
  TORCH_CHECK_VALUE(K >= 1 && K + 2 <= permutohedral::kMaxDim,
                    "fcnfast: dense_crf appearance must have 1 to ", permutohedral::kMaxDim - 2,
                    " channels, got ", K);
  const CrfParams params{iterations,          spatial_std,
                         spatial_weight,      bilateral_spatial_std,
                         bilateral_color_std, bilateral_weight};
  check_params(params);
  check_index32(N * C * H * W, "unary_logits");
  check_index32(H * W * (K + 3), "appearance lattice entries");

  auto z = logits.contiguous();
  auto a = appearance.contiguous();
  auto q = at::empty_like(z);
  if (q.numel() == 0) return q;
  const int64_t P = H * W;
  for (int64_t b = 0; b < N; ++b) {
    mean_field_image(z.data_ptr<float>() + b * C * P, a.data_ptr<float>() + b * K * P, H, W, C, K,
                     params, q.data_ptr<float>() + b * C * P);
  }
  return q;
}

// The raw lattice operator, for tests: out = L values (or (L - diag L) values), features (P, d)
// already divided by their stds, values (P, C).
at::Tensor permutohedral_filter_cpu(const at::Tensor& features, const at::Tensor& values,
                                    bool exclude_self) {
  check_float_cpu_inputs(features, "features", values, "values", 2, "permutohedral_filter");
  TORCH_CHECK_VALUE(features.size(0) == values.size(0), "fcnfast: features ", shape_str(features),
                    " and values ", shape_str(values), " must have the same number of points");
  const int64_t P = features.size(0), C = values.size(1);
  TORCH_CHECK_VALUE(features.size(1) >= 1 && features.size(1) <= permutohedral::kMaxDim,
                    "fcnfast: features must have 1 to ", permutohedral::kMaxDim,
                    " dimensions, got ", features.size(1));
  check_index32(P * (features.size(1) + 1), "lattice entries");
  auto f = features.contiguous();
  auto v = values.contiguous();
  auto out = at::empty({P, C}, v.options());
  if (P == 0 || C == 0) return out.zero_();
  check_lattice_features(f.data_ptr<float>(), f.numel(), "permutohedral_filter: features");
  permutohedral::Lattice lattice(f.data_ptr<float>(), P, static_cast<int>(f.size(1)), parallel);
  lattice.filter(v.data_ptr<float>(), out.data_ptr<float>(), C, parallel);
  if (exclude_self) {
    float* o = out.data_ptr<float>();
    const float* in = v.data_ptr<float>();
    std::vector<float> self(P);
    lattice.self_weights(self.data(), parallel);
    for (int64_t i = 0; i < P; ++i) {
      for (int64_t c = 0; c < C; ++c) o[i * C + c] -= self[i] * in[i * C + c];
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fcnfast, m) {
  // logits (N, C, H, W) and appearance (N, K, H, W) float32 in 0..255 units -> Q (N, C, H, W)
  m.def(
      "dense_crf(Tensor unary_logits, Tensor appearance, int iterations, float spatial_std, "
      "float spatial_weight, float bilateral_spatial_std, float bilateral_color_std, "
      "float bilateral_weight) -> Tensor");
  m.def("permutohedral_filter(Tensor features, Tensor values, bool exclude_self) -> Tensor");
}

TORCH_LIBRARY_IMPL(fcnfast, CPU, m) {
  m.impl("dense_crf", &dense_crf_cpu);
  m.impl("permutohedral_filter", &permutohedral_filter_cpu);
}

}  // namespace fcnfast

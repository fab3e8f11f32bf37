// Permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) for high-dimensional Gaussian
// filtering in time linear in the number of points, as used by the fully connected CRF of
// Kraehenbuehl & Koltun (NIPS 2011). Host-only, torch-free C++.
//
// Points with d-dimensional features (already divided by the Gaussian's standard deviations) are
// embedded in the d-dimensional hyperplane H_d of Z^(d+1); each point "splats" its value onto the
// d+1 vertices of its enclosing simplex with barycentric weights, the lattice values are blurred
// with [1/2 1 1/2] along each of the d+1 lattice directions, and each point "slices" (interpolates)
// the result back with the same weights. The composite linear operator
//     L = alpha * S^T B S        (S: splat matrix, B: blur, alpha = 1 / (1 + 2^-d))
// approximates c * exp(-|f_i - f_j|^2 / 2) up to a constant scale c (removed by normalisation).
//
// Everything here is deterministic: vertices get ids in order of first insertion (pixel order),
// splatting is a gather over the transposed splat matrix (no atomics) or, when vertices are few,
// a scatter into one buffer per fixed chunk of points summed in chunk order (the chunks depend
// on the data only, not on the thread count), and the parallel loops (supplied by the caller as
// `par(begin, end, work_per_item, fn)`) write disjoint outputs. Values are filtered in rows of a
// multiple of 8 floats (simd::Vec8), labels innermost.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec8.h"

namespace fcnfast {
namespace permutohedral {

constexpr int kMaxDim = 16;       // feature dimensions d (2 spatial + appearance)
constexpr int kMaxTabulated = 8;  // tabulate blur entries per vertex for d + 1 <= this
// ... and while the tables (3 x vertices x 2^(d+1) floats) stay below this
constexpr int64_t kMaxTableBytes = int64_t{256} << 20;

// Largest |feature| (in std units) whose lattice coordinates stay exact integers in float32 and
// far from int32 overflow; features outside (or NaN/Inf) must be rejected before building.
constexpr float kMaxFeature = 1e5f;

// True when every feature is finite and |f| <= kMaxFeature.
inline bool features_in_range(const float* f, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (!(std::fabs(f[i]) <= kMaxFeature)) return false;  // also false for NaN
  }
  return true;
}

// a[0..n) == b[0..n), inline (keys are a few ints; a libc memcmp call costs more than the loop)
template <class T>
inline bool same(const T* a, const T* b, int n) {
  for (int k = 0; k < n; ++k) {
    if (a[k] != b[k]) return false;
  }
  return true;
}

// Open-addressing hash table from lattice keys (the first d of d+1 integer coordinates; the last
// is minus their sum) to dense vertex ids 0..size()-1 in order of first insertion.
class KeyTable {
 public:
  KeyTable(int d, int64_t expected) : d_(d) {
    size_t cap = 64;
    while (cap < static_cast<size_t>(expected) * 2) cap <<= 1;
    slots_.assign(cap, -1);
    keys_.reserve(static_cast<size_t>(expected) * d);
  }

  int64_t size() const { return size_; }
  const int32_t* key(int64_t id) const { return keys_.data() + id * d_; }

  // Id of `key`, or -1 when absent.
  int32_t find(const int32_t* key) const {
    for (size_t s = hash(key) & mask();; s = (s + 1) & mask()) {
      int32_t id = slots_[s];
      if (id < 0 || equal(id, key)) return id;
    }
  }

  // Id of `key`, inserting it when absent.
  int32_t insert(const int32_t* key) {
    if (static_cast<size_t>(size() + 1) * 2 > slots_.size()) grow();
    for (size_t s = hash(key) & mask();; s = (s + 1) & mask()) {
      int32_t id = slots_[s];
      if (id >= 0 && equal(id, key)) return id;
      if (id < 0) {
        id = static_cast<int32_t>(size_++);
        keys_.insert(keys_.end(), key, key + d_);
        slots_[s] = id;
        return id;
      }
    }
  }

 private:
  size_t mask() const { return slots_.size() - 1; }
  size_t hash(const int32_t* key) const {
    size_t h = 0;
    for (int i = 0; i < d_; ++i) {
      h += static_cast<uint32_t>(key[i]);
      h *= 2531011u;
    }
    return h ^ (h >> 29);
  }
  bool equal(int32_t id, const int32_t* key) const {
    return same(keys_.data() + static_cast<size_t>(id) * d_, key, d_);
  }
  void grow() {
    std::vector<int32_t> old(slots_.size() * 2, -1);
    slots_.swap(old);
    for (int32_t id = 0; id < size(); ++id) {
      size_t s = hash(key(id)) & mask();
      while (slots_[s] >= 0) s = (s + 1) & mask();
      slots_[s] = id;
    }
  }

  int d_;
  int64_t size_ = 0;
  std::vector<int32_t> slots_;
  std::vector<int32_t> keys_;
};

// Vertex value buffers reused across filter_padded calls (a CRF filters once per iteration).
struct Workspace {
  std::vector<float> a, b, c;
};

class Lattice {
 public:
  // features: num_points x d, row-major, each coordinate already divided by its std.
  // `par(begin, end, work_per_item, fn)` runs fn(b, e) over disjoint sub-ranges.
  template <class ParFor>
  Lattice(const float* features, int64_t num_points, int d, ParFor par)
      : d_(d), n_(num_points), table_(d, num_points / 8 + 64) {
    const int64_t D1 = d + 1;
    vertex_.resize(n_ * D1);
    weight_.resize(n_ * D1);
    rank_.resize(n_ * D1);
    for (int j = 1; j <= d;
         ++j) {  // scale so that the lattice blur approximates a unit-std Gaussian
      elevate_scale_[j] = std::sqrt(2.0f / 3.0f) * D1 / std::sqrt(static_cast<float>(j * (j + 1)));
    }
    std::vector<int32_t> rem0(n_ * D1);
    par(0, n_, 8 * D1 * D1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) locate(features + i * d, i, rem0.data() + i * D1);
    });
    insert_vertices(rem0.data());
    m_ = table_.size();
    build_neighbors(par);
    if (scatter_chunks() == 1) build_splat_gather();  // the scatter path needs no CSR
    alpha_ = 1.0f / (1.0f + std::pow(2.0f, -static_cast<float>(d)));
  }

  int64_t num_vertices() const { return m_; }
  int dims() const { return d_; }

  // From now on filter() computes L diag(s): each point's input scaled by s[i] as it is
  // splatted. The CRF filters n * Q; folding n into the splat weights saves writing n * Q
  // (P x labels) every iteration.
  void scale_inputs(const float* s) {
    for (size_t e = 0; e < splat_point_.size(); ++e) splat_weight_[e] *= s[splat_point_[e]];
    input_scale_.assign(s, s + n_);
  }

  // out = L in, for `channels` values per point (in, out: num_points x channels; may not alias).
  template <class ParFor>
  void filter(const float* in, float* out, int64_t channels, ParFor par) const {
    Workspace work;
    const int64_t C = channels, Cp = (C + 7) / 8 * 8;
    if (Cp == C) return filter_padded(in, out, C, par, work);
    std::vector<float> pin(n_ * Cp, 0.0f), pout(n_ * Cp);
    for (int64_t i = 0; i < n_; ++i) std::copy(in + i * C, in + (i + 1) * C, pin.data() + i * Cp);
    filter_padded(pin.data(), pout.data(), Cp, par, work);
    for (int64_t i = 0; i < n_; ++i) {
      std::copy(pout.data() + i * Cp, pout.data() + i * Cp + C, out + i * C);
    }
  }

  // filter() for rows of Cp floats, Cp a multiple of 8 (whole vectors everywhere).
  template <class ParFor>
  void filter_padded(const float* in, float* out, int64_t Cp, ParFor par, Workspace& work) const {
    const float* vals = splat_blur(in, Cp, par, work);
    par(0, n_, (d_ + 1) * Cp,
        [&](int64_t begin, int64_t end) { slice_rows(vals, out + begin * Cp, Cp, begin, end); });
  }

  // The first two steps of filter_padded: splat `in` and blur, returning the vertex values
  // (inside `work`) that slice_rows interpolates. A caller that consumes the filtered rows
  // point by point slices them where it needs them instead of writing num_points x Cp.
  template <class ParFor>
  const float* splat_blur(const float* in, int64_t Cp, ParFor par, Workspace& work) const {
    const int64_t D1 = d_ + 1;
    // row 0 of each buffer is an always-zero "absent vertex"; vertex v lives in row v + 1
    work.a.resize((m_ + 1) * Cp);
    work.b.resize((m_ + 1) * Cp);
    std::fill(work.a.begin(), work.a.begin() + Cp, 0.0f);
    std::fill(work.b.begin(), work.b.begin() + Cp, 0.0f);
    float* cur = work.a.data();
    float* next = work.b.data();
    if (scatter_chunks() > 1) {
      splat_scatter(in, cur, Cp, par, work);
    } else {
      const int64_t per_vertex = Cp * (n_ * D1 / std::max<int64_t>(m_, 1) + 1);
      par(0, m_, per_vertex, [&](int64_t begin, int64_t end) {
        for_blocks(Cp,
                   [&](auto nb, int64_t c0) { splat_block<nb()>(in, cur, Cp, c0, begin, end); });
      });
    }
    for (int j = 0; j < D1; ++j) {
      par(0, m_, 3 * Cp,
          [&](int64_t begin, int64_t end) { blur_rows(j, cur, next, Cp, begin, end); });
      std::swap(cur, next);
    }
    return cur;
  }

  // Slice of splat_blur's vertex values for points [begin, end): row i - begin of `out`
  // (Cp floats each) = alpha * sum_a w_a vals[vertex a of point i].
  void slice_rows(const float* vals, float* out, int64_t Cp, int64_t begin, int64_t end) const {
    for_blocks(Cp, [&](auto nb, int64_t c0) { slice_block<nb()>(vals, out, Cp, c0, begin, end); });
  }

  // Splat by scattering in point order (the input is read once, sequentially) into one vertex
  // buffer per fixed chunk of points, then summed chunk by chunk in order: the same bits for
  // any thread count. Used when vertices are few next to points (an image's bilateral lattice:
  // 250k pixels, ~10k vertices), where the CSR gather instead reads each input row d+1 times
  // from scattered places.
  int64_t scatter_chunks() const { return (m_ + 1) * 8 <= n_ ? 2 : 1; }

  template <class ParFor>
  void splat_scatter(const float* in, float* vals, int64_t Cp, ParFor par, Workspace& work) const {
    using simd::Vec8;
    const int64_t D1 = d_ + 1, K = scatter_chunks(), rows = (m_ + 1) * Cp;
    work.c.resize((K - 1) * rows);
    par(0, K, n_ / K * D1 * Cp, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        float* acc = k == 0 ? vals : work.c.data() + (k - 1) * rows;
        std::fill(acc, acc + rows, 0.0f);
        const int64_t i0 = n_ * k / K, i1 = n_ * (k + 1) / K;
        for (int64_t i = i0; i < i1; ++i) {
          const float s = input_scale_.empty() ? 1.0f : input_scale_[i];
          const float* src = in + i * Cp;
          for (int64_t a = 0; a < D1; ++a) {
            const Vec8 w = Vec8::broadcast(weight_[i * D1 + a] * s);
            float* dst = acc + (static_cast<int64_t>(vertex_[i * D1 + a]) + 1) * Cp;
            for (int64_t c = 0; c < Cp; c += 8) {
              fmadd(w, Vec8::load(src + c), Vec8::load(dst + c)).store(dst + c);
            }
          }
        }
      }
    });
    par(0, m_, K * Cp, [&](int64_t begin, int64_t end) {
      for (int64_t k = 1; k < K; ++k) {
        const float* part = work.c.data() + (k - 1) * rows;
        for (int64_t e = (begin + 1) * Cp; e < (end + 1) * Cp; e += 8) {
          (Vec8::load(vals + e) + Vec8::load(part + e)).store(vals + e);
        }
      }
    });
  }

  // The diagonal L_ii for all points: how much of point i's own value comes back to it. It is
  // alpha * sum_{a,b} w_a w_b B[v_a, v_b], where B[v, u] sums 0.5^(#moves) over the blur paths
  // from v to u (one move of +-1 or none per direction, directions d..0, all intermediate vertices
  // present). Subtracting it gives the paper's i != j messages exactly for the lattice operator.
  // Two vertices of a simplex differ by sum_{j in S} e_j for a direction set S read off the
  // point's rank permutation; B[v, v + sum_S e_j] depends only on (v, S) and is tabulated per
  // vertex for all 2^(d+1) sets when d+1 <= kMaxTabulated and the tables fit kMaxTableBytes.
  template <class ParFor>
  void self_weights(float* out, ParFor par) const {
    const int D1 = d_ + 1;
    const int64_t sets = int64_t{1} << D1;
    const bool tabulate = D1 <= kMaxTabulated &&
                          3 * m_ * sets * static_cast<int64_t>(sizeof(float)) <= kMaxTableBytes;
    std::vector<float> table;
    if (tabulate) table = blur_entries(par);
    par(0, n_, D1 * D1 * (tabulate ? 2 : D1), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int32_t* verts = vertex_.data() + i * D1;
        const float* w = weight_.data() + i * D1;
        // by_rank[r]: the direction bit of the coordinate with rank r; prefix[r]: OR of
        // by_rank[0 .. r-1], so every direction set is one XOR
        uint32_t by_rank[kMaxDim + 1], prefix[kMaxDim + 2];
        for (int k = 0; k < D1; ++k) by_rank[rank_[i * D1 + k]] = 1u << k;
        prefix[0] = 0;
        for (int r = 0; r < D1; ++r) prefix[r + 1] = prefix[r] | by_rank[r];
        double total = 0.0;
        for (int a = 0; a < D1; ++a) {
          double row = 0.0;
          for (int b = 0; b < D1; ++b) {
            const uint32_t set = direction_set(prefix, a, b);
            row += w[b] * (tabulate ? table[verts[a] * sets + set] : blur_entry(verts[a], set));
          }
          total += row * w[a];
        }
        out[i] = static_cast<float>(alpha_ * total);
      }
    });
  }

 private:
  // Adams et al.: elevate onto H_d, find the enclosing simplex (its remainder-0 vertex rem0
  // and the rank of each coordinate), barycentric weights. Independent per point.
  void locate(const float* f, int64_t i, int32_t* rem0) {
    const int d = d_, D1 = d + 1;
    float elevated[kMaxDim + 1], barycentric[kMaxDim + 2];
    int32_t rank[kMaxDim + 1];
    const float inv_d1 = 1.0f / D1;
    float sum = 0.0f;
    for (int j = d; j > 0; --j) {
      const float cf = f[j - 1] * elevate_scale_[j];
      elevated[j] = sum - j * cf;
      sum += cf;
    }
    elevated[0] = sum;
    // nearest remainder-0 lattice point
    int32_t rem_sum = 0;
    for (int k = 0; k < D1; ++k) {
      const float v = elevated[k] * inv_d1;
      const float up = std::ceil(v), down = std::floor(v);
      // the nearer multiple of D1 (down on a tie), in integer arithmetic: written as a choice
      // it compiles to a branch that mispredicts half the time (permutohedral_filter on a
      // 500x500 image's 5-D features: 107.6 -> 99.0 ms without it)
      const int32_t nearer_up = (up * D1 - elevated[k]) < (elevated[k] - down * D1);
      const int32_t lo = static_cast<int32_t>(down), hi = static_cast<int32_t>(up);
      const int32_t multiple = lo + ((hi - lo) & -nearer_up);  // hi - lo is 0 or 1
      rem0[k] = multiple * D1;
      rem_sum += multiple;  // the sum of rem0 / D1, without a division
    }
    // rank of each coordinate's differential, then move back onto the plane
    for (int k = 0; k < D1; ++k) rank[k] = 0;
    for (int k = 0; k < d; ++k) {
      const float dk = elevated[k] - rem0[k];
      for (int l = k + 1; l < D1; ++l) {  // branch-free: the outcome is a coin flip
        const int32_t less = dk < elevated[l] - rem0[l];
        rank[k] += less;
        rank[l] += 1 - less;
      }
    }
    for (int k = 0; k < D1; ++k) {
      rank[k] += rem_sum;
      if (rank[k] < 0) {
        rank[k] += D1;
        rem0[k] += D1;
      } else if (rank[k] > d) {
        rank[k] -= D1;
        rem0[k] -= D1;
      }
    }
    for (int k = 0; k < D1 + 1; ++k) barycentric[k] = 0.0f;
    for (int k = 0; k < D1; ++k) {
      const float v = (elevated[k] - rem0[k]) * inv_d1;
      barycentric[d - rank[k]] += v;
      barycentric[d - rank[k] + 1] -= v;
    }
    barycentric[0] += 1.0f + barycentric[D1];
    for (int r = 0; r < D1; ++r) {
      rank_[i * D1 + r] = static_cast<int8_t>(rank[r]);
      weight_[i * D1 + r] = barycentric[r];
    }
  }

  // Vertex ids in order of first insertion (pixel order), sequentially: the simplex vertices
  // are rem0 + the canonical simplex (remainder r) permuted by rank. A point in the same
  // simplex as the previous one (neighbouring pixels often are) reuses its ids unhashed.
  void insert_vertices(const int32_t* rem0_all) {
    const int d = d_, D1 = d + 1;
    int32_t key[kMaxDim + 1];
    for (int64_t i = 0; i < n_; ++i) {
      const int32_t* rem0 = rem0_all + i * D1;
      const int8_t* rank = rank_.data() + i * D1;
      int32_t* ids = vertex_.data() + i * D1;
      if (i > 0 && same(rem0, rem0 - D1, D1) && same(rank, rank - D1, D1)) {
        std::copy(ids - D1, ids, ids);
        continue;
      }
      for (int r = 0; r < D1; ++r) {
        for (int k = 0; k < d; ++k) key[k] = rem0[k] + (rank[k] <= d - r ? r : r - D1);
        ids[r] = table_.insert(key);
      }
    }
  }

  // Channel blocks of up to 4 vectors (32 labels), each kept in registers by the splat and
  // slice loops: fn(std::integral_constant<int, vectors>, first channel).
  template <class Fn>
  static void for_blocks(int64_t Cp, Fn fn) {
    for (int64_t c0 = 0; c0 < Cp; c0 += 32) {
      switch (std::min<int64_t>(4, (Cp - c0) / 8)) {
        case 4:
          fn(std::integral_constant<int, 4>{}, c0);
          break;
        case 3:
          fn(std::integral_constant<int, 3>{}, c0);
          break;
        case 2:
          fn(std::integral_constant<int, 2>{}, c0);
          break;
        default:
          fn(std::integral_constant<int, 1>{}, c0);
          break;
      }
    }
  }

  // Splat as a gather over the transposed splat matrix: vertex row v + 1 of `vals` gets
  // sum of w * in[point] over its entries (channels c0 .. c0 + 8 NB).
  template <int NB>
  void splat_block(const float* in, float* vals, int64_t Cp, int64_t c0, int64_t begin,
                   int64_t end) const {
    using simd::Vec8;
    for (int64_t v = begin; v < end; ++v) {
      Vec8 acc[NB];
      for (int u = 0; u < NB; ++u) acc[u] = Vec8::zero();
      for (int64_t e = splat_start_[v]; e < splat_start_[v + 1]; ++e) {
        const float* src = in + static_cast<int64_t>(splat_point_[e]) * Cp + c0;
        const Vec8 w = Vec8::broadcast(splat_weight_[e]);
        for (int u = 0; u < NB; ++u) acc[u] = fmadd(w, Vec8::load(src + 8 * u), acc[u]);
      }
      float* dst = vals + (v + 1) * Cp + c0;
      for (int u = 0; u < NB; ++u) acc[u].store(dst + 8 * u);
    }
  }

  // One blur direction j: next = cur + (cur[v + e_j] + cur[v - e_j]) / 2.
  void blur_rows(int j, const float* cur, float* next, int64_t Cp, int64_t begin,
                 int64_t end) const {
    using simd::Vec8;
    const int64_t D1 = d_ + 1;
    const Vec8 half = Vec8::broadcast(0.5f);
    for (int64_t v = begin; v < end; ++v) {
      const int32_t* nb = neighbor_.data() + (v * D1 + j) * 2;
      const float* self = cur + (v + 1) * Cp;
      const float* plus = cur + (static_cast<int64_t>(nb[0]) + 1) * Cp;
      const float* minus = cur + (static_cast<int64_t>(nb[1]) + 1) * Cp;
      float* dst = next + (v + 1) * Cp;
      for (int64_t c = 0; c < Cp; c += 8) {
        fmadd(half, Vec8::load(plus + c) + Vec8::load(minus + c), Vec8::load(self + c))
            .store(dst + c);
      }
    }
  }

  // Slice: out[i - begin] = alpha * sum_a w_a vals[vertex a of i] (channels c0 .. c0 + 8 NB).
  template <int NB>
  void slice_block(const float* vals, float* out, int64_t Cp, int64_t c0, int64_t begin,
                   int64_t end) const {
    using simd::Vec8;
    const int64_t D1 = d_ + 1;
    const Vec8 alpha = Vec8::broadcast(alpha_);
    for (int64_t i = begin; i < end; ++i) {
      Vec8 acc[NB];
      for (int u = 0; u < NB; ++u) acc[u] = Vec8::zero();
      for (int64_t a = 0; a < D1; ++a) {
        const Vec8 w = Vec8::broadcast(weight_[i * D1 + a]);
        const float* src = vals + (static_cast<int64_t>(vertex_[i * D1 + a]) + 1) * Cp + c0;
        for (int u = 0; u < NB; ++u) acc[u] = fmadd(w, Vec8::load(src + 8 * u), acc[u]);
      }
      float* dst = out + (i - begin) * Cp + c0;
      for (int u = 0; u < NB; ++u) (alpha * acc[u]).store(dst + 8 * u);
    }
  }

  // neighbor_[(v * (d+1) + j) * 2 + {0, 1}] (vertex-major: one cache line per vertex) = id of v +
  // e_j / v - e_j, e_j = (d+1) delta_j - 1.
  template <class ParFor>
  void build_neighbors(ParFor par) {
    const int d = d_, D1 = d + 1;
    neighbor_.resize(static_cast<size_t>(D1) * m_ * 2);
    par(0, m_, 4 * D1 * D1, [&](int64_t begin, int64_t end) {
      int32_t plus[kMaxDim + 1], minus[kMaxDim + 1];
      for (int64_t v = begin; v < end; ++v) {
        const int32_t* key = table_.key(v);
        for (int j = 0; j < D1; ++j) {
          for (int k = 0; k < d; ++k) {
            plus[k] = key[k] - 1;
            minus[k] = key[k] + 1;
          }
          if (j < d) {  // coordinate d is implicit (minus the sum of the others)
            plus[j] = key[j] + d;
            minus[j] = key[j] - d;
          }
          neighbor_[(v * D1 + j) * 2] = table_.find(plus);
          neighbor_[(v * D1 + j) * 2 + 1] = table_.find(minus);
        }
      }
    });
  }

  // Transpose of the splat matrix (CSR by vertex), entries in point order: splatting becomes a
  // deterministic gather that parallelises over vertices.
  void build_splat_gather() {
    const int64_t D1 = d_ + 1, entries = n_ * D1;
    splat_start_.assign(m_ + 1, 0);
    for (int64_t e = 0; e < entries; ++e) ++splat_start_[vertex_[e] + 1];
    for (int64_t v = 0; v < m_; ++v) splat_start_[v + 1] += splat_start_[v];
    std::vector<int64_t> fill(splat_start_.begin(), splat_start_.end() - 1);
    splat_point_.resize(entries);
    splat_weight_.resize(entries);
    for (int64_t i = 0; i < n_; ++i) {
      for (int64_t a = 0; a < D1; ++a) {
        const int64_t slot = fill[vertex_[i * D1 + a]]++;
        splat_point_[slot] = static_cast<int32_t>(i);
        splat_weight_[slot] = weight_[i * D1 + a];
      }
    }
  }

  // S with v_b = v_a + sum_{j in S} e_j for vertices a, b of a point's simplex. Vertex r is
  // rem0 + (r, ..., r) - (d+1) [rank_k > d - r], so for a < b the coordinates with rank in
  // (d-b, d-a] move by -e_j (S is their complement, the e_j sum to zero) and for a > b those with
  // rank in (d-a, d-b] move by +e_j.
  uint32_t direction_set(const uint32_t* prefix, int a, int b) const {
    const int d = d_;
    const uint32_t moved = prefix[d - a + 1] ^ prefix[d - b + 1];  // ranks between, either order
    return a < b ? ~moved & ((1u << (d + 1)) - 1) : moved;
  }

  // blur_entry(v, S) for every vertex v and direction set S (table[v * 2^(d+1) + S]), from the
  // walks of every vertex and set tabulated by dynamic programming over the sets in increasing
  // order: a walk's first move is along the highest direction j of its set, so
  // walk(v, S) = walk(v's neighbour along j, S - {j}) / 2, a set already done -- one lookup per
  // entry instead of a chain of up to d + 1 dependent ones. Walks are stored set-major, so that
  // set's lookups for all vertices fall in one row of m floats. Exact: every walk is 0 or a
  // power of 1/2, every entry a sum of at most three of them.
  template <class ParFor>
  std::vector<float> blur_entries(ParFor par) const {
    const int64_t D1 = d_ + 1, sets = int64_t{1} << D1, all = sets - 1;
    std::vector<float> plus(sets * m_), minus(sets * m_), table(m_ * sets);
    std::fill(plus.begin(), plus.begin() + m_, 1.0f);  // the empty walk
    std::fill(minus.begin(), minus.begin() + m_, 1.0f);
    for (int64_t set = 1; set < sets; ++set) {
      const int top = std::bit_width(static_cast<uint32_t>(set)) - 1;
      const float* plus_rest = plus.data() + (set - (int64_t{1} << top)) * m_;
      const float* minus_rest = minus.data() + (set - (int64_t{1} << top)) * m_;
      par(0, m_, 8, [&](int64_t begin, int64_t end) {
        for (int64_t v = begin; v < end; ++v) {
          const int32_t* nb = neighbor_.data() + (v * D1 + top) * 2;
          plus[set * m_ + v] = nb[0] < 0 ? 0.0f : 0.5f * plus_rest[nb[0]];
          minus[set * m_ + v] = nb[1] < 0 ? 0.0f : 0.5f * minus_rest[nb[1]];
        }
      });
    }
    par(0, m_, 4 * sets, [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v) {
        for (int64_t set = 0; set < sets; ++set) {  // blur_entry(v, set), term by term
          float entry = plus[set * m_ + v] + minus[(~set & all) * m_ + v];
          if (set == 0) entry += plus[all * m_ + v];
          table[v * sets + set] = entry;
        }
      }
    });
    return table;
  }

  // B[v, v + sum_{j in S} e_j]: the paths with moves +e_j (j in S), or -e_j (j not in S); for
  // S empty also +e_j for all j.
  double blur_entry(int32_t v, uint32_t set) const {
    double total = walk(v, set, +1) + walk(v, ~set & ((1u << (d_ + 1)) - 1), -1);
    if (set == 0) total += walk(v, (1u << (d_ + 1)) - 1, +1);
    return total;
  }

  // Weight 0.5^|moves| of the blur path from v moving `sign` e_j for j in `moves`, directions
  // d..0 (the order B = B_d ... B_0 applies them); 0 when it steps onto an absent vertex.
  double walk(int32_t v, uint32_t moves, int sign) const {
    double w = 1.0;
    int32_t cur = v;
    for (int j = d_; j >= 0; --j) {
      if (!(moves >> j & 1u)) continue;
      cur = neighbor_[(static_cast<int64_t>(cur) * (d_ + 1) + j) * 2 + (sign > 0 ? 0 : 1)];
      if (cur < 0) return 0.0;
      w *= 0.5;
    }
    return w;
  }

  int d_;
  float elevate_scale_[kMaxDim + 1] = {};
  int64_t n_, m_ = 0;
  float alpha_ = 1.0f;
  KeyTable table_;
  std::vector<int32_t> vertex_;       // n x (d+1) vertex ids of each point's simplex
  std::vector<float> weight_;         // n x (d+1) barycentric weights
  std::vector<int8_t> rank_;          // n x (d+1) rank of each elevated coordinate's remainder
  std::vector<int32_t> neighbor_;     // m x (d+1) x 2
  std::vector<float> input_scale_;    // s of scale_inputs (empty: none)
  std::vector<int64_t> splat_start_;  // CSR by vertex over the splat entries, in point order:
  std::vector<int32_t> splat_point_;  //   the point of each entry
  std::vector<float> splat_weight_;   //   and its barycentric weight
};

}  // namespace permutohedral
}  // namespace fcnfast

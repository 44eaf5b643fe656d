// C++ kernels of the CPU path, built by loopserve_kernels/cpu_kernels.py on first use.
//
// paged_decode: paged decode attention, one query row per sequence, K/V read in place through
// the block table. The torch twin gathers every sequence's blocks into a padded copy, copies
// it again heads-major and runs two batched matmuls: four passes over K/V. This reads each
// cached K/V row once (bf16 caches: scores by AVX-512 BF16 dot products, see decode_bf16;
// others converted to float32 16 lanes at a time); work is split over (sequence, KV head) or
// whole-sequence items with ATen's parallel_for (torch's intra-op threads: the extension is an
// OpenMP build, or parallel_for, an inline template, would run on one thread).
//
// row_max_lse: per row of logits, the first argmax, the max and the log-sum-exp in two
// vectorised passes over the row (plus a scan to the max's first index), reading bf16 in place. The greedy token, its logprob (max - lse) and the
// exit confidence exp(max - lse) all follow, where torch would upcast the [R, V] logits to a
// float32 copy and pass over it four more times (max, sub, exp, sum) plus once for argmax.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t LANES = 16;  // one AVX-512 register of float32

template <typename T>
inline float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// bf16 -> float32 as a shift the compiler can vectorise
inline float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  return __builtin_bit_cast(float, bits);
}

// exp(x) that the compiler vectorises (libm's expf is a scalar call): Cephes' expf — range
// reduction by ln 2 in two parts, a degree-5 polynomial, the exponent set by bits — within
// 2 ulp on [-87.3, 88.7]; 0 below (so an -inf logit or score gives 0, as exp would). Written
// with ternaries and builtins: GCC 12 leaves a loop scalar around std::min/max and memcpy.
inline float vexp(float x) {
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.7f ? 88.7f : xc;
  const float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return x < -87.3f ? 0.0f : y * scale;
}

// 16 float32 lanes as a GCC vector: one AVX-512 register, two AVX2 ones where -march has no
// AVX-512 (the compiler splits it), so the kernels below need intrinsics only for speed.
typedef float vf16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint16_t vh16 __attribute__((vector_size(32)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

inline vf16 load16(const float* p) {
  vf16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, vf16 v) { __builtin_memcpy(p, &v, sizeof v); }

inline vf16 load16(const c10::BFloat16* p) {  // the bf16 -> float32 shift, 16 at a time
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<vf16>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  vh16 h;
  __builtin_memcpy(&h, p, sizeof h);
  return reinterpret_cast<vf16>(__builtin_convertvector(h, vu16) << 16);
#endif
}

template <typename T>  // float16 and float64: lane by lane
inline vf16 load16(const T* p) {
  vf16 v;
  for (int j = 0; j < 16; ++j) v[j] = static_cast<float>(p[j]);
  return v;
}

typedef int32_t vi16 __attribute__((vector_size(64)));

inline vf16 splat16(float v) { return vf16{} + v; }

// vexp on 16 lanes at once: the same Cephes range reduction and polynomial, in registers
// (AVX-512 intrinsics where the build has them; elsewhere GCC vector code, two AVX2 registers).
inline vf16 vexp16(vf16 x) {
#if defined(__AVX512F__)
  const __m512 xv = (__m512)x;
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(xv, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
  vf16 xc = x < -87.3f ? splat16(-87.3f) : x;
  xc = xc > 88.7f ? splat16(88.7f) : xc;
  const vf16 t = xc * 1.44269504088896341f + 0.5f;
  vf16 n = __builtin_convertvector(__builtin_convertvector(t, vi16), vf16);  // toward zero
  n = n > t ? n - 1.0f : n;                                                   // floor
#endif
  vf16 r = (vf16)xc - (vf16)n * 0.693359375f;
  r = r + (vf16)n * 2.12194440e-4f;
  vf16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf16 y = p * r * r + r + 1.0f;
#if defined(__AVX512F__)
  const __m512i bits = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 out = _mm512_mul_ps((__m512)y, _mm512_castsi512_ps(bits));
  const __mmask16 under = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  return (vf16)_mm512_maskz_mov_ps(static_cast<__mmask16>(~under), out);
#else
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  const vf16 out = y * (vf16)bits;
  return x < -87.3f ? vf16{} : out;
#endif
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// vexp on 8 lanes in AVX2 intrinsics: GCC lowers vexp16's 16-lane vector code (its int
// conversions and selects) to scalar moves on AVX2, which made row_max_lse 2-3x slower than
// torch's logsumexp there.
inline __m256 vexp8(__m256 x) {
  const __m256 xc =
      _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(1.9875691500e-4f), _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 out = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ), out);
}
#endif

inline float hsum(vf16 v) {
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// r[j] = the sum of v[j]'s lanes, for 16 vectors at once: four rounds of pairwise
// shuffle-and-add (15 of them in all) where 16 separate reductions would take 60.
inline vf16 hsum16(const vf16* v) {
  vf16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

inline float max_of(const float* x, int64_t n) {
  float part[LANES];
  for (int64_t j = 0; j < LANES; ++j) part[j] = -std::numeric_limits<float>::infinity();
  const int64_t body = n - n % LANES;
  for (int64_t i = 0; i < body; i += LANES)
    for (int64_t j = 0; j < LANES; ++j) part[j] = x[i + j] > part[j] ? x[i + j] : part[j];
  for (int64_t i = body; i < n; ++i) part[0] = x[i] > part[0] ? x[i] : part[0];
  float top = part[0];
  for (int64_t j = 1; j < LANES; ++j) top = part[j] > top ? part[j] : top;
  return top;
}

// x <- exp(x - top) in place; returns the sum
inline float exp_sum_(float* x, int64_t n, float top) {
  float part[LANES] = {};
  const int64_t body = n - n % LANES;
  for (int64_t i = 0; i < body; i += LANES)
    for (int64_t j = 0; j < LANES; ++j) {
      const float e = vexp(x[i + j] - top);
      x[i + j] = e;
      part[j] += e;
    }
  float total = 0.0f;
  for (int64_t j = 0; j < LANES; ++j) total += part[j];
  for (int64_t i = body; i < n; ++i) {
    x[i] = vexp(x[i] - top);
    total += x[i];
  }
  return total;
}

// One (sequence, KV head) of paged decode attention, `dim` a multiple of 16. K rows are
// converted to float32 16 keys at a time; each query head's 16 dot products of a block are
// reduced together (hsum16). V is read once per 16-lane column chunk with G heads'
// accumulators in registers (G a compile-time count, so the loops over heads unroll).
struct DecodeItem {
  const float* qf;   // [group, dim] query heads, scaled
  const int64_t* slots;  // [len] cache slot of each key seen
  int64_t len, group, dim, row;
  float* scores;  // [group, len]
  float* kf;      // [16, dim] scratch
  float* acc;     // [group, dim] output, float32
};

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// r[j] = the sum of v[j]'s lanes for 8 AVX2 vectors: three rounds of pairwise adds. (The
// 16-lane hsum16 below has no AVX2 form: GCC lowers its 512-bit two-input shuffles to scalar
// moves, ~800 cycles a key.)
inline __m256 hsum8(const __m256* v) {
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// Scores on AVX2: 8 keys at a time, each query head's 8 dot products in 8 accumulators
// reduced together; float32 caches are read in place, others converted to float32 first.
template <typename T>
void item_scores(const DecodeItem& it, const T* kc) {
  const int64_t dim = it.dim, blocks = it.len - it.len % 8;
  const float* keys[8];
  auto gather = [&](int64_t t0, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      const T* kp = kc + it.slots[t0 + j] * it.row;
      if constexpr (std::is_same_v<T, float>) {
        keys[j] = kp;
      } else {
        for (int64_t c = 0; c < dim; c += 16) store16(it.kf + j * dim + c, load16(kp + c));
        keys[j] = it.kf + j * dim;
      }
    }
  };
  for (int64_t t0 = 0; t0 < blocks; t0 += 8) {
    for (int64_t j = t0 + 8; j < std::min(t0 + 16, it.len); ++j) {
      const char* next = reinterpret_cast<const char*>(kc + it.slots[j] * it.row);
      for (int64_t b = 0; b < dim * int64_t(sizeof(T)); b += 64) __builtin_prefetch(next + b);
    }
    gather(t0, 8);
    for (int64_t h = 0; h < it.group; ++h) {
      const float* qh = it.qf + h * dim;
      __m256 part[8];
      for (int j = 0; j < 8; ++j) part[j] = _mm256_setzero_ps();
      for (int64_t c = 0; c < dim; c += 8) {
        const __m256 qc = _mm256_loadu_ps(qh + c);
        for (int j = 0; j < 8; ++j) part[j] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(keys[j] + c), part[j]);
      }
      _mm256_storeu_ps(it.scores + h * it.len + t0, hsum8(part));
    }
  }
  for (int64_t t = blocks; t < it.len; ++t) {
    gather(t, 1);
    for (int64_t h = 0; h < it.group; ++h) {
      vf16 part = {};
      for (int64_t c = 0; c < dim; c += 16) part += load16(it.qf + h * dim + c) * load16(keys[0] + c);
      it.scores[h * it.len + t] = hsum(part);
    }
  }
}
#else
template <typename T>
void item_scores(const DecodeItem& it, const T* kc) {
  const int64_t chunks = it.dim / 16;
  const int64_t blocks = it.len - it.len % 16;
  for (int64_t t0 = 0; t0 < blocks; t0 += 16) {
    for (int64_t j = t0 + 16; j < std::min(t0 + 32, it.len); ++j) {
      const char* next = reinterpret_cast<const char*>(kc + it.slots[j] * it.row);
      for (int64_t b = 0; b < it.dim * int64_t(sizeof(T)); b += 64) __builtin_prefetch(next + b);
    }
    for (int64_t j = 0; j < 16; ++j) {
      const T* kp = kc + it.slots[t0 + j] * it.row;
      for (int64_t c = 0; c < chunks; ++c) store16(it.kf + j * it.dim + 16 * c, load16(kp + 16 * c));
    }
    for (int64_t h = 0; h < it.group; ++h) {
      const float* qh = it.qf + h * it.dim;
      vf16 part[16] = {};
      for (int64_t c = 0; c < chunks; ++c) {
        const vf16 qc = load16(qh + 16 * c);
        for (int64_t j = 0; j < 16; ++j) part[j] += qc * load16(it.kf + j * it.dim + 16 * c);
      }
      store16(it.scores + h * it.len + t0, hsum16(part));
    }
  }
  for (int64_t t = blocks; t < it.len; ++t) {
    const T* kp = kc + it.slots[t] * it.row;
    for (int64_t c = 0; c < chunks; ++c) store16(it.kf + 16 * c, load16(kp + 16 * c));
    for (int64_t h = 0; h < it.group; ++h) {
      vf16 part = {};
      for (int64_t c = 0; c < chunks; ++c)
        part += load16(it.qf + h * it.dim + 16 * c) * load16(it.kf + 16 * c);
      it.scores[h * it.len + t] = hsum(part);
    }
  }
}

#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
template <typename T>
inline __m256 load8(const T* p) {  // other dtypes (float64): converted one by one
  alignas(32) float f[8];
  for (int j = 0; j < 8; ++j) f[j] = static_cast<float>(p[j]);
  return _mm256_load_ps(f);
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// V on AVX2: columns [c0, c0 + 8 W) of G heads' outputs, G·W accumulators in registers
// (at most 12 of the 16), one pass over the keys. (The 16-lane form spills them to the stack.)
template <int G, int W, typename T>
void item_values(const DecodeItem& it, const T* vc, int64_t h0, int64_t c0) {
  __m256 a[G][W];
  for (int h = 0; h < G; ++h)
    for (int w = 0; w < W; ++w) a[h][w] = _mm256_setzero_ps();
  for (int64_t t = 0; t < it.len; ++t) {
    const T* vp = vc + it.slots[t] * it.row + c0;
    if (t + 8 < it.len) __builtin_prefetch(vc + it.slots[t + 8] * it.row + c0);
    __m256 p[G];  // G + 1 + G·W registers: 16 at most
    for (int h = 0; h < G; ++h) p[h] = _mm256_broadcast_ss(it.scores + (h0 + h) * it.len + t);
    for (int w = 0; w < W; ++w) {
      const __m256 v = load8(vp + 8 * w);
      for (int h = 0; h < G; ++h) a[h][w] = _mm256_fmadd_ps(p[h], v, a[h][w]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(it.acc + (h0 + h) * it.dim + c0 + 8 * w, a[h][w]);
}

template <int W, typename T>
void item_values_cols(const DecodeItem& it, const T* vc, int64_t c0) {
  for (int64_t h0 = 0; h0 < it.group; h0 += 3) {
    switch (std::min<int64_t>(it.group - h0, 3)) {
      case 1: item_values<1, W>(it, vc, h0, c0); break;
      case 2: item_values<2, W>(it, vc, h0, c0); break;
      default: item_values<3, W>(it, vc, h0, c0); break;
    }
  }
}

template <typename T>
void item_values(const DecodeItem& it, const T* vc) {
  int64_t c0 = 0;
  for (; c0 + 32 <= it.dim; c0 += 32) item_values_cols<4>(it, vc, c0);
  if (c0 < it.dim) item_values_cols<2>(it, vc, c0);  // dim is a multiple of 16
}
#else
template <int G, typename T>
void item_values(const DecodeItem& it, const T* vc, int64_t h0) {
  for (int64_t c = 0; c < it.dim; c += 16) {
    vf16 a[G] = {};
    for (int64_t t = 0; t < it.len; ++t) {
      if (t + 8 < it.len) __builtin_prefetch(vc + it.slots[t + 8] * it.row + c);
      const vf16 v = load16(vc + it.slots[t] * it.row + c);
      for (int h = 0; h < G; ++h) a[h] += it.scores[(h0 + h) * it.len + t] * v;
    }
    for (int h = 0; h < G; ++h) store16(it.acc + (h0 + h) * it.dim + c, a[h]);
  }
}

template <typename T>
void item_values(const DecodeItem& it, const T* vc) {
  for (int64_t h0 = 0; h0 < it.group; h0 += 4) {
    switch (std::min<int64_t>(it.group - h0, 4)) {
      case 1: item_values<1>(it, vc, h0); break;
      case 2: item_values<2>(it, vc, h0); break;
      case 3: item_values<3>(it, vc, h0); break;
      default: item_values<4>(it, vc, h0); break;
    }
  }
}
#endif

// The cache slots of the keys sequence s's decode row sees, in order: its whole context, or
// the last `windows[s]` positions [ctx - window, ctx) of it. Returns their count.
inline int64_t seen_slots(const int32_t* tables, int64_t width, const int32_t* lens,
                          const int32_t* windows, int64_t block_size, int64_t s,
                          std::vector<int64_t>& slots) {
  const int64_t ctx = lens[s];
  const int64_t window = windows != nullptr ? windows[s] : 0;
  const int64_t first = window > 0 && window < ctx ? ctx - window : 0;
  const int64_t len = ctx - first;
  const int32_t* table = tables + s * width;
  slots.resize(len);
  for (int64_t t = 0, b = first / block_size, o = first % block_size; t < len; ++t) {
    slots[t] = static_cast<int64_t>(table[b]) * block_size + o;
    if (++o == block_size) o = 0, ++b;
  }
  return len;
}

#if defined(__AVX512BF16__)
// bf16 caches with head_dim a multiple of 32: scores by AVX-512 BF16 dot products straight
// from the cached K rows (no float32 copy of K; q unscaled, exact bf16 products summed in
// float32, the scale applied to the sum), and a work item spans a sequence's KV heads when
// there are enough sequences for the threads, so each 16-key group reads whole cache rows
// (every KV head side by side) and fetches the next group's K and this group's V meanwhile.
// A head's arithmetic is the same whatever the item, so results do not depend on the split.
template <int C>  // head_dim / 32
void item_scores_bf16(const uint16_t* q, const uint16_t* kc, const int64_t* slots, int64_t len,
                      int64_t kh0, int64_t kh1, int64_t group, int64_t row, float scale,
                      const uint16_t* vc, float* scores) {
  constexpr int64_t D = 32 * C;
  const int64_t bytes = (kh1 - kh0) * D * 2;
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - t0);
    for (int64_t j = t0 + 16; j < std::min(t0 + 32, len); ++j) {
      const char* next = reinterpret_cast<const char*>(kc + slots[j] * row + kh0 * D);
      for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
    for (int64_t j = t0; j < t0 + n; ++j) {
      const char* later = reinterpret_cast<const char*>(vc + slots[j] * row + kh0 * D);
      for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(later + b, _MM_HINT_T1);
    }
    const uint16_t* keys[16];
    for (int64_t j = 0; j < 16; ++j) keys[j] = kc + slots[t0 + std::min(j, n - 1)] * row;
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kh * group + g;
        __m512bh qv[C];
        for (int c = 0; c < C; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + h * D + 32 * c);
        vf16 part[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
          __m512 acc = _mm512_setzero_ps();
          for (int c = 0; c < C; ++c)
            acc = _mm512_dpbf16_ps(
                acc, (__m512bh)_mm512_loadu_si512(keys[j] + kh * D + 32 * c), qv[c]);
          part[j] = (vf16)acc;
        }
        const vf16 sums = hsum16(part) * scale;
        float* out = scores + h * len + t0;
        if (n == 16) {
          store16(out, sums);
        } else {
          for (int64_t j = 0; j < n; ++j) out[j] = sums[j];
        }
      }
    }
  }
}

template <int C>
void decode_bf16(const uint16_t* q, const uint16_t* kc, const uint16_t* vc,
                 const int32_t* tables, const int32_t* lens, const int64_t* rows,
                 const int32_t* windows, c10::BFloat16* out, int64_t num_seqs, int64_t width,
                 int64_t heads_q, int64_t heads_kv, int64_t block_size, int64_t q_stride,
                 int64_t out_stride, float scale) {
  constexpr int64_t D = 32 * C;
  const int64_t group = heads_q / heads_kv, row = heads_kv * D;
  // whole sequences as items once there are two per thread; else (sequence, KV head)
  const int64_t span = num_seqs >= 2 * at::get_num_threads() ? heads_kv : 1;
  const int64_t parts = heads_kv / span;
  at::parallel_for(0, num_seqs * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(group * D), scores;
    std::vector<int64_t> slots;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / parts, kh0 = item % parts * span, kh1 = kh0 + span;
      const int64_t len = seen_slots(tables, width, lens, windows, block_size, s, slots);
      scores.resize(heads_q * len);
      const uint16_t* qs = q + rows[s] * q_stride;
      item_scores_bf16<C>(qs, kc, slots.data(), len, kh0, kh1, group, row, scale, vc,
                          scores.data());
      for (int64_t h = kh0 * group; h < kh1 * group; ++h) {
        float* sh = scores.data() + h * len;
        const float inv = 1.0f / exp_sum_(sh, len, max_of(sh, len));
        for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
      }
      for (int64_t kh = kh0; kh < kh1; ++kh) {
        const DecodeItem it{nullptr, slots.data(), len, group, D, row,
                            scores.data() + kh * group * len, nullptr, acc.data()};
        item_values(it, reinterpret_cast<const c10::BFloat16*>(vc) + kh * D);
        c10::BFloat16* os = out + rows[s] * out_stride + kh * group * D;
        for (int64_t j = 0; j < group * D; ++j) os[j] = static_cast<c10::BFloat16>(acc[j]);
      }
    }
  });
}
#endif

// Work items are (sequence, KV head) pairs split over torch's intra-op threads, so one
// sequence still uses every thread; an item's `group` query heads read each of its K and V
// rows once.
template <typename T>
void decode(const T* q, const T* kc, const T* vc, const int32_t* tables, const int32_t* lens,
            const int64_t* rows, const int32_t* windows, T* out, int64_t num_seqs, int64_t width,
            int64_t heads_q, int64_t heads_kv, int64_t dim, int64_t block_size, int64_t q_stride,
            int64_t out_stride, float scale) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const auto* qb = reinterpret_cast<const uint16_t*>(q);
    const auto* kb = reinterpret_cast<const uint16_t*>(kc);
    const auto* vb = reinterpret_cast<const uint16_t*>(vc);
#define LOOPSERVE_DECODE_BF16(C)                                                         \
  return decode_bf16<C>(qb, kb, vb, tables, lens, rows, windows, out, num_seqs, width,   \
                        heads_q, heads_kv, block_size, q_stride, out_stride, scale)
    switch (dim) {
      case 32: LOOPSERVE_DECODE_BF16(1);
      case 64: LOOPSERVE_DECODE_BF16(2);
      case 128: LOOPSERVE_DECODE_BF16(4);
      case 256: LOOPSERVE_DECODE_BF16(8);
      default: break;
    }
#undef LOOPSERVE_DECODE_BF16
  }
#endif
  const int64_t group = heads_q / heads_kv;
  const int64_t row = heads_kv * dim;  // one token's K (or V) row in the cache, all KV heads
  at::parallel_for(0, num_seqs * heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), kf(16 * dim), scores;
    std::vector<int64_t> slots;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / heads_kv, kh = item % heads_kv;
      const int64_t len = seen_slots(tables, width, lens, windows, block_size, s, slots);
      const T* qs = q + rows[s] * q_stride + kh * group * dim;
      for (int64_t j = 0; j < group * dim; ++j) qf[j] = load(qs, j) * scale;
      scores.resize(group * len);
      const DecodeItem it{qf.data(), slots.data(), len, group, dim, row,
                          scores.data(), kf.data(), acc.data()};
      item_scores(it, kc + kh * dim);
      for (int64_t h = 0; h < group; ++h) {
        float* sh = scores.data() + h * len;
        const float inv = 1.0f / exp_sum_(sh, len, max_of(sh, len));
        for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
      }
      item_values(it, vc + kh * dim);
      T* os = out + rows[s] * out_stride + kh * group * dim;
      for (int64_t j = 0; j < group * dim; ++j) os[j] = static_cast<T>(acc[j]);
    }
  });
}

// q, out: [T, Hq, D] (rows contiguous); k_cache, v_cache: [blocks, block_size, Hkv, D];
// block_tables: [S, W] int32; context_lens: [S] int32 (>= 1); rows: [S] int64 query rows.
void paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache,
                  const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                  const torch::Tensor& context_lens, const torch::Tensor& rows,
                  const torch::Tensor& windows, torch::Tensor& out, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [T, Hq, D]");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q rows must be contiguous");
  TORCH_CHECK(out.stride(2) == 1 && out.stride(1) == out.size(2), "out rows must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, out and the caches must share one dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.is_contiguous(),
              "block_tables must be contiguous int32");
  TORCH_CHECK(context_lens.scalar_type() == torch::kInt32 && rows.scalar_type() == torch::kInt64,
              "context_lens must be int32 and rows int64");
  TORCH_CHECK(windows.scalar_type() == torch::kInt32 && windows.is_contiguous() &&
                  (windows.numel() == 0 || windows.numel() == block_tables.size(0)),
              "windows must be contiguous int32, one per sequence or none");
  const int64_t heads_q = q.size(1), dim = q.size(2), heads_kv = k_cache.size(2);
  TORCH_CHECK(heads_q % heads_kv == 0 && k_cache.size(3) == dim, "head shapes do not match");
  TORCH_CHECK(dim % 16 == 0, "head_dim must be a multiple of 16, got ", dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
        decode<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                         v_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                         context_lens.data_ptr<int32_t>(), rows.data_ptr<int64_t>(),
                         windows.numel() ? windows.data_ptr<int32_t>() : nullptr,
                         out.data_ptr<scalar_t>(), block_tables.size(0), block_tables.size(1),
                         heads_q, heads_kv, dim, k_cache.size(1), q.stride(0), out.stride(0),
                         static_cast<float>(scale));
      });
}

// Prefill chunks (sequences with several query rows) of a paged attention call: each gathers
// its K/V through its table and runs causal-offset SDPA (GQA by repeating heads) within its
// sliding window if it has one: the ops of the torch twin's `_prefill_chunks`, in order, so
// the Python layer and the one-call layer give the same bits. q, out: [T, Hq, D];
// block_tables [S, W], query_start_loc [S + 1], context_lens [S] int32; windows [S] int32
// or empty; chunks: int64 indices of the chunk sequences.
void prefill_chunks(const torch::Tensor& q, const torch::Tensor& k_cache,
                    const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                    const torch::Tensor& query_start_loc, const torch::Tensor& context_lens,
                    const torch::Tensor& windows, const torch::Tensor& chunks, torch::Tensor& out,
                    double scale) {
  TORCH_CHECK(chunks.scalar_type() == at::kLong && chunks.dim() == 1, "chunks must be int64 [C]");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "query_start_loc and context_lens must be int32");
  const int64_t block_size = k_cache.size(1), group = q.size(1) / k_cache.size(2);
  const auto* qsl = query_start_loc.data_ptr<int32_t>();
  const auto* ctx = context_lens.data_ptr<int32_t>();
  const auto* chunk = chunks.data_ptr<int64_t>();
  const int32_t* wins = windows.numel() ? windows.data_ptr<int32_t>() : nullptr;
  for (int64_t c = 0; c < chunks.size(0); ++c) {
    const int64_t s = chunk[c], begin = qsl[s], q_len = qsl[s + 1] - qsl[s], length = ctx[s];
    const torch::Tensor q_s = q.narrow(0, begin, q_len).transpose(0, 1);  // [Hq, q_len, D]
    const torch::Tensor blocks =
        block_tables[s].narrow(0, 0, (length + block_size - 1) / block_size).to(at::kLong);
    const auto gather = [&](const torch::Tensor& cache) {  // [Hkv, L, D] -> [Hq, L, D]
      const torch::Tensor t =
          cache.index_select(0, blocks).flatten(0, 1).narrow(0, 0, length).transpose(0, 1);
      return t.repeat_interleave(group, 0).to(q.scalar_type());
    };
    const torch::Tensor k = gather(k_cache), v = gather(v_cache);
    const auto opts = torch::TensorOptions().dtype(at::kLong).device(q.device());
    const torch::Tensor q_pos = torch::arange(length - q_len, length, opts);
    const torch::Tensor back = q_pos.unsqueeze(1) - torch::arange(length, opts).unsqueeze(0);
    torch::Tensor mask = back >= 0;
    const int64_t window = wins != nullptr ? wins[s] : 0;
    if (window) mask &= back < window;
    const torch::Tensor o = at::scaled_dot_product_attention(
        q_s.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask, 0.0, false, scale);
    out.narrow(0, begin, q_len).copy_(o[0].transpose(0, 1));
  }
}

template <typename T>
void max_lse(const T* logits, int64_t rows, int64_t vocab, int64_t stride, int64_t* argmax,
             float* top, float* lse) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = logits + r * stride;
      // LANES independent partial results: a loop the compiler vectorises without being
      // allowed to reassociate (no -ffast-math); GCC 12 leaves `omp simd reduction` scalar here
      float part[LANES];
      int64_t first[LANES];  // per lane: the first index of its max
      for (int64_t j = 0; j < LANES; ++j) {
        part[j] = -std::numeric_limits<float>::infinity();
        first[j] = j;
      }
      const int64_t body = vocab - vocab % LANES;
      {  // whole registers: compare, keep the larger and its index per lane
#if defined(__AVX512F__)
        __m512 lanes = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i where = index;
        const __m512i step = _mm512_set1_epi32(LANES);
        for (int64_t i = 0; i < body; i += LANES, index = _mm512_add_epi32(index, step)) {
          const __m512 v = (__m512)load16(x + i);
          const __mmask16 more = _mm512_cmp_ps_mask(v, lanes, _CMP_GT_OQ);
          lanes = _mm512_mask_mov_ps(lanes, more, v);
          where = _mm512_mask_mov_epi32(where, more, index);
        }
        alignas(64) int32_t w[LANES];
        _mm512_storeu_ps(part, lanes);
        _mm512_store_si512(w, where);
#elif defined(__AVX2__) && defined(__FMA__)
        // lanes 0-7 and 8-15 of the 16 as two registers each, so lane j still holds the
        // indices = j mod 16 and the result is the AVX-512 path's
        __m256 lanes[2] = {_mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                           _mm256_set1_ps(-std::numeric_limits<float>::infinity())};
        __m256i index[2] = {_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                            _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)};
        __m256i where[2] = {index[0], index[1]};
        const __m256i step = _mm256_set1_epi32(LANES);
        for (int64_t i = 0; i < body; i += LANES) {
          for (int h = 0; h < 2; ++h) {
            const __m256 v = load8(x + i + 8 * h);
            const __m256 more = _mm256_cmp_ps(v, lanes[h], _CMP_GT_OQ);
            lanes[h] = _mm256_blendv_ps(lanes[h], v, more);
            where[h] = _mm256_castps_si256(_mm256_blendv_ps(
                _mm256_castsi256_ps(where[h]), _mm256_castsi256_ps(index[h]), more));
            index[h] = _mm256_add_epi32(index[h], step);
          }
        }
        int32_t w[LANES];
        for (int h = 0; h < 2; ++h) {
          _mm256_storeu_ps(part + 8 * h, lanes[h]);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 8 * h), where[h]);
        }
#else
        vf16 lanes = splat16(-std::numeric_limits<float>::infinity());
        vi16 index = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        vi16 where = index;
        for (int64_t i = 0; i < body; i += LANES, index += static_cast<int32_t>(LANES)) {
          const vf16 v = load16(x + i);
          const vi16 more = v > lanes;
          lanes = more ? v : lanes;
          where = more ? index : where;
        }
        int32_t w[LANES];
        store16(part, lanes);
        __builtin_memcpy(w, &where, sizeof w);
#endif
        for (int64_t j = 0; j < LANES; ++j) first[j] = w[j];
      }
      for (int64_t i = body; i < vocab; ++i) {  // the tail joins lane i % LANES
        const float v = load(x, i);
        if (v > part[i % LANES]) {
          part[i % LANES] = v;
          first[i % LANES] = i;
        }
      }
      float best = part[0];
      int64_t at = first[0];  // ties across lanes: the smallest index (0 for a row of NaNs)
      for (int64_t j = 1; j < LANES; ++j)
        if (part[j] > best || (part[j] == best && first[j] < at)) {
          best = part[j];
          at = first[j];
        }
      float sums[LANES];
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
      __m256 s8[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      const __m256 b8 = _mm256_set1_ps(best);
      for (int64_t i = 0; i < body; i += LANES)
        for (int h = 0; h < 2; ++h)
          s8[h] = _mm256_add_ps(s8[h], vexp8(_mm256_sub_ps(load8(x + i + 8 * h), b8)));
      _mm256_storeu_ps(sums, s8[0]);
      _mm256_storeu_ps(sums + 8, s8[1]);
#else
      vf16 s16 = {};
      for (int64_t i = 0; i < body; i += LANES) s16 += vexp16(load16(x + i) - best);
      store16(sums, s16);
#endif
      float total = 0.0f;
      for (int64_t j = 0; j < LANES; ++j) total += sums[j];
      for (int64_t i = body; i < vocab; ++i) total += vexp(load(x, i) - best);
      argmax[r] = at;
      top[r] = best;
      // a row masked to -inf everywhere has no distribution: lse -inf, as torch.logsumexp
      lse[r] = std::isinf(best) && best < 0 ? best : best + std::log(total);
    }
  });
}

// logits: [R, V] with unit stride along V -> (argmax int64 [R], max float32 [R], lse float32 [R])
std::vector<torch::Tensor> row_max_lse(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [R, V], V contiguous");
  TORCH_CHECK(logits.size(1) > 0, "logits must have a vocabulary");
  const int64_t rows = logits.size(0);
  auto argmax = torch::empty({rows}, logits.options().dtype(torch::kInt64));
  auto top = torch::empty({rows}, logits.options().dtype(torch::kFloat32));
  auto lse = torch::empty({rows}, logits.options().dtype(torch::kFloat32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "row_max_lse", [&] {
    max_lse<scalar_t>(logits.data_ptr<scalar_t>(), rows, logits.size(1), logits.stride(0),
                      argmax.data_ptr<int64_t>(), top.data_ptr<float>(), lse.data_ptr<float>());
  });
  return {argmax, top, lse};
}

// ---- pointwise chains of a block layer, one pass each (torch runs them as 4-8 ops) ----------
// Each rounds to the tensor dtype where the torch twin's ops round, so a bf16 model gets the
// twin's values: RMSNorm normalises in float32, rounds, then multiplies by the weight.

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);
}

template <typename T>
void rms_rows(const T* x, const T* w, T* out, int64_t rows, int64_t hidden, int64_t x_stride,
              int64_t w_stride, float eps, const T* delta, T* sum_out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      float part[LANES] = {};
      const int64_t body = hidden - hidden % LANES;
      for (int64_t i = 0; i < hidden; ++i) {
        float a = load(xr, i);
        if (delta != nullptr) {  // residual add first, rounded as torch's add would round it
          const T s = round_to<T>(a + load(delta + r * hidden, i));
          sum_out[r * hidden + i] = s;
          a = static_cast<float>(s);
        }
        v[i] = a;
      }
      for (int64_t i = 0; i < body; i += LANES)
        for (int64_t j = 0; j < LANES; ++j) part[j] += v[i + j] * v[i + j];
      float ss = 0.0f;
      for (int64_t j = 0; j < LANES; ++j) ss += part[j];
      for (int64_t i = body; i < hidden; ++i) ss += v[i] * v[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + eps);
      const T* wr = w + r * w_stride;
      T* o = out + r * hidden;
      for (int64_t i = 0; i < hidden; ++i)
        o[i] = round_to<T>(load(wr, i) * static_cast<float>(round_to<T>(v[i] * inv)));
    }
  });
}

// x: [T, H] (rows may be strided); weight: [H] or [T, H]; residual: optional [T, H] added to x
// first. Returns the normalised rows (and, with a residual, x + residual).
std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const torch::Tensor& weight,
                                    double eps, const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, H] with H contiguous");
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.is_contiguous() && weight.size(-1) == hidden &&
                  (weight.dim() == 1 || (weight.dim() == 2 && weight.size(0) == rows)),
              "weight must be [H] or [T, H], contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x must share a dtype");
  auto out = torch::empty({rows, hidden}, x.options());
  torch::Tensor total;
  if (residual.has_value()) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() &&
                    residual->scalar_type() == x.scalar_type(),
                "residual must be a contiguous [T, H] of x's dtype");
    total = torch::empty({rows, hidden}, x.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), rows, hidden, x.stride(0),
                       weight.dim() == 2 ? hidden : 0, static_cast<float>(eps),
                       residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
                       residual.has_value() ? total.data_ptr<scalar_t>() : nullptr);
  });
  if (residual.has_value()) return {out, total};
  return {out};
}

template <typename T>
void rope_rows(T* x, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t dim,
               int64_t row_stride) {
  const int64_t half = dim / 2;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cos + r * dim;
      const T* s = sin + r * dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* xh = x + r * row_stride + h * dim;
        for (int64_t i = 0; i < dim; ++i) v[i] = load(xh, i);
        for (int64_t i = 0; i < dim; ++i) {
          const float rot = i < half ? -v[i + half] : v[i - half];
          // as torch: x * cos and rotated * sin each rounded, then their sum
          const float a = static_cast<float>(round_to<T>(v[i] * load(c, i)));
          const float b = static_cast<float>(round_to<T>(rot * load(s, i)));
          xh[i] = round_to<T>(a + b);
        }
      }
    }
  });
}

// x: [T, heads, D] with D and heads contiguous (rows may be strided), rotated in place;
// cos, sin: [T, D] contiguous.
void rope_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "x must be [T, heads, D] with heads and D contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
                  cos.size(0) == x.size(0) && cos.size(1) == x.size(2),
              "cos and sin must be contiguous [T, D]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos, sin and x must share a dtype");
  TORCH_CHECK(x.size(2) % 2 == 0, "head_dim must be even");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                        sin.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), x.stride(0));
  });
}

template <typename T>
void silu_mul_rows(const T* x, T* out, int64_t rows, int64_t inter, int64_t x_stride) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = x + r * x_stride;
      const T* u = g + inter;
      T* o = out + r * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float a = load(g, i);
        // silu rounded as torch's silu rounds it, then the product
        const float act = static_cast<float>(round_to<T>(a / (1.0f + vexp(-a))));
        o[i] = round_to<T>(act * load(u, i));
      }
    }
  });
}

// gate_up: [T, 2I] (gate | up, rows may be strided) -> silu(gate) * up [T, I]
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be [T, 2I] with columns contiguous");
  const int64_t inter = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul",
                                  [&] {
                                    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(),
                                                            out.data_ptr<scalar_t>(),
                                                            gate_up.size(0), inter,
                                                            gate_up.stride(0));
                                  });
  return out;
}

// ---- the K/V write and a whole decode layer ---------------------------------------------

// k, v: [T, Hkv, D] (rows may be strided); caches [blocks, block_size, Hkv, D]; slots [T]
// int64 flat cache slots, -1 skips a row. One call for both caches where the twin runs two
// index_copy_ with a mask check.
void write_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache,
              torch::Tensor& v_cache, const torch::Tensor& slots) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k and v must be [T, Hkv, D]");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 &&
                  v.stride(1) == v.size(2),
              "k and v rows must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.size(2) * k_cache.size(3) == k.size(1) * k.size(2),
              "caches must be contiguous [blocks, block_size, Hkv, D]");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k.scalar_type() &&
                  v_cache.scalar_type() == k.scalar_type(),
              "k, v and the caches must share one dtype");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() &&
                  slots.numel() == k.size(0),
              "slots must be contiguous int64, one per row");
  const int64_t row_bytes = k.size(1) * k.size(2) * k.element_size();
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  const int64_t* sl = slots.data_ptr<int64_t>();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  for (int64_t t = 0; t < k.size(0); ++t) {
    if (sl[t] < 0) continue;
    TORCH_CHECK(sl[t] < capacity, "slot ", sl[t], " is outside the cache");
    std::memcpy(kc + sl[t] * row_bytes, kp + t * ks, row_bytes);
    std::memcpy(vc + sl[t] * row_bytes, vp + t * vs, row_bytes);
  }
}

// oneDNN (through torch's ideep) builds and caches a JIT-compiled primitive for every row
// count it meets, about half a MiB each, in two caches of 1,024 entries: a server whose
// steps carry every row count from 1 to a few thousand grows by hundreds of MiB (measured: 1.7
// MiB per row count for three small weights) and pays ~1 ms to build each. So a call's rows are
// padded up to one of a few counts: exact up to 16, then 4 counts an octave (at most 1/4 more
// rows), in pieces of at most kGemmPiece rows. A row's result does not depend on the others.
constexpr int64_t kGemmPiece = 512;

int64_t gemm_rows(int64_t m) {
  TORCH_CHECK(m >= 0 && m <= kGemmPiece, "gemm_rows takes 0..", kGemmPiece, " rows, got ", m);
  if (m <= 16) return m == 1 ? 2 : m;  // one row: another oneDNN kernel (packed_linear.py)
  const int64_t step = int64_t{1} << (63 - __builtin_clzll(static_cast<uint64_t>(m)) - 2);
  return (m + step - 1) / step * step;
}

torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& w) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, c10::IValue(), std::string("none"),
                                 c10::List<c10::optional<at::Scalar>>(), std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// x [T, in] (bf16 or float32) @ a weight packed by torch.ops.mkldnn._reorder_linear_weight: the op
// loopserve_kernels/packed_linear.py calls, through the dispatcher, with the same row padding, so the
// outputs are the same bits.
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& w) {
  const int64_t m = x.size(0);
  if (m > kGemmPiece) {
    std::vector<torch::Tensor> pieces;
    for (int64_t start = 0; start < m; start += kGemmPiece)
      pieces.push_back(packed_linear(x.narrow(0, start, std::min(kGemmPiece, m - start)), w));
    return torch::cat(pieces);
  }
  const int64_t rows = gemm_rows(m);
  if (rows == m) return onednn_linear(x, w);
  torch::Tensor padded = torch::zeros({rows, x.size(1)}, x.options());
  padded.narrow(0, 0, m).copy_(x);
  return onednn_linear(padded, w).narrow(0, 0, m);
}

// ---- bf16 GEMM over 64-column weight panels, by AVX-512 BF16 dot products ----
// On a CPU without AMX, oneDNN's bf16 GEMM streams a decode step's weights at about half the
// memory bandwidth (measured on a 2-core AMD EPYC, one thread: 11 GB/s at 1 row against
// 20 GB/s for a plain copy). Here a weight [N, K] is stored once as panels [N/64, K/2, 64, 2]:
// for each pair of input columns, the 64 outputs' two weights side by side, so one
// vdpbf16ps multiplies 16 outputs' pairs by a broadcast pair of x and adds both products in
// float32, and a panel is one sequential stream. Up to 6 rows share each weight load. Every
// output is the same float32 sum in the same order whatever the row count or thread split,
// so a row's result does not depend on what else is in the batch.
#if defined(__AVX512BF16__)
constexpr bool kPanelGemm = true;

template <int MR>
inline void panel_rows(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t pairs,
                       uint16_t* y, int64_t y_stride) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < pairs; ++kp, w += 128) {
    const char* ahead = reinterpret_cast<const char*>(w + 8 * 128);
    for (int b = 0; b < 256; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    __m512bh wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + 32 * j);
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      __builtin_memcpy(&pair, x + i * x_stride + 2 * kp, sizeof pair);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xb);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j)  // round to nearest even, as c10::BFloat16 does
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * y_stride + 16 * j),
                          (__m256i)_mm512_cvtneps_pbh(acc[i][j]));
}

// ---- bf16 GEMM over 32-column weight panels, by AMX tiles ----
// One AMX tile row of B is 16 outputs' weight pairs (64 bytes), so a weight stored as panels
// [N/32, K/2, 32, 2] is, for every 16 input pairs, two B tiles read with a 128-byte stride,
// and a panel is one sequential stream that each 32-row block of x rereads from L1/L2. At
// decode row counts the GEMM is bound by the weight stream: oneDNN's AMX GEMM reaches
// ~7.4 GB/s at 32 rows on a core that reads 12 GB/s (measured on a 2-core Xeon, SmolLM2's
// linears); here each weight byte comes from memory once. Outputs are float32 sums in a
// fixed order per row, so a row's result does not depend on the batch or the thread split.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr bool kAmx = true;

// Linux hands out the tile state on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA).
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0, tmm1: C of the first row block, tmm2, tmm3: of the second; tmm4, tmm5: the A row
// blocks (r0 and r1 rows; r1 = 0: one block); tmm6, tmm7: the panel's two B tiles.
inline void configure(int r0, int r1) {
  TileConfig c;
  const int rows[8] = {r0, r0, r1, r1, r0, r1, 16, 16};
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(rows[t]);
    c.colsb[t] = rows[t] ? 64 : 0;
  }
  _tile_loadconfig(&c);
}

// float32 C rows in `buf` (32 columns a row) -> bf16 rows of y, rounded to nearest even as
// c10::BFloat16 does.
inline void store_rows(const float* buf, int rows, uint16_t* y, int64_t y_stride) {
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < 32; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * y_stride + j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(buf + 32 * i + j)));
}

// One row block (up to 16 rows, or 17..32 as two: `two`) x one 32-column panel. `next`: the
// following panel, fetched into L2 meanwhile (the first pass over a panel, when more follow).
template <bool two>
inline void amx_block(const uint16_t* x, int64_t k, const uint16_t* w, int r0, int r1,
                      uint16_t* y, int64_t y_stride, float* buf, const char* next) {
  _tile_zero(0);
  _tile_zero(1);
  if (two) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t xs = 2 * k;
  for (int64_t s = 0; s < k / 32; ++s, w += 16 * 64) {
    if (next != nullptr)
      for (int b = 0; b < 2048; b += 64) _mm_prefetch(next + 2048 * s + b, _MM_HINT_T1);
    _tile_loadd(4, x + 32 * s, xs);
    _tile_loadd(6, w, 128);
    _tile_loadd(7, w + 32, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, x + 16 * k + 32 * s, xs);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, buf, 128);
  _tile_stored(1, buf + 16, 128);
  store_rows(buf, r0, y, y_stride);
  if (two) {
    _tile_stored(2, buf, 128);
    _tile_stored(3, buf + 16, 128);
    store_rows(buf, r1, y + 16 * y_stride, y_stride);
  }
}

// Threads split the panels; each streams its own panels once and runs every row block of x
// over a panel while it is in cache.
void amx_gemm(const uint16_t* xd, const uint16_t* wd, uint16_t* yd, int64_t m, int64_t k,
              int64_t count) {
  const int64_t n = 32 * count, panel = 32 * k;  // bf16 elements of one panel
  const int64_t full = m / 32, rest = m % 32;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[16 * 32];
    int config = -1;  // the tile shape loaded: a tail block needs its own
    for (int64_t p = begin; p < end; ++p) {
      const uint16_t* w = wd + p * panel;
      const char* next =
          p + 1 < end && m > 32 ? reinterpret_cast<const char*>(w + panel) : nullptr;
      for (int64_t b = 0; b < full; ++b) {
        if (config != 32) configure(16, 16), config = 32;
        amx_block<true>(xd + 32 * b * k, k, w, 16, 16, yd + 32 * b * n + 32 * p, n, buf,
                        b ? nullptr : next);
      }
      if (rest == 0) continue;
      const uint16_t* x = xd + 32 * full * k;
      uint16_t* y = yd + 32 * full * n + 32 * p;
      const int r = static_cast<int>(rest);
      if (config != r) configure(std::min(r, 16), std::max(r - 16, 0)), config = r;
      if (r > 16)
        amx_block<true>(x, k, w, 16, r - 16, y, n, buf, full ? nullptr : next);
      else
        amx_block<false>(x, k, w, r, 0, y, n, buf, full ? nullptr : next);
    }
    _tile_release();
  });
}
#else
constexpr bool kAmx = false;

bool amx_permitted() { return false; }

void amx_gemm(const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "amx_gemm needs a build with AMX (-march on such a CPU)");
}
#endif

// Whether the AMX path computes a panel GEMM with `k` input columns.
bool amx_takes(int64_t k) { return kAmx && k % 32 == 0 && amx_permitted(); }

// Panels 64 columns wide: AVX-512 BF16 dot products; 32 wide: AMX tiles.
torch::Tensor panel_gemm(const torch::Tensor& x_in, const torch::Tensor& panels) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && x_in.dim() == 2, "x must be bf16 [T, K]");
  TORCH_CHECK(panels.scalar_type() == at::kBFloat16 && panels.dim() == 4 &&
                  (panels.size(2) == 64 || panels.size(2) == 32) && panels.size(3) == 2 &&
                  panels.is_contiguous(),
              "panels must be contiguous bf16 [N/64, K/2, 64, 2] or [N/32, K/2, 32, 2]");
  const torch::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), count = panels.size(0), pairs = panels.size(1);
  const int64_t width = panels.size(2);
  TORCH_CHECK(2 * pairs == k, "x has ", k, " columns, the panels take ", 2 * pairs);
  const int64_t n = width * count;
  torch::Tensor y = torch::empty({m, n}, x.options());
  const auto* xd = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wd = reinterpret_cast<const uint16_t*>(panels.data_ptr());
  auto* yd = reinterpret_cast<uint16_t*>(y.data_ptr());
  if (width == 32) {
    TORCH_CHECK(amx_takes(k), "32-column panels need AMX and in-features divisible by 32");
    amx_gemm(xd, wd, yd, m, k, count);
    return y;
  }
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const uint16_t* w = wd + p * pairs * 128;
      int64_t i = 0;
      for (; i + 6 <= m; i += 6) panel_rows<6>(xd + i * k, k, w, pairs, yd + i * n + 64 * p, n);
      const uint16_t* xr = xd + i * k;
      uint16_t* yr = yd + i * n + 64 * p;
      switch (m - i) {
        case 1: panel_rows<1>(xr, k, w, pairs, yr, n); break;
        case 2: panel_rows<2>(xr, k, w, pairs, yr, n); break;
        case 3: panel_rows<3>(xr, k, w, pairs, yr, n); break;
        case 4: panel_rows<4>(xr, k, w, pairs, yr, n); break;
        case 5: panel_rows<5>(xr, k, w, pairs, yr, n); break;
        default: break;
      }
    }
  });
  return y;
}
#else
constexpr bool kPanelGemm = false;

bool amx_takes(int64_t) { return false; }

torch::Tensor panel_gemm(const torch::Tensor&, const torch::Tensor&) {
  TORCH_CHECK(false, "panel_gemm needs a build with AVX-512 BF16 (-march on such a CPU)");
}
#endif

// ---- float32 GEMM over 16-column weight panels, by AVX2 FMA ----
// oneDNN's float32 GEMM on a packed weight streams a decode step's weights from memory far
// below the bandwidth (measured on a 2-core AMD EPYC with AVX2 only, two threads, SmolLM2's
// four linear maps a layer cycling through 30 layers: 9.7 GB/s at 8 rows, 5.8 GB/s and 93
// GFLOP/s at 32, against 32 GB/s for a plain read). Here a weight [N, K] is stored once as
// panels [N/16, K, 16]: per input column, the panel's 16 outputs' weights side by side (two
// ymm loads), so a panel is one sequential stream and up to 6 rows share each load (12
// accumulators). Every output is one FMA chain over k from 0 in order, whatever the row
// count, row grouping or thread split: a row's bits do not depend on the rest of the batch.
#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kPanelF32 = true;

// The accumulators are named registers, not an array: GCC 13 stores an array of them back to
// the stack on every k (12 stores a k, which then bound the loop, not the FMAs).
// y[i, 0:16] (+)= x[i, :] @ w for MR rows, w [k, 16] with row stride w_stride (16: a panel,
// then read ahead of the stream), each output one FMA chain over k from 0.
template <int MR>
inline void fma_rows_16(const float* x, int64_t x_stride, const float* w, int64_t w_stride,
                        int64_t k, float* y, int64_t y_stride, bool add) {
  static_assert(MR >= 1 && MR <= 6);
  const bool ahead = w_stride == 16;
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  const float* x0 = x;
  for (int64_t kk = 0; kk < k; ++kk, w += w_stride, ++x0) {
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(w + 16 * 64), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
    __m256 xv = _mm256_broadcast_ss(x0);
    a00 = _mm256_fmadd_ps(xv, w0, a00);
    a01 = _mm256_fmadd_ps(xv, w1, a01);
    if constexpr (MR > 1) {
      xv = _mm256_broadcast_ss(x0 + x_stride);
      a10 = _mm256_fmadd_ps(xv, w0, a10);
      a11 = _mm256_fmadd_ps(xv, w1, a11);
    }
    if constexpr (MR > 2) {
      xv = _mm256_broadcast_ss(x0 + 2 * x_stride);
      a20 = _mm256_fmadd_ps(xv, w0, a20);
      a21 = _mm256_fmadd_ps(xv, w1, a21);
    }
    if constexpr (MR > 3) {
      xv = _mm256_broadcast_ss(x0 + 3 * x_stride);
      a30 = _mm256_fmadd_ps(xv, w0, a30);
      a31 = _mm256_fmadd_ps(xv, w1, a31);
    }
    if constexpr (MR > 4) {
      xv = _mm256_broadcast_ss(x0 + 4 * x_stride);
      a40 = _mm256_fmadd_ps(xv, w0, a40);
      a41 = _mm256_fmadd_ps(xv, w1, a41);
    }
    if constexpr (MR > 5) {
      xv = _mm256_broadcast_ss(x0 + 5 * x_stride);
      a50 = _mm256_fmadd_ps(xv, w0, a50);
      a51 = _mm256_fmadd_ps(xv, w1, a51);
    }
  }
  const __m256 acc[6][2] = {{a00, a01}, {a10, a11}, {a20, a21},
                            {a30, a31}, {a40, a41}, {a50, a51}};
  for (int i = 0; i < MR; ++i)
    for (int h = 0; h < 2; ++h) {
      float* o = y + i * y_stride + 8 * h;
      _mm256_storeu_ps(o, add ? _mm256_add_ps(_mm256_loadu_ps(o), acc[i][h]) : acc[i][h]);
    }
}

template <int MR>
inline void panel_rows_f32(const float* x, int64_t x_stride, const float* w, int64_t k, float* y,
                           int64_t y_stride) {
  fma_rows_16<MR>(x, x_stride, w, 16, k, y, y_stride, false);
}

// Threads split the panels; each streams its own panels once and runs every row group of x
// over a panel while it is in cache.
torch::Tensor panel_gemm_f32(const torch::Tensor& x_in, const torch::Tensor& panels) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "x must be float32 [T, K]");
  TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.dim() == 3 && panels.size(2) == 16 &&
                  panels.is_contiguous(),
              "panels must be contiguous float32 [N/16, K, 16]");
  const torch::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), count = panels.size(0);
  TORCH_CHECK(panels.size(1) == k, "x has ", k, " columns, the panels take ", panels.size(1));
  const int64_t n = 16 * count;
  torch::Tensor y = torch::empty({m, n}, x.options());
  const float* xd = x.data_ptr<float>();
  const float* wd = panels.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* w = wd + p * k * 16;
      int64_t i = 0;
      for (; i + 6 <= m; i += 6) panel_rows_f32<6>(xd + i * k, k, w, k, yd + i * n + 16 * p, n);
      const float* xr = xd + i * k;
      float* yr = yd + i * n + 16 * p;
      switch (m - i) {
        case 1: panel_rows_f32<1>(xr, k, w, k, yr, n); break;
        case 2: panel_rows_f32<2>(xr, k, w, k, yr, n); break;
        case 3: panel_rows_f32<3>(xr, k, w, k, yr, n); break;
        case 4: panel_rows_f32<4>(xr, k, w, k, yr, n); break;
        case 5: panel_rows_f32<5>(xr, k, w, k, yr, n); break;
        default: break;
      }
    }
  });
  return y;
}
#else
constexpr bool kPanelF32 = false;

torch::Tensor panel_gemm_f32(const torch::Tensor&, const torch::Tensor&) {
  TORCH_CHECK(false, "the float32 panel GEMM needs a build with AVX2 and FMA");
}
#endif

// The panel width this build computes fastest for a weight with `k` input columns: 32 where
// the AMX path takes it, 64 where there is no AMX and the dot-product path is built, else 0
// (oneDNN's layout: its AMX kernels beat dot products at prefill sizes).
int64_t panel_width(int64_t k) {
  if (amx_takes(k)) return 32;
#if defined(__AMX_BF16__)
  return 0;
#else
  return kPanelGemm && k % 2 == 0 ? 64 : 0;
#endif
}

// x @ a weight in any packed form: oneDNN's (an mkldnn tensor), bf16 or float32 panels.
torch::Tensor packed_matmul(const torch::Tensor& x, const torch::Tensor& w) {
  if (w.is_mkldnn()) return packed_linear(x, w);
  return w.scalar_type() == at::kFloat ? panel_gemm_f32(x, w) : panel_gemm(x, w);
}

// A step's rows of one depth: [lo, hi), that depth's norms, and each projection group's
// low-rank delta (none for a model without deltas). The runner sorts rows by depth, so a
// depth is one slice.
struct GroupDelta {
  torch::Tensor shrink;  // packed A [Σr, in] of the group's slices, stacked
  std::vector<c10::optional<torch::Tensor>> expands;  // packed B_s [out_s, r_s]; none: r_s = 0
  std::vector<int64_t> outs, ranks;
};

struct Segment {
  int64_t lo, hi;
  torch::Tensor input_norm, post_norm;
  std::vector<GroupDelta> deltas;  // q|k|v, o, gate|up, down; empty without deltas
};

// segments: (lo, hi) pairs; norms: the input (and, for a whole layer, post-attention) norm
// per segment; delta_w and delta_dims, per segment and group in order: the shrink then one
// entry per slice, and the slice count then (out, rank) per slice. `groups`: the projection
// groups given (4 for a layer, 1 — q|k|v — for K/V fills).
std::vector<Segment> parse_segments(const std::vector<int64_t>& bounds,
                                    const std::vector<torch::Tensor>& norms,
                                    const std::vector<c10::optional<torch::Tensor>>& delta_w,
                                    const std::vector<int64_t>& delta_dims, int64_t rows,
                                    int groups) {
  const size_t count = bounds.size() / 2, per = groups == 4 ? 2 : 1;
  TORCH_CHECK(bounds.size() == 2 * count && count >= 1 && norms.size() == per * count,
              "segments must be (lo, hi) pairs, each with its norms");
  std::vector<Segment> segs(count);
  size_t w = 0, d = 0;
  for (size_t i = 0; i < count; ++i) {
    Segment& seg = segs[i];
    seg.lo = bounds[2 * i];
    seg.hi = bounds[2 * i + 1];
    TORCH_CHECK(seg.lo == (i ? segs[i - 1].hi : 0) && seg.hi > seg.lo,
                "segments must tile the rows in order, each non-empty");
    seg.input_norm = norms[per * i];
    seg.post_norm = norms[per * i + per - 1];
    if (delta_dims.empty()) continue;
    for (int g = 0; g < groups; ++g) {
      TORCH_CHECK(d < delta_dims.size() && w < delta_w.size() && delta_w[w].has_value(),
                  "delta lists end early");
      GroupDelta gd;
      gd.shrink = *delta_w[w++];
      const int64_t slices = delta_dims[d++];
      for (int64_t j = 0; j < slices; ++j) {
        TORCH_CHECK(d + 2 <= delta_dims.size() && w < delta_w.size(), "delta lists end early");
        gd.outs.push_back(delta_dims[d++]);
        gd.ranks.push_back(delta_dims[d++]);
        gd.expands.push_back(delta_w[w++]);
        TORCH_CHECK(gd.expands.back().has_value() == (gd.ranks.back() > 0),
                    "an expand is given exactly where its rank is > 0");
      }
      seg.deltas.push_back(std::move(gd));
    }
  }
  TORCH_CHECK(segs.back().hi == rows, "segments must cover every row");
  TORCH_CHECK(w == delta_w.size() && d == delta_dims.size(), "delta lists run long");
  return segs;
}

// ---- the low-rank GEMMs of a step's deltas, all depths in one parallel region --------------
// At a few rows a oneDNN call has a ~20 us floor (N=192, K=64: 19 us at 1 row, 21 at 13), and a
// step at three depths makes 33 of them a layer. Here a float32 factor is stored transposed
// ([K, N], row-major) and every (segment, slice) product of a stage is tiled together: 4 rows
// x 16 columns in AVX2 registers, each element one FMA chain over k from 0, so a row's values
// depend on nothing else in the batch, whatever the tiling.
struct LowRankJob {
  const float* x;
  int64_t x_stride, rows, k;
  const float* wt;  // [k, n]
  int64_t n;
  float* out;
  int64_t out_stride;
  bool add;  // out += x @ wt, else out = x @ wt
};

template <int MR>
void low_rank_tile(const LowRankJob& j, int64_t r0, int64_t c0) {
  const int64_t width = std::min<int64_t>(16, j.n - c0);
#if defined(__AVX2__) && defined(__FMA__)
  if (width == 16) {
    fma_rows_16<MR>(j.x + r0 * j.x_stride, j.x_stride, j.wt + c0, j.n, j.k,
                    j.out + r0 * j.out_stride + c0, j.out_stride, j.add);
    return;
  }
#endif
  for (int r = 0; r < MR; ++r)
    for (int64_t c = c0; c < c0 + width; ++c) {
      float acc = 0.0f;
      for (int64_t kk = 0; kk < j.k; ++kk)
        acc = std::fma(j.x[(r0 + r) * j.x_stride + kk], j.wt[kk * j.n + c], acc);
      float* o = j.out + (r0 + r) * j.out_stride + c;
      *o = j.add ? *o + acc : acc;
    }
}

void run_low_rank(const std::vector<LowRankJob>& jobs) {
  struct Tile {
    int32_t job, rows;
    int64_t r0, c0;
  };
  std::vector<Tile> tiles;
  for (size_t i = 0; i < jobs.size(); ++i)
    for (int64_t r0 = 0; r0 < jobs[i].rows; r0 += 4)
      for (int64_t c0 = 0; c0 < jobs[i].n; c0 += 16)
        tiles.push_back({static_cast<int32_t>(i),
                         static_cast<int32_t>(std::min<int64_t>(4, jobs[i].rows - r0)), r0, c0});
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Tile& t = tiles[i];
      const LowRankJob& j = jobs[t.job];
      switch (t.rows) {
        case 4: low_rank_tile<4>(j, t.r0, t.c0); break;
        case 3: low_rank_tile<3>(j, t.r0, t.c0); break;
        case 2: low_rank_tile<2>(j, t.r0, t.c0); break;
        default: low_rank_tile<1>(j, t.r0, t.c0); break;
      }
    }
  });
}

// A factor in the low-rank GEMM's form: float32 [K, N] (not a packed oneDNN or panel weight).
bool transposed_factor(const torch::Tensor& w) {
  return !w.is_mkldnn() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous();
}

// Where slice j's output columns [col, col + out) land in a y that holds the group's columns
// from `first` on: col - first, or -1 for a slice wholly before them (y never holds part of one).
int64_t slice_column(int64_t col, int64_t out, int64_t first) {
  if (col + out <= first) return -1;
  TORCH_CHECK(col >= first, "the output columns must start at a slice boundary");
  return col - first;
}

// y [T, Σout] (float32) += each segment's delta over its rows of x [T, in], factors stored
// transposed (A^T [in, Σr], B_s^T [r_s, out_s]): every segment's shrink in one parallel
// region, then every (segment, slice) expand added to its columns in another. y may hold only
// the group's columns from `first` on (a K/V fill skips q): the slices before are not expanded.
void add_low_rank(torch::Tensor& y, const torch::Tensor& x, const std::vector<Segment>& segs,
                  int g, int64_t first = 0) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat &&
                  x.stride(1) == 1 && y.stride(1) == 1,
              "the low-rank GEMM takes float32 rows");
  const int64_t width = segs[0].deltas[g].shrink.size(1);
  torch::Tensor t = torch::empty({x.size(0), width}, x.options());
  std::vector<LowRankJob> shrink, expand;
  for (const Segment& seg : segs) {
    const GroupDelta& gd = seg.deltas[g];
    TORCH_CHECK(transposed_factor(gd.shrink) && gd.shrink.size(0) == x.size(1) &&
                    gd.shrink.size(1) == width,
                "every segment's shrink must be float32 [in, Σr]");
    const int64_t n = seg.hi - seg.lo;
    shrink.push_back({x.data_ptr<float>() + seg.lo * x.stride(0), x.stride(0), n, x.size(1),
                      gd.shrink.data_ptr<float>(), width, t.data_ptr<float>() + seg.lo * width,
                      width, false});
    int64_t col = 0, rank_col = 0;
    for (size_t j = 0; j < gd.outs.size(); ++j) {
      const int64_t at = slice_column(col, gd.outs[j], first);
      if (gd.expands[j].has_value() && at >= 0) {
        const torch::Tensor& b = *gd.expands[j];
        TORCH_CHECK(transposed_factor(b) && b.size(0) == gd.ranks[j] && b.size(1) == gd.outs[j],
                    "an expand must be float32 [r, out]");
        expand.push_back({t.data_ptr<float>() + seg.lo * width + rank_col, width, n, gd.ranks[j],
                          b.data_ptr<float>(), gd.outs[j],
                          y.data_ptr<float>() + seg.lo * y.stride(0) + at, y.stride(0), true});
      }
      col += gd.outs[j];
      rank_col += gd.ranks[j];
    }
  }
  run_low_rank(shrink);
  run_low_rank(expand);
}

// y [T, out] += each segment's delta of group g over its rows of x: the Python layer's
// `_add_packed_deltas` (shrink, one expand per slice, added to its columns), the same GEMMs;
// y holds the group's columns from `first` on (see add_low_rank).
void add_deltas(torch::Tensor& y, const torch::Tensor& x, const std::vector<Segment>& segs,
                int g, int64_t first = 0) {
  if (!segs.empty() && !segs[0].deltas.empty() && transposed_factor(segs[0].deltas[g].shrink)) {
    add_low_rank(y, x, segs, g, first);
    return;
  }
  for (const Segment& seg : segs) {
    if (seg.deltas.empty()) return;
    const GroupDelta& gd = seg.deltas[g];
    const int64_t n = seg.hi - seg.lo;
    const torch::Tensor t = packed_matmul(x.narrow(0, seg.lo, n), gd.shrink);
    int64_t col = 0, rank_col = 0;
    for (size_t j = 0; j < gd.outs.size(); ++j) {
      const int64_t at = slice_column(col, gd.outs[j], first);
      if (gd.expands[j].has_value() && at >= 0)
        y.narrow(0, seg.lo, n)
            .narrow(1, at, gd.outs[j])
            .add_(packed_matmul(t.narrow(1, rank_col, gd.ranks[j]), *gd.expands[j]));
      col += gd.outs[j];
      rank_col += gd.ranks[j];
    }
  }
}

// RMSNorm with each segment's weight: one [H] weight, or [T, H] rows of them (as the Python
// layer indexes per-depth norms by a row's depth).
std::vector<torch::Tensor> segment_rms_norm(const torch::Tensor& x, const std::vector<Segment>& segs,
                                            bool post, double eps,
                                            const c10::optional<torch::Tensor>& residual) {
  if (segs.size() == 1) return rms_norm(x, post ? segs[0].post_norm : segs[0].input_norm, eps, residual);
  torch::Tensor w = torch::empty({x.size(0), x.size(1)}, x.options());
  for (const Segment& seg : segs) {
    const torch::Tensor& ws = post ? seg.post_norm : seg.input_norm;
    w.narrow(0, seg.lo, seg.hi - seg.lo).copy_(ws.unsqueeze(0).expand({seg.hi - seg.lo, x.size(1)}));
  }
  return rms_norm(x, w, eps, residual);
}

torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w,
                      const std::vector<Segment>& segs, int g) {
  torch::Tensor y = packed_matmul(x, w);
  add_deltas(y, x, segs, g);
  return y;
}


// x [T, in] @ one delta (A^T [in, Σr], B_s^T [r_s, out_s] or none): [T, Σout], zero where a
// slice has rank 0 — the Python layer's call of the same GEMMs the fused layer makes.
torch::Tensor low_rank_delta(const torch::Tensor& x, const torch::Tensor& shrink_t,
                             const std::vector<c10::optional<torch::Tensor>>& expands_t,
                             const std::vector<int64_t>& outs, const std::vector<int64_t>& ranks) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, in] with in contiguous");
  int64_t total = 0;
  for (int64_t o : outs) total += o;
  torch::Tensor y = torch::zeros({x.size(0), total}, x.options());
  if (x.size(0) == 0) return y;
  Segment seg{0, x.size(0), {}, {}, {}};
  seg.deltas.resize(1);
  seg.deltas[0] = GroupDelta{shrink_t, expands_t, outs, ranks};
  add_low_rank(y, x, {seg}, 0);
  return y;
}

// One Llama-family block layer (RMSNorm, fused q|k|v, RoPE, paged attention, o, residual +
// RMSNorm, fused gate|up, silu·mul, down, residual) for a step of decode rows and prefill
// chunks, in one call: the same kernels, in the same order, as the Python layer runs them one
// call at a time (about 0.3 ms of Python a layer). hidden [T, H]; weights packed (shared by
// the step's depths); segments, norms, delta_*: the rows of each depth with that depth's norms
// and low-rank deltas (parse_segments); cos, sin [T, D]; tables/lens/rows/windows:
// paged_decode's, for the decode sequences (none: zero rows); chunk_*: prefill_chunks'
// metadata and chunk sequences.
torch::Tensor decode_layer(const torch::Tensor& hidden, const std::vector<int64_t>& segments,
                           const std::vector<torch::Tensor>& norms,
                           const std::vector<c10::optional<torch::Tensor>>& delta_w,
                           const std::vector<int64_t>& delta_dims, double eps,
                           const torch::Tensor& w_qkv, const torch::Tensor& w_o,
                           const torch::Tensor& w_gate_up, const torch::Tensor& w_down,
                           const torch::Tensor& cos, const torch::Tensor& sin,
                           torch::Tensor& k_cache, torch::Tensor& v_cache,
                           const torch::Tensor& slots, const torch::Tensor& tables,
                           const torch::Tensor& lens, const torch::Tensor& rows,
                           const torch::Tensor& windows, const torch::Tensor& chunk_tables,
                           const torch::Tensor& chunk_starts, const torch::Tensor& chunk_ctx,
                           const torch::Tensor& chunk_windows, const torch::Tensor& chunks,
                           int64_t heads_q, double scale) {
  TORCH_CHECK((hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kFloat) &&
                  hidden.is_contiguous() && hidden.dim() == 2,
              "hidden must be contiguous bf16 or float32 [T, H]");
  const int64_t t = hidden.size(0), heads_kv = k_cache.size(2), dim = k_cache.size(3);
  const std::vector<Segment> segs = parse_segments(segments, norms, delta_w, delta_dims, t, 4);
  for (const Segment& seg : segs)
    TORCH_CHECK(seg.input_norm.dim() == 1 && seg.post_norm.dim() == 1, "norm weights must be [H]");
  const int64_t qw = heads_q * dim, kvw = heads_kv * dim;
  const torch::Tensor h = segment_rms_norm(hidden, segs, false, eps, c10::nullopt)[0];
  const torch::Tensor qkv = project(h, w_qkv, segs, 0);
  TORCH_CHECK(qkv.size(1) == qw + 2 * kvw, "the q|k|v weight does not match the heads");
  torch::Tensor q = qkv.narrow(1, 0, qw).view({t, heads_q, dim});
  torch::Tensor k = qkv.narrow(1, qw, kvw).view({t, heads_kv, dim});
  const torch::Tensor v = qkv.narrow(1, qw + kvw, kvw).view({t, heads_kv, dim});
  rope_(q, cos, sin);
  rope_(k, cos, sin);
  write_kv(k, v, k_cache, v_cache, slots);
  torch::Tensor attn = torch::empty({t, heads_q, dim}, hidden.options());
  if (tables.size(0)) paged_decode(q, k_cache, v_cache, tables, lens, rows, windows, attn, scale);
  prefill_chunks(q, k_cache, v_cache, chunk_tables, chunk_starts, chunk_ctx, chunk_windows, chunks,
                 attn, scale);
  const torch::Tensor o = project(attn.view({t, qw}), w_o, segs, 1);
  const auto normed = segment_rms_norm(hidden, segs, true, eps, o);  // {norm(h + o), h + o}
  const torch::Tensor inner = silu_mul(project(normed[0], w_gate_up, segs, 2));
  return normed[1] + project(inner, w_down, segs, 3);
}

// Columns [first, first + count) of a panel weight as a weight of their own: a view of whole
// panels (each output column is its own FMA chain, so the values are the full GEMM's), or an
// undefined tensor where the layout cannot be cut there (oneDNN's, or mid-panel).
torch::Tensor panel_columns(const torch::Tensor& w, int64_t first, int64_t count) {
  if (w.is_mkldnn() || (w.dim() != 3 && w.dim() != 4)) return {};
  const int64_t width = w.size(2);  // [N/16, K, 16] float32 or [N/W, K/2, W, 2] bf16
  if (first % width || count % width) return {};
  return w.narrow(0, first / width, count / width);
}

// K/V that block layer `layer` would write at each fill row's depth if its input were that
// row's hidden state (an exited token's, standing in for the loops it skipped): the input
// norm, k|v with the depth's weight (w_qkv: one q|k|v weight per segment) and deltas, RoPE on
// k, then written at `slots` — RecursiveLM.kv_projection and write_kv in one call. Panel
// weights are cut to their k|v columns (q is 60 % of SmolLM2's q|k|v and a fill never reads
// it); oneDNN's packed weights project all of q|k|v.
void fill_kv_layer(const torch::Tensor& hidden, const std::vector<int64_t>& segments,
                   const std::vector<torch::Tensor>& norms,
                   const std::vector<c10::optional<torch::Tensor>>& delta_w,
                   const std::vector<int64_t>& delta_dims, double eps,
                   const std::vector<torch::Tensor>& w_qkv, const torch::Tensor& cos,
                   const torch::Tensor& sin, torch::Tensor& k_cache, torch::Tensor& v_cache,
                   const torch::Tensor& slots, int64_t heads_q) {
  TORCH_CHECK(hidden.is_contiguous() && hidden.dim() == 2, "hidden must be contiguous [T, H]");
  const int64_t t = hidden.size(0), heads_kv = k_cache.size(2), dim = k_cache.size(3);
  const std::vector<Segment> segs = parse_segments(segments, norms, delta_w, delta_dims, t, 1);
  TORCH_CHECK(w_qkv.size() == segs.size(), "one q|k|v weight per segment");
  const int64_t qw = heads_q * dim, kvw = heads_kv * dim;
  const torch::Tensor h = segment_rms_norm(hidden, segs, false, eps, c10::nullopt)[0];
  std::vector<torch::Tensor> w_kv;
  for (const torch::Tensor& w : w_qkv) {
    torch::Tensor cut = panel_columns(w, qw, 2 * kvw);
    if (!cut.defined()) break;
    w_kv.push_back(cut);
  }
  const bool kv_only = w_kv.size() == w_qkv.size();
  const std::vector<torch::Tensor>& ws = kv_only ? w_kv : w_qkv;
  const int64_t first = kv_only ? qw : 0;
  torch::Tensor out;
  if (segs.size() == 1 || std::all_of(w_qkv.begin(), w_qkv.end(), [&](const torch::Tensor& w) {
        return w.is_same(w_qkv[0]);
      })) {
    out = packed_matmul(h, ws[0]);
    add_deltas(out, h, segs, 0, first);
  } else {  // per-depth weights: each segment's GEMM into its rows, then its delta (if any)
    out = torch::empty({t, qw + 2 * kvw - first}, hidden.options());
    for (size_t i = 0; i < segs.size(); ++i) {
      const int64_t n = segs[i].hi - segs[i].lo;
      out.narrow(0, segs[i].lo, n).copy_(packed_matmul(h.narrow(0, segs[i].lo, n), ws[i]));
      add_deltas(out, h, {segs[i]}, 0, first);
    }
  }
  TORCH_CHECK(out.size(1) == qw + 2 * kvw - first, "the q|k|v weight does not match the heads");
  torch::Tensor k = out.narrow(1, qw - first, kvw).view({t, heads_kv, dim});
  const torch::Tensor v = out.narrow(1, qw + kvw - first, kvw).view({t, heads_kv, dim});
  rope_(k, cos, sin);
  write_kv(k, v, k_cache, v_cache, slots);
}

// fill_kv_layer for every layer of the block in one call: the per-layer Python (argument
// lists, RoPE selection, the binding's conversions) ran once a layer before.
void fill_kv_layers(const torch::Tensor& hidden, const std::vector<int64_t>& segments,
                    const std::vector<std::vector<torch::Tensor>>& norms,
                    const std::vector<std::vector<c10::optional<torch::Tensor>>>& delta_w,
                    const std::vector<std::vector<int64_t>>& delta_dims, double eps,
                    const std::vector<std::vector<torch::Tensor>>& w_qkv,
                    const std::vector<torch::Tensor>& cos, const std::vector<torch::Tensor>& sin,
                    std::vector<torch::Tensor>& k_caches, std::vector<torch::Tensor>& v_caches,
                    const torch::Tensor& slots, int64_t heads_q) {
  const size_t layers = k_caches.size();
  TORCH_CHECK(norms.size() == layers && delta_w.size() == layers && delta_dims.size() == layers &&
                  w_qkv.size() == layers && cos.size() == layers && sin.size() == layers &&
                  v_caches.size() == layers,
              "one entry per layer in every list");
  for (size_t l = 0; l < layers; ++l) {
    fill_kv_layer(hidden, segments, norms[l], delta_w[l], delta_dims[l], eps, w_qkv[l], cos[l],
                  sin[l], k_caches[l], v_caches[l], slots, heads_q);
  }
}

}  // namespace

// every kernel lets go of the GIL: the event loop's thread runs while a step computes
using nogil = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (one query row per sequence)", nogil());
  m.def("row_max_lse", &row_max_lse, "per-row argmax, max and log-sum-exp of logits", nogil());
  m.def("rms_norm", &rms_norm, "RMSNorm of rows, optionally after a residual add", nogil());
  m.def("rope_", &rope_, "rotate-half RoPE in place", nogil());
  m.def("silu_mul", &silu_mul, "silu(gate) * up", nogil());
  m.def("write_kv", &write_kv, "write K/V rows into the paged caches", nogil());
  m.def("panel_gemm", &panel_gemm, "x @ a bf16 weight stored as 64-column panels", nogil());
  m.def("panel_gemm_built", [] { return kPanelGemm; }, "whether panel_gemm was built");
  m.def("panel_gemm_f32", &panel_gemm_f32, "x @ a float32 weight stored as 16-column panels", nogil());
  m.def("panel_f32_built", [] { return kPanelF32; }, "whether panel_gemm_f32 was built");
  m.def("panel_width", &panel_width, "the fastest panel width for k input columns (0: oneDNN)");
  m.def("amx_takes", &amx_takes, "whether 32-column panels over k input columns can run");
  m.def("prefill_chunks", &prefill_chunks, "paged attention of prefill chunks", nogil());
  m.def("packed_linear", &packed_linear, "x @ a weight in oneDNN's packed layout", nogil());
  m.def("gemm_rows", &gemm_rows, "the row count packed_linear calls oneDNN with for m rows");
  m.def("decode_layer", &decode_layer, "one Llama-family block layer over a step", nogil());
  m.def("low_rank_delta", &low_rank_delta, "x @ one transposed float32 low-rank delta", nogil());
  m.def("fill_kv_layers", &fill_kv_layers, "K/V of exited rows at the depths they skipped, every layer", nogil());
}

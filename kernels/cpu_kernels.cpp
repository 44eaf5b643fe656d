// C++ kernels of the CPU path, built by kernels/cpu_kernels.py on first use.
//
// paged_decode: paged decode attention, one query row per sequence, K/V read in place through
// the block table. The torch twin gathers every sequence's blocks into a padded copy, copies
// it again heads-major and runs two batched matmuls: four passes over K/V. This reads each
// cached K/V row (all KV heads of a token, contiguous) once, converting to float32; work is
// split over sequences with ATen's parallel_for (torch's intra-op threads).
//
// row_max_lse: per row of logits, the first argmax, the max and the log-sum-exp in two
// vectorised passes over the row (plus a scan to the max's first index), reading bf16 in place. The greedy token, its logprob (max - lse) and the
// exit confidence exp(max - lse) all follow, where torch would upcast the [R, V] logits to a
// float32 copy and pass over it four more times (max, sub, exp, sum) plus once for argmax.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

template <typename T>
void decode(const T* q, const T* kc, const T* vc, const int32_t* tables, const int32_t* lens,
            const int64_t* rows, const int32_t* windows, T* out, int64_t num_seqs, int64_t width, int64_t heads_q,
            int64_t heads_kv, int64_t dim, int64_t block_size, int64_t q_stride,
            int64_t out_stride, float scale) {
  const int64_t group = heads_q / heads_kv;
  const int64_t row = heads_kv * dim;  // one token's K (or V) row in the cache, all KV heads
  const int64_t width_q = heads_q * dim;
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(width_q), acc(width_q), kv(row), scores;
    for (int64_t s = begin; s < end; ++s) {
      // a sliding window sees the last `window` keys: positions [first, ctx)
      const int64_t ctx = lens[s];
      const int64_t window = windows != nullptr ? windows[s] : 0;
      const int64_t first = window > 0 && window < ctx ? ctx - window : 0;
      const int64_t len = ctx - first;
      const int32_t* table = tables + s * width;
      auto slot = [&](int64_t t) {  // cache slot of the t-th key seen
        const int64_t p = first + t;
        return static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size;
      };
      const T* qs = q + rows[s] * q_stride;
      for (int64_t j = 0; j < width_q; ++j) qf[j] = load(qs, j) * scale;
      scores.resize(heads_q * len);  // [Hq, len]
      for (int64_t t = 0; t < len; ++t) {
        const T* kp = kc + slot(t) * row;
#pragma omp simd
        for (int64_t j = 0; j < row; ++j) kv[j] = load(kp, j);
        for (int64_t hq = 0; hq < heads_q; ++hq) {
          const float* qh = qf.data() + hq * dim;
          const float* kh = kv.data() + (hq / group) * dim;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += qh[d] * kh[d];
          scores[hq * len + t] = dot;
        }
      }
      for (int64_t hq = 0; hq < heads_q; ++hq) {
        float* sh = scores.data() + hq * len;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) top = std::max(top, sh[t]);
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < len; ++t) {
          sh[t] = vexp(sh[t] - top);
          total += sh[t];
        }
        const float inv = 1.0f / total;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < len; ++t) {
        const T* vp = vc + slot(t) * row;
#pragma omp simd
        for (int64_t j = 0; j < row; ++j) kv[j] = load(vp, j);
        for (int64_t hq = 0; hq < heads_q; ++hq) {
          const float p = scores[hq * len + t];
          const float* vh = kv.data() + (hq / group) * dim;
          float* ah = acc.data() + hq * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ah[d] += p * vh[d];
        }
      }
      T* os = out + rows[s] * out_stride;
      for (int64_t j = 0; j < width_q; ++j) os[j] = static_cast<T>(acc[j]);
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
      for (int64_t i = 0; i < body; i += LANES)
        for (int64_t j = 0; j < LANES; ++j) {
          const float v = load(x, i + j);
          const bool more = v > part[j];
          part[j] = more ? v : part[j];
          first[j] = more ? i + j : first[j];
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
      for (int64_t j = 0; j < LANES; ++j) part[j] = 0.0f;
      for (int64_t i = 0; i < body; i += LANES)
        for (int64_t j = 0; j < LANES; ++j) part[j] += vexp(load(x, i + j) - best);
      float total = 0.0f;
      for (int64_t j = 0; j < LANES; ++j) total += part[j];
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (one query row per sequence)");
  m.def("row_max_lse", &row_max_lse, "per-row argmax, max and log-sum-exp of logits");
  m.def("rms_norm", &rms_norm, "RMSNorm of rows, optionally after a residual add");
  m.def("rope_", &rope_, "rotate-half RoPE in place");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
}

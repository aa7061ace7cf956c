// Fused L_qk on CPU: one pass over the inputs computes the loss terms and every gradient (see ops.h).
//
// Tokens are cut into fixed blocks of kBlockTokens (the unit of parallel work) and each block into chunks of
// kChunkTokens. For one side (queries, then keys) of one chunk:
//   X [Ht, chunk * D'] fp32 rotated teacher rows (head-major, so the mixing is one matrix product per chunk;
//                      D' = D rounded up to 8, zero padded)
//   T [Hs, chunk * D'] = W X, the mixed targets; then overwritten in place by w_n (R x_s - T), from which the
//                      student gradient row is written (R^T, scaled, in the student's dtype)
//   dW               += T X^T, kept as 16-lane partial sums per (i, j) for the block
// Both products are register-blocked loops on 16-float vectors (GCC vector extension: AVX-512 where the CPU has
// it, pairs of AVX2 registers otherwise). Per-block partials are reduced in block order after the parallel loop.
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"
#include "ops.h"

namespace laid_cpu {
namespace {

constexpr int64_t kChunkTokens = 4;

// Floats per token row in the chunk buffers: D rounded up to 8 (zero padded), so that a chunk row of
// kChunkTokens * padded_dim(D) floats is a whole number of the 32-float column blocks the products work on.
constexpr int64_t padded_dim(int64_t dim) { return (dim + 7) / 8 * 8; }

typedef float v16 __attribute__((vector_size(64)));

inline v16 loadu(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void storeu(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// Stops the compiler from folding a reused load into every instruction that reads it (GCC otherwise reloads the
// value from L1 once per use, which makes the products load-bound).
inline void keep_in_register(v16& v) {
#if defined(__x86_64__)
  asm volatile("" : "+v"(v));
#endif
}

// T[r, l] = sum_k W[r, k] X[k, l] for R rows r; W row stride K, X and T row stride L (L a multiple of 32).
template <int R>
__attribute__((noinline)) void mix_rows(const float* W, int64_t K, const float* X, int64_t L, float* T) {
  for (int64_t l = 0; l < L; l += 32) {
    v16 lo[R], hi[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = v16{};
    for (int64_t k = 0; k < K; ++k) {
      const v16 x_lo = loadu(X + k * L + l), x_hi = loadu(X + k * L + l + 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float w = W[r * K + k];
        lo[r] += w * x_lo;
        hi[r] += w * x_hi;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      storeu(T + r * L + l, lo[r]);
      storeu(T + r * L + l + 16, hi[r]);
    }
  }
}

// T [I, L] = W [I, K] X [K, L].
void mix(const float* W, int64_t I, int64_t K, const float* X, int64_t L, float* T) {
  constexpr int kRows = 6;
  int64_t i = 0;
  for (; i + kRows <= I; i += kRows) mix_rows<kRows>(W + i * K, K, X, L, T + i * L);
  const float* w = W + i * K;
  float* t = T + i * L;
  switch (I - i) {
    case 0: break;
    case 1: mix_rows<1>(w, K, X, L, t); break;
    case 2: mix_rows<2>(w, K, X, L, t); break;
    case 3: mix_rows<3>(w, K, X, L, t); break;
    case 4: mix_rows<4>(w, K, X, L, t); break;
    default: mix_rows<5>(w, K, X, L, t); break;
  }
}

// acc[ri * ld + rj] += lane-wise sum over l of A[ri, l] B[rj, l], for RI rows of A and RJ rows of B (stride L).
template <int RI, int RJ>
__attribute__((noinline)) void outer_tile(const float* A, const float* B, int64_t L, v16* acc, int64_t ld) {
  v16 sum[RI][RJ];
#pragma GCC unroll 16
  for (int a = 0; a < RI; ++a)
#pragma GCC unroll 16
    for (int b = 0; b < RJ; ++b) sum[a][b] = v16{};
  for (int64_t l = 0; l < L; l += 16) {
    v16 x[RI], y[RJ];
#pragma GCC unroll 4
    for (int a = 0; a < RI; ++a) x[a] = loadu(A + a * L + l);
#pragma GCC unroll 4
    for (int b = 0; b < RJ; ++b) {
      y[b] = loadu(B + b * L + l);
      keep_in_register(y[b]);
    }
#pragma GCC unroll 16
    for (int a = 0; a < RI; ++a)
#pragma GCC unroll 16
      for (int b = 0; b < RJ; ++b) sum[a][b] += x[a] * y[b];
  }
#pragma GCC unroll 16
  for (int a = 0; a < RI; ++a)
#pragma GCC unroll 16
    for (int b = 0; b < RJ; ++b) acc[a * ld + b] += sum[a][b];
}

template <int RI>
void outer_rows(const float* A, const float* B, int64_t J, int64_t L, v16* acc) {
  int64_t j = 0;
  for (; j + 4 <= J; j += 4) outer_tile<RI, 4>(A, B + j * L, L, acc + j, J);
  switch (J - j) {
    case 0: break;
    case 1: outer_tile<RI, 1>(A, B + j * L, L, acc + j, J); break;
    case 2: outer_tile<RI, 2>(A, B + j * L, L, acc + j, J); break;
    default: outer_tile<RI, 3>(A, B + j * L, L, acc + j, J); break;
  }
}

// acc [I, J] (16-lane partial sums) += A [I, L] B [J, L]^T.
void outer(const float* A, int64_t I, const float* B, int64_t J, int64_t L, v16* acc) {
  int64_t i = 0;
  for (; i + 4 <= I; i += 4) outer_rows<4>(A + i * L, B, J, L, acc + i * J);
  switch (I - i) {
    case 0: break;
    case 1: outer_rows<1>(A + i * L, B, J, L, acc + i * J); break;
    case 2: outer_rows<2>(A + i * L, B, J, L, acc + i * J); break;
    default: outer_rows<3>(A + i * L, B, J, L, acc + i * J); break;
  }
}

// One side of the loss: student rows [B, N, Hs, D] aligned to W [Hs, Ht] times teacher rows [B, N, Ht, D].
struct Side {
  Rows student, teacher, grad;
  const float* mixing;
  int64_t hs, ht;
};

// Per-thread scratch.
struct Scratch {
  std::vector<float> teacher, target, row, cos, sin;
  std::vector<v16> mixing_grad;  // [Hs * Ht + Hs_kv * Ht_kv] lane-wise partial sums of one block
};

// Processes tokens [first, first + count) (count <= kChunkTokens, of `tokens` in all) of one side; cos / sin
// [count, D/2] are the angles of the chunk's tokens, or null for rope=False. Adds w_n ||R x_s - T||^2 to *numerator,
// w_n ||T||^2 to *target_norm and T X^T to mixing_grad.
void chunk_side(const Side& side, const float* weight, int64_t first, int64_t count, int64_t tokens,
                const float* cos, const float* sin, float grad_scale, Scratch& s, v16* mixing_grad,
                double* numerator, double* target_norm) {
  const int64_t dim = side.student.dim, half = dim / 2, stride = padded_dim(dim), L = kChunkTokens * stride;
  float* X = s.teacher.data();
  float* T = s.target.data();
  float* row = s.row.data();
  for (int64_t t = 0; t < kChunkTokens; ++t) {  // token-major: reads each token's heads in memory order
    const float* cos_t = cos ? cos + t * half : nullptr;
    const float* sin_t = sin ? sin + t * half : nullptr;
    for (int64_t j = 0; j < side.ht; ++j) {
      float* x = X + j * L + t * stride;
      std::fill(x, x + stride, 0.0f);
      if (t < count && weight[first + t] != 0.0f) {
        load_row(side.teacher.row(first + t, j), side.teacher.type, x, dim, cos_t, sin_t);
      }
    }
  }
  // While the products run, the next chunk's rows of this side stream in (the loads above wait on memory else).
  for (int64_t t = first + count; t < std::min(first + count + kChunkTokens, tokens); ++t) {
    for (int64_t j = 0; j < side.ht; ++j) side.teacher.prefetch(t, j);
    for (int64_t i = 0; i < side.hs; ++i) side.student.prefetch(t, i);
  }
  mix(side.mixing, side.hs, side.ht, X, L, T);
  for (int64_t t = 0; t < kChunkTokens; ++t) {
    const float w = t < count ? weight[first + t] : 0.0f;
    const float* cos_t = cos ? cos + t * half : nullptr;
    const float* sin_t = sin ? sin + t * half : nullptr;
    for (int64_t i = 0; i < side.hs; ++i) {
      float* d = T + i * L + t * stride;
      std::fill(d + dim, d + stride, 0.0f);
      if (w == 0.0f) {  // padding (or past the end): no contribution, zero gradient
        std::fill(d, d + dim, 0.0f);
        if (t < count) std::memset(side.grad.row(first + t, i), 0, dim * side.grad.itemsize);
        continue;
      }
      load_row(side.student.row(first + t, i), side.student.type, row, dim, cos_t, sin_t);
      float diff_norm = 0.0f, tgt_norm = 0.0f;
#pragma omp simd reduction(+ : diff_norm, tgt_norm)
      for (int64_t e = 0; e < dim; ++e) {
        const float target = d[e], diff = row[e] - target;
        tgt_norm += target * target;
        diff_norm += diff * diff;
        d[e] = w * diff;
        row[e] = w * diff;
      }
      *numerator += static_cast<double>(w * diff_norm);
      *target_norm += static_cast<double>(w * tgt_norm);
      store_row(row, grad_scale, side.grad.row(first + t, i), side.grad.type, dim, cos_t, sin_t, -1.0f);
    }
  }
  outer(T, side.hs, X, side.ht, L, mixing_grad);
}

float lane_sum(v16 v) {
  float total = 0.0f;
  for (int lane = 0; lane < 16; ++lane) total += v[lane];
  return total;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_align(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
    const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& positions, const at::Tensor& inv_freq,
    int64_t s0, int64_t s1, const at::Tensor& weight, bool rope, double grad_scale) {
  for (const at::Tensor* x : {&q_s, &k_s, &q_t, &k_t}) {
    TORCH_CHECK(x->dim() == 4 && x->stride(3) == 1, "qk_align: inputs must be [B, N, H, D], last dim contiguous");
  }
  TORCH_CHECK(w_q.is_contiguous() && w_q.scalar_type() == at::kFloat && w_k.is_contiguous() &&
                  w_k.scalar_type() == at::kFloat, "qk_align: w_q / w_k must be contiguous fp32");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat, "qk_align: weight must be fp32");
  at::Tensor grad_q_s = empty_output(q_s.sizes(), q_s.options());
  at::Tensor grad_k_s = empty_output(k_s.sizes(), k_s.options());
  const Side sides[2] = {{Rows(q_s), Rows(q_t), Rows(grad_q_s), w_q.data_ptr<float>(), q_s.size(2), q_t.size(2)},
                         {Rows(k_s), Rows(k_t), Rows(grad_k_s), w_k.data_ptr<float>(), k_s.size(2), k_t.size(2)}};
  const Rope rotation(positions, inv_freq, s0, s1);
  const float* w = weight.data_ptr<float>();
  const int64_t tokens = q_s.size(0) * q_s.size(1), dim = q_s.size(3), half = dim / 2;
  const int64_t blocks = (tokens + kBlockTokens - 1) / kBlockTokens;
  const int64_t q_pairs = sides[0].hs * sides[0].ht, pairs = q_pairs + sides[1].hs * sides[1].ht;
  const int64_t max_heads = std::max(std::max(sides[0].hs, sides[0].ht), std::max(sides[1].hs, sides[1].ht));

  std::vector<float> block_grad(blocks * pairs);
  std::vector<double> block_numerator(blocks), block_target(blocks);

  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
    Scratch s;
    s.teacher.resize(max_heads * kChunkTokens * padded_dim(dim));
    s.target.resize(max_heads * kChunkTokens * padded_dim(dim));
    s.row.resize(dim);
    s.cos.resize(kBlockTokens * half);
    s.sin.resize(kBlockTokens * half);
    s.mixing_grad.resize(pairs);
    for (int64_t block = first_block; block < last_block; ++block) {
      const int64_t first = block * kBlockTokens, count = std::min(kBlockTokens, tokens - first);
      if (rope) rotation.cos_sin(first, count, s.cos.data(), s.sin.data());
      std::fill(s.mixing_grad.begin(), s.mixing_grad.end(), v16{});
      double numerator = 0.0, target_norm = 0.0;
      for (int64_t chunk = 0; chunk < count; chunk += kChunkTokens) {
        const int64_t n = std::min(kChunkTokens, count - chunk);
        const float* cos = rope ? s.cos.data() + chunk * half : nullptr;
        const float* sin = rope ? s.sin.data() + chunk * half : nullptr;
        for (int side = 0; side < 2; ++side) {
          chunk_side(sides[side], w, first + chunk, n, tokens, cos, sin, static_cast<float>(grad_scale), s,
                     s.mixing_grad.data() + (side ? q_pairs : 0), &numerator, &target_norm);
        }
      }
      for (int64_t p = 0; p < pairs; ++p) block_grad[block * pairs + p] = lane_sum(s.mixing_grad[p]);
      block_numerator[block] = numerator;
      block_target[block] = target_norm;
    }
  });

  // Fixed-order reduction over blocks.
  std::vector<double> grad(pairs, 0.0);
  double numerator = 0.0, target_norm = 0.0;
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t p = 0; p < pairs; ++p) grad[p] += block_grad[block * pairs + p];
    numerator += block_numerator[block];
    target_norm += block_target[block];
  }
  at::Tensor grad_w_q = at::empty({sides[0].hs, sides[0].ht}, w_q.options());
  at::Tensor grad_w_k = at::empty({sides[1].hs, sides[1].ht}, w_k.options());
  float* gq = grad_w_q.data_ptr<float>();
  float* gk = grad_w_k.data_ptr<float>();
  for (int64_t p = 0; p < pairs; ++p) {
    const float g = static_cast<float>(-grad_scale * grad[p]);
    if (p < q_pairs) gq[p] = g; else gk[p - q_pairs] = g;
  }
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  return {at::scalar_tensor(numerator, f64), at::scalar_tensor(target_norm, f64), grad_q_s, grad_k_s, grad_w_q,
          grad_w_k};
}

}  // namespace laid_cpu

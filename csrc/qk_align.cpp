// Fused L_qk on CPU: one pass over the inputs computes the per-head loss terms and the gradients of the squared
// error (see ops.h); qk_align_rescale is the backward's in-place per-head rescaling of the saved gradient.
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
// Frequency mixing (complex C [Hs, Ht, D/2] per RoPE pair) replaces both products by per-frequency complex ones
// (complex_mix, complex_outer); its dC partials ([2, Hs, Ht, D/2] per unit) are summed per fixed group of
// kFrequencyGroupBlocks blocks (fp32 within a block, fp64 across the group's blocks), groups in order.
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"
#include "ops.h"

namespace laid_cpu {
namespace {

constexpr int64_t kChunkTokens = 4;
// Blocks per unit of parallel work for frequency mixing (4096 tokens): its per-unit dC partials are
// 2 * (Hs Ht + Hs_kv Ht_kv) * D/2 doubles (1.2 MB for 7B / 32B heads), so units are larger than for head mixing.
constexpr int64_t kFrequencyGroupBlocks = 64;

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
// value from L1 once per use, which makes the products load-bound). Only with AVX-512, where a v16 fits one
// register: on an AVX2-only CPU the constraint is impossible (a compile error), and the compiler splits v16 in two.
inline void keep_in_register(v16& v) {
#if defined(__x86_64__) && defined(__AVX512F__)
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

// T [I, L] = C X for frequency mixing: for every chunk token t (row offset t * stride) and frequency f < half,
// T[i, f] + i T[i, f + half] = sum_j C[i, j, f] (X[j, f] + i X[j, f + half]); C = Cr + i Ci, each [I, J, half].
void complex_mix(const float* Cr, const float* Ci, int64_t I, int64_t J, int64_t half, const float* X, int64_t L,
                 int64_t stride, float* T) {
  std::fill(T, T + I * L, 0.0f);
  for (int64_t i = 0; i < I; ++i) {
    for (int64_t j = 0; j < J; ++j) {
      const float* cr = Cr + (i * J + j) * half;
      const float* ci = Ci + (i * J + j) * half;
      for (int64_t t = 0; t < kChunkTokens; ++t) {
        const float* x = X + j * L + t * stride;
        float* out = T + i * L + t * stride;
#pragma omp simd
        for (int64_t f = 0; f < half; ++f) {
          const float re = x[f], im = x[f + half];
          out[f] += cr[f] * re - ci[f] * im;
          out[f + half] += cr[f] * im + ci[f] * re;
        }
      }
    }
  }
}

// grad_r / grad_i [I, J, half] += sum over chunk tokens of conj(X_j,f) times D_i,f split as
// grad_r += D_re X_re + D_im X_im and grad_i += D_im X_re - D_re X_im (D [I, L], X [J, L] in the chunk layout).
void complex_outer(const float* D, int64_t I, const float* X, int64_t J, int64_t half, int64_t L, int64_t stride,
                   float* grad_r, float* grad_i) {
  for (int64_t i = 0; i < I; ++i) {
    for (int64_t j = 0; j < J; ++j) {
      float* gr = grad_r + (i * J + j) * half;
      float* gi = grad_i + (i * J + j) * half;
      for (int64_t t = 0; t < kChunkTokens; ++t) {
        const float* d = D + i * L + t * stride;
        const float* x = X + j * L + t * stride;
#pragma omp simd
        for (int64_t f = 0; f < half; ++f) {
          gr[f] += d[f] * x[f] + d[f + half] * x[f + half];
          gi[f] += d[f + half] * x[f] - d[f] * x[f + half];
        }
      }
    }
  }
}

// One side of the loss: student rows [B, N, Hs, D] aligned to the mix of teacher rows [B, N, Ht, D]: W [Hs, Ht]
// (head mixing, frequency false) or C [2, Hs, Ht, D/2] (frequency mixing: real parts, then imaginary parts).
struct Side {
  Rows student, teacher, grad;
  const float* mixing;
  int64_t hs, ht;
  bool frequency;
  bool grads;  // false: G and dW are neither computed nor written (no input needs a gradient)
  const Rows* rotated_student;  // debug outputs (null: not written): the rotated rows as the kernel uses them
  const Rows* rotated_teacher;
};

// Per-thread scratch.
struct Scratch {
  std::vector<float> teacher, target, row, cos, sin;
  std::vector<v16> mixing_grad;    // head mixing: [Hs * Ht + Hs_kv * Ht_kv] lane-wise partial sums of one block
  std::vector<float> complex_grad;  // frequency mixing: [2 * (Hs * Ht + Hs_kv * Ht_kv) * D/2] sums of one block
};

// Processes tokens [first, first + count) (count <= kChunkTokens, of `tokens` in all) of one side; cos / sin
// [count, D/2] are the angles of the chunk's tokens, or null for rope=False. Adds, per student head i,
// w_n ||R x_s - T||^2, w_n ||x_s||^2 and w_n ||T||^2 to head_sums[i], head_sums[hs + i], head_sums[2 hs + i], and
// T X^T (head mixing, to mixing_grad) or its complex form (frequency mixing, to complex_grad), and writes the
// student's gradient rows, unless side.grads is false.
void chunk_side(const Side& side, const float* weight, int64_t first, int64_t count, int64_t tokens,
                const float* cos, const float* sin, float grad_scale, Scratch& s, v16* mixing_grad,
                float* complex_grad, double* head_sums) {
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
        if (side.rotated_teacher) std::memcpy(side.rotated_teacher->row(first + t, j), x, dim * sizeof(float));
      }
    }
  }
  // While the products run, the next chunk's rows of this side stream in (the loads above wait on memory else).
  for (int64_t t = first + count; t < std::min(first + count + kChunkTokens, tokens); ++t) {
    for (int64_t j = 0; j < side.ht; ++j) side.teacher.prefetch(t, j);
    for (int64_t i = 0; i < side.hs; ++i) side.student.prefetch(t, i);
  }
  const int64_t pairs = side.hs * side.ht * half;
  if (side.frequency) {
    complex_mix(side.mixing, side.mixing + pairs, side.hs, side.ht, half, X, L, stride, T);
  } else {
    mix(side.mixing, side.hs, side.ht, X, L, T);
  }
  for (int64_t t = 0; t < kChunkTokens; ++t) {
    const float w = t < count ? weight[first + t] : 0.0f;
    const float* cos_t = cos ? cos + t * half : nullptr;
    const float* sin_t = sin ? sin + t * half : nullptr;
    for (int64_t i = 0; i < side.hs; ++i) {
      float* d = T + i * L + t * stride;
      std::fill(d + dim, d + stride, 0.0f);
      if (w == 0.0f) {  // padding (or past the end): no contribution, zero gradient
        std::fill(d, d + dim, 0.0f);
        if (t < count && side.grads) std::memset(side.grad.row(first + t, i), 0, dim * side.grad.itemsize);
        continue;
      }
      load_row(side.student.row(first + t, i), side.student.type, row, dim, cos_t, sin_t);
      if (side.rotated_student) std::memcpy(side.rotated_student->row(first + t, i), row, dim * sizeof(float));
      float diff_norm = 0.0f, tgt_norm = 0.0f, energy = 0.0f;
#pragma omp simd reduction(+ : diff_norm, tgt_norm, energy)
      for (int64_t e = 0; e < dim; ++e) {
        const float target = d[e], diff = row[e] - target;
        energy += row[e] * row[e];
        tgt_norm += target * target;
        diff_norm += diff * diff;
        d[e] = w * diff;
        row[e] = w * diff;
      }
      head_sums[i] += static_cast<double>(w * diff_norm);
      head_sums[side.hs + i] += static_cast<double>(w * energy);
      head_sums[2 * side.hs + i] += static_cast<double>(w * tgt_norm);
      if (side.grads) {
        store_row(row, grad_scale, side.grad.row(first + t, i), side.grad.type, dim, cos_t, sin_t, -1.0f);
      }
    }
  }
  if (!side.grads) return;
  if (side.frequency) {
    complex_outer(T, side.hs, X, side.ht, half, L, stride, complex_grad, complex_grad + pairs);
  } else {
    outer(T, side.hs, X, side.ht, L, mixing_grad);
  }
}

float lane_sum(v16 v) {
  float total = 0.0f;
  for (int lane = 0; lane < 16; ++lane) total += v[lane];
  return total;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_align(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
    const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& positions, const at::Tensor& inv_freq,
    int64_t s0, int64_t s1, const at::Tensor& weight, bool rope, bool frequency, double grad_scale, bool grads,
    const c10::optional<at::TensorList>& rotated) {
  for (const at::Tensor* x : {&q_s, &k_s, &q_t, &k_t}) {
    TORCH_CHECK(x->dim() == 4 && x->stride(3) == 1, "qk_align: inputs must be [B, N, H, D], last dim contiguous");
  }
  TORCH_CHECK(w_q.is_contiguous() && w_q.scalar_type() == at::kFloat && w_k.is_contiguous() &&
                  w_k.scalar_type() == at::kFloat, "qk_align: w_q / w_k must be contiguous fp32");
  TORCH_CHECK(w_q.dim() == (frequency ? 4 : 2) && w_k.dim() == w_q.dim(),
              "qk_align: w_q / w_k must be [Hs, Ht] (head mixing) or [2, Hs, Ht, D/2] (frequency mixing)");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat, "qk_align: weight must be fp32");
  // G is fp32 for fp16 inputs: 2 w (R x_s - target) overflows fp16 long before the scaled gradient does.
  const auto grad_options = [](const at::Tensor& x) {
    return x.scalar_type() == at::kHalf ? x.options().dtype(at::kFloat) : x.options();
  };
  // Without grads, [0, 0, 0, 0] placeholders (never written).
  const auto grad_sizes = [grads](const at::Tensor& x) {
    return grads ? x.sizes().vec() : std::vector<int64_t>{0, 0, 0, 0};
  };
  at::Tensor grad_q_s = empty_output(grad_sizes(q_s), grad_options(q_s));
  at::Tensor grad_k_s = empty_output(grad_sizes(k_s), grad_options(k_s));
  std::vector<Rows> debug;  // rotated q_s, q_t, k_s, k_t: fp32 contiguous, like the inputs
  if (rotated.has_value()) {
    TORCH_CHECK(rotated->size() == 4, "qk_align: rotated must hold 4 tensors (q_s, q_t, k_s, k_t)");
    int index = 0;
    for (const at::Tensor* x : {&q_s, &q_t, &k_s, &k_t}) {
      const at::Tensor& r = (*rotated)[index++];
      TORCH_CHECK(r.sizes() == x->sizes() && r.is_contiguous() && r.scalar_type() == at::kFloat,
                  "qk_align: rotated tensors must be contiguous fp32 with the inputs' shapes");
      debug.emplace_back(r);
    }
  }
  const bool dump = !debug.empty();
  const Side sides[2] = {
      {Rows(q_s), Rows(q_t), Rows(grad_q_s), w_q.data_ptr<float>(), q_s.size(2), q_t.size(2), frequency, grads,
       dump ? &debug[0] : nullptr, dump ? &debug[1] : nullptr},
      {Rows(k_s), Rows(k_t), Rows(grad_k_s), w_k.data_ptr<float>(), k_s.size(2), k_t.size(2), frequency, grads,
       dump ? &debug[2] : nullptr, dump ? &debug[3] : nullptr}};
  const Rope rotation(positions, inv_freq, s0, s1);
  const float* w = weight.data_ptr<float>();
  const int64_t tokens = q_s.size(0) * q_s.size(1), dim = q_s.size(3), half = dim / 2;
  const int64_t blocks = (tokens + kBlockTokens - 1) / kBlockTokens;
  const int64_t q_pairs = sides[0].hs * sides[0].ht, pairs = q_pairs + sides[1].hs * sides[1].ht;
  const int64_t max_heads = std::max(std::max(sides[0].hs, sides[0].ht), std::max(sides[1].hs, sides[1].ht));
  const int64_t heads = sides[0].hs + sides[1].hs;
  // Units of parallel work: one block (head mixing) or a group of blocks (frequency mixing, whose per-unit dC
  // partials are large); either way a fixed partition of the tokens, reduced in unit order.
  const int64_t unit_blocks = frequency ? kFrequencyGroupBlocks : 1;
  const int64_t units = (blocks + unit_blocks - 1) / unit_blocks;
  const int64_t grad_size = !grads ? 0 : frequency ? 2 * pairs * half : pairs;

  std::vector<double> unit_grad(units * grad_size);
  std::vector<double> unit_sums(units * 3 * heads, 0.0);

  at::parallel_for(0, units, 1, [&](int64_t first_unit, int64_t last_unit) {
    Scratch s;
    s.teacher.resize(max_heads * kChunkTokens * padded_dim(dim));
    s.target.resize(max_heads * kChunkTokens * padded_dim(dim));
    s.row.resize(dim);
    s.cos.resize(kBlockTokens * half);
    s.sin.resize(kBlockTokens * half);
    if (frequency) s.complex_grad.resize(grad_size); else s.mixing_grad.resize(grad_size);
    for (int64_t unit = first_unit; unit < last_unit; ++unit) {
      double* grad = unit_grad.data() + unit * grad_size;
      std::fill(grad, grad + grad_size, 0.0);
      double* sums = unit_sums.data() + unit * 3 * heads;
      for (int64_t block = unit * unit_blocks; block < std::min(blocks, (unit + 1) * unit_blocks); ++block) {
        const int64_t first = block * kBlockTokens, count = std::min(kBlockTokens, tokens - first);
        if (rope) rotation.cos_sin(first, count, s.cos.data(), s.sin.data());
        std::fill(s.mixing_grad.begin(), s.mixing_grad.end(), v16{});
        std::fill(s.complex_grad.begin(), s.complex_grad.end(), 0.0f);
        for (int64_t chunk = 0; chunk < count; chunk += kChunkTokens) {
          const int64_t n = std::min(kChunkTokens, count - chunk);
          const float* cos = rope ? s.cos.data() + chunk * half : nullptr;
          const float* sin = rope ? s.sin.data() + chunk * half : nullptr;
          for (int side = 0; side < 2; ++side) {
            chunk_side(sides[side], w, first + chunk, n, tokens, cos, sin, static_cast<float>(grad_scale), s,
                       frequency ? nullptr : s.mixing_grad.data() + (side ? q_pairs : 0),
                       frequency ? s.complex_grad.data() + (side ? 2 * q_pairs * half : 0) : nullptr,
                       sums + (side ? 3 * sides[0].hs : 0));
          }
        }
        if (frequency) {
          for (int64_t p = 0; p < grad_size; ++p) grad[p] += s.complex_grad[p];
        } else {
          for (int64_t p = 0; p < grad_size; ++p) grad[p] += lane_sum(s.mixing_grad[p]);
        }
      }
    }
  });

  // Fixed-order reduction over units.
  std::vector<double> grad(grad_size, 0.0);
  at::Tensor head_sums = at::zeros({heads, 3}, at::TensorOptions().dtype(at::kDouble));
  double* sums = head_sums.data_ptr<double>();
  for (int64_t unit = 0; unit < units; ++unit) {
    for (int64_t p = 0; p < grad_size; ++p) grad[p] += unit_grad[unit * grad_size + p];
    for (int side = 0; side < 2; ++side) {  // unit layout [side][E | S | T][head] -> [head, (E, S, T)]
      const int64_t hs = sides[side].hs, offset = side ? sides[0].hs : 0;
      const double* unit_side = unit_sums.data() + unit * 3 * heads + (side ? 3 * sides[0].hs : 0);
      for (int64_t i = 0; i < hs; ++i) {
        for (int k = 0; k < 3; ++k) sums[(offset + i) * 3 + k] += unit_side[k * hs + i];
      }
    }
  }
  at::Tensor grad_w_q = grads ? at::empty(w_q.sizes(), w_q.options()) : at::empty({0}, w_q.options());
  at::Tensor grad_w_k = grads ? at::empty(w_k.sizes(), w_k.options()) : at::empty({0}, w_k.options());
  float* gq = grad_w_q.data_ptr<float>();
  float* gk = grad_w_k.data_ptr<float>();
  // Layouts: head mixing [q pairs | k pairs]; frequency mixing [q real | q imag | k real | k imag] (each
  // [H_s, H_t, D/2]), which are w_q's then w_k's [2, H_s, H_t, D/2].
  const int64_t q_size = frequency ? 2 * q_pairs * half : q_pairs;
  for (int64_t p = 0; p < grad_size; ++p) {
    const float g = static_cast<float>(-grad_scale * grad[p]);
    if (p < q_size) gq[p] = g; else gk[p - q_size] = g;
  }
  return {head_sums, grad_q_s, grad_k_s, grad_w_q, grad_w_k};
}

void qk_align_rescale(const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                      const c10::optional<at::Tensor>& weight, const at::Tensor& alpha, const at::Tensor& beta) {
  TORCH_CHECK(grad.dim() == 4 && grad.is_contiguous(), "qk_align_rescale: grad must be contiguous [B, N, H, D]");
  TORCH_CHECK(alpha.is_contiguous() && alpha.scalar_type() == at::kFloat && alpha.numel() == grad.size(2) &&
                  beta.is_contiguous() && beta.scalar_type() == at::kFloat && beta.numel() == grad.size(2),
              "qk_align_rescale: alpha and beta must be contiguous fp32 [H]");
  const bool has_x = x.has_value();
  TORCH_CHECK(!has_x || (x->sizes() == grad.sizes() && x->stride(3) == 1 && weight.has_value() &&
                         weight->is_contiguous() && weight->scalar_type() == at::kFloat),
              "qk_align_rescale: x must be [B, N, H, D] like grad (last dim contiguous), with a contiguous fp32 "
              "weight [B, N]");
  const Rows grad_rows(grad);
  const int64_t tokens = grad.size(0) * grad.size(1), heads = grad.size(2), dim = grad.size(3);
  const int64_t blocks = (tokens + kBlockTokens - 1) / kBlockTokens;
  const float* a = alpha.data_ptr<float>();
  const float* b = beta.data_ptr<float>();
  const float* w = has_x ? weight->data_ptr<float>() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
    std::vector<float> g(dim), v(dim);
    const Rows* x_rows = nullptr;
    c10::optional<Rows> rows;
    if (has_x) {
      rows.emplace(*x);
      x_rows = &*rows;
    }
    for (int64_t token = first_block * kBlockTokens; token < std::min(tokens, last_block * kBlockTokens); ++token) {
      for (int64_t h = 0; h < heads; ++h) {
        char* out = grad_rows.row(token, h);
        load_row(out, grad_rows.type, g.data(), dim);
        const float coefficient = has_x ? b[h] * w[token] : 0.0f;
        if (coefficient != 0.0f) {
          load_row(x_rows->row(token, h), x_rows->type, v.data(), dim);
#pragma omp simd
          for (int64_t e = 0; e < dim; ++e) g[e] = a[h] * g[e] + coefficient * v[e];
        } else {
#pragma omp simd
          for (int64_t e = 0; e < dim; ++e) g[e] = a[h] * g[e];
        }
        store_row(g.data(), 1.0f, out, grad_rows.type, dim);
      }
    }
  });
}

}  // namespace laid_cpu

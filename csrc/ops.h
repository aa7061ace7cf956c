// The native CPU ops, registered with the dispatcher as laid_cpu::apply_mrope and laid_cpu::qk_align
// (csrc/register.cpp). The Python layer (laid_kernels/cpu.py) checks arguments, builds the per-token weight and
// wraps them in the public custom ops with autograd.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace laid_cpu {

// x [B, N, H, D] (last dim contiguous), positions [3, B, N] int64/int32 (any strides), inv_freq [D/2] fp32
// contiguous, sections s0, s1 (s2 = D/2 - s0 - s1). Returns R x, or R^T x when `inverse`, [B, N, H, D]
// contiguous in x's dtype.
at::Tensor apply_mrope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq, int64_t s0,
                       int64_t s1, bool inverse);

// Fused L_qk forward with the gradients of the squared error. q_s [B, N, Hs, D], k_s [B, N, Hs_kv, D],
// q_t [B, N, Ht, D], k_t [B, N, Ht_kv, D] (last dim contiguous, any dtype of fp32 / bf16 / fp16 each); the mixing
// w_q [Hs, Ht], w_k [Hs_kv, Ht_kv] (head mixing) or, with `frequency`, w_q [2, Hs, Ht, D/2], w_k [2, Hs_kv, Ht_kv,
// D/2] (complex C = w[0] + i w[1] per RoPE pair), fp32 contiguous; weight [B, N] fp32 contiguous (w_n, 0 on padding).
// With target m = the mix of R x_t, returns (head_sums, grad_q_s, grad_k_s, grad_w_q, grad_w_k):
//   head_sums [Hs + Hs_kv, 3] fp64: per student head (query heads, then kv heads) E_i = sum_n w_n ||R x_s,i - m_i||^2,
//                S_i = sum_n w_n ||x_s,i||^2, T_i = sum_n w_n ||m_i||^2
//   grad_x_s   = grad_scale * w_n R^T (R x_s - m), [B, N, H, D] contiguous in x_s's dtype (fp32 for fp16 x_s)
//   grad_W     = grad_scale / 2 times the gradient of sum_i E_i with respect to W (the layout of w_q / w_k), fp32
// i.e. grad_scale / 2 times the gradients of sum_i E_i. R is the identity when rope is false. With grads false
// (no input needs a gradient) only head_sums is computed; the four gradients are empty placeholders.
// rotated (a debug output for the tests, which cannot see the rotation in the loss): 4 contiguous fp32 tensors
// shaped as q_s, q_t, k_s, k_t that receive the rotated rows of the tokens with w_n != 0, as the kernel uses them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_align(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
    const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& positions, const at::Tensor& inv_freq,
    int64_t s0, int64_t s1, const at::Tensor& weight, bool rope, bool frequency, double grad_scale, bool grads,
    const c10::optional<at::TensorList>& rotated);

// The backward's rescaling, in place: grad[b, n, h] = alpha[h] grad[b, n, h] + beta[h] weight[b, n] x[b, n, h]
// (without x: alpha[h] grad[b, n, h]), in fp32, rounded once to grad's dtype. grad [B, N, H, D] contiguous;
// x [B, N, H, D] with a contiguous last dim, any float dtype; weight [B, N], alpha and beta [H] fp32 contiguous.
void qk_align_rescale(const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                      const c10::optional<at::Tensor>& weight, const at::Tensor& alpha, const at::Tensor& beta);

}  // namespace laid_cpu

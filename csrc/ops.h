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

// Fused L_qk forward with gradients. q_s [B, N, Hs, D], k_s [B, N, Hs_kv, D], q_t [B, N, Ht, D],
// k_t [B, N, Ht_kv, D] (last dim contiguous, any dtype of fp32 / bf16 / fp16 each), w_q [Hs, Ht] and
// w_k [Hs_kv, Ht_kv] fp32 contiguous, weight [B, N] fp32 contiguous (w_n, 0 on padding).
// Returns (numerator, target_norm, grad_q_s, grad_k_s, grad_w_q, grad_w_k):
//   numerator   = sum_n w_n sum_heads ||R x_s - W R x_t||^2   (fp64 scalar)
//   target_norm = sum_n w_n sum_heads ||W R x_t||^2            (fp64 scalar)
//   grad_x_s    = grad_scale * w_n R^T (R x_s - W R x_t), [B, N, H, D] contiguous in x_s's dtype
//   grad_W      = -grad_scale * sum_n w_n (R x_s - W R x_t) (R x_t)^T, fp32
// i.e. grad_scale / 2 times the gradients of the numerator. R is the identity when rope is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_align(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
    const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& positions, const at::Tensor& inv_freq,
    int64_t s0, int64_t s1, const at::Tensor& weight, bool rope, double grad_scale);

}  // namespace laid_cpu

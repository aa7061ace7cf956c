// Dispatcher registration of the native CPU ops (namespace laid_cpu; loaded by laid_kernels/cpu.py).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(laid_cpu, m) {
  m.def("apply_mrope(Tensor x, Tensor positions, Tensor inv_freq, int s0, int s1, bool inverse) -> Tensor");
  m.def("qk_align(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor w_q, Tensor w_k, Tensor positions, "
        "Tensor inv_freq, int s0, int s1, Tensor weight, bool rope, bool frequency, float grad_scale, bool grads, "
        "Tensor[]? rotated) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("qk_align_rescale(Tensor(a!) grad, Tensor? x, Tensor? weight, Tensor alpha, Tensor beta) -> ()");
}

TORCH_LIBRARY_IMPL(laid_cpu, CPU, m) {
  m.impl("apply_mrope", &laid_cpu::apply_mrope);
  m.impl("qk_align", &laid_cpu::qk_align);
  m.impl("qk_align_rescale", &laid_cpu::qk_align_rescale);
}

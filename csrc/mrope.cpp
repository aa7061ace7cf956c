// apply_mrope on CPU: out = R x (or R^T x for the gradient), x [B, N, H, D] with any strides whose last
// dimension is contiguous; out [B, N, H, D] contiguous in x's dtype, computed in fp32.
#include <ATen/Parallel.h>

#include "common.h"
#include "ops.h"

namespace laid_cpu {

at::Tensor apply_mrope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq, int64_t s0,
                       int64_t s1, bool inverse) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "apply_mrope: x must be [B, N, H, D] with a contiguous last dim");
  at::Tensor out = empty_output(x.sizes(), x.options());
  const Rows in_rows(x), out_rows(out);
  const Rope rope(positions, inv_freq, s0, s1);
  const int64_t tokens = x.size(0) * x.size(1), heads = x.size(2), dim = x.size(3), half = dim / 2;
  const int64_t blocks = (tokens + kBlockTokens - 1) / kBlockTokens;
  const float sign = inverse ? -1.0f : 1.0f;

  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
    std::vector<float> cos(kBlockTokens * half), sin(kBlockTokens * half), row(dim);
    for (int64_t block = first_block; block < last_block; ++block) {
      const int64_t first = block * kBlockTokens, count = std::min(kBlockTokens, tokens - first);
      rope.cos_sin(first, count, cos.data(), sin.data());
      for (int64_t t = 0; t < count; ++t) {
        for (int64_t h = 0; h < heads; ++h) {
          load_row(in_rows.row(first + t, h), in_rows.type, row.data(), dim, cos.data() + t * half,
                   sin.data() + t * half, sign);
          store_row(row.data(), 1.0f, out_rows.row(first + t, h), out_rows.type, dim);
        }
      }
    }
  });
  return out;
}

}  // namespace laid_cpu

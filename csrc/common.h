// Shared pieces of the native CPU kernels: strided [B, N, H, D] rows, dtype conversion to and from fp32 (inputs
// and outputs may be fp32, bf16, fp16 or fp64; arithmetic is fp32), the M-RoPE angles of a block of tokens and the
// rotate-half rotation.
//
// Every kernel works token by token on fp32 copies of single rows (one head of one token, D values): inputs are
// read in place through their strides (only the last dimension must be contiguous) and converted on load;
// outputs are written once, in their own dtype.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace laid_cpu {

// Tokens per unit of parallel work. The partition of tokens into blocks is fixed (it does not depend on the
// number of threads), and every per-block partial sum is reduced in block order: results are bit-identical
// whatever the thread count.
constexpr int64_t kBlockTokens = 64;

// A [B, N, H, D] tensor read (or written) one row of D values at a time.
struct Rows {
  char* data;
  at::ScalarType type;
  int64_t itemsize, seq, heads, dim;
  int64_t stride_b, stride_n, stride_h;  // in elements

  Rows(const at::Tensor& t)
      : data(static_cast<char*>(t.data_ptr())), type(t.scalar_type()), itemsize(t.element_size()),
        seq(t.size(1)), heads(t.size(2)), dim(t.size(3)), stride_b(t.stride(0)), stride_n(t.stride(1)),
        stride_h(t.stride(2)) {}

  // Row of head h of flat token index `token` (= b * N + n).
  char* row(int64_t token, int64_t h) const {
    const int64_t b = token / seq, n = token % seq;
    return data + (b * stride_b + n * stride_n + h * stride_h) * itemsize;
  }

  // Asks the CPU to start loading row (token, h) into its L2 cache.
  void prefetch(int64_t token, int64_t h) const {
    const char* p = row(token, h);
    for (int64_t offset = 0; offset < dim * itemsize; offset += 64) __builtin_prefetch(p + offset, 0, 2);
  }
};

// An uninitialised contiguous tensor for an output the kernel writes completely. Large ones are 2 MiB aligned and
// advised to use transparent huge pages on Linux: a first touch then costs one page fault per 2 MiB instead of per
// 4 KiB, which on the test VMs is most of the cost of writing a fresh 0.4 GB gradient (measured: 0.44 s -> 0.1 s).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  void* data = nullptr;
  if (bytes >= 4 * kHugePage && posix_memalign(&data, kHugePage, (bytes + kHugePage - 1) / kHugePage * kHugePage) == 0) {
    madvise(data, (bytes + kHugePage - 1) / kHugePage * kHugePage, MADV_HUGEPAGE);
    return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
  }
#endif
  return at::empty(sizes, options);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, NaN to the canonical quiet NaN: what torch's .to(torch.bfloat16) does.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// fp32 <-> storage type T (bf16 is handled as its uint16_t bits).
template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }
template <>
inline float to_float<uint16_t>(uint16_t v) { return bf16_to_float(v); }
template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }
template <>
inline uint16_t from_float<uint16_t>(float v) { return float_to_bf16(v); }

// dst = rotation of src (R, or R^T when sign = -1) for the rotate-half pairs (f, f + half), or a plain copy when
// cos is null; src read as T, dst written as U, times `scale`, arithmetic in fp32.
template <typename T, typename U>
inline void convert_row(const T* src, U* dst, int64_t half, const float* cos, const float* sin, float sign,
                        float scale) {
  if (cos == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < 2 * half; ++i) dst[i] = from_float<U>(to_float(src[i]) * scale);
    return;
  }
#pragma omp simd
  for (int64_t f = 0; f < half; ++f) {
    const float lo = to_float(src[f]), hi = to_float(src[f + half]), c = cos[f], s = sign * sin[f];
    dst[f] = from_float<U>((lo * c - hi * s) * scale);
    dst[f + half] = from_float<U>((hi * c + lo * s) * scale);
  }
}

// Calls fn with a null pointer of the C++ storage type of `type`.
template <typename Fn>
inline void with_storage_type(at::ScalarType type, Fn&& fn) {
  switch (type) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: fn(static_cast<uint16_t*>(nullptr)); break;
    case at::kHalf: fn(static_cast<at::Half*>(nullptr)); break;
    case at::kDouble: fn(static_cast<double*>(nullptr)); break;
    default: TORCH_CHECK(false, "laid_cpu: unsupported dtype ", type);
  }
}

// dst [D] fp32 = R src (sign 1) or R^T src (sign -1), src one row of `type`; cos / sin [D/2] of the row's token,
// or null for no rotation.
inline void load_row(const char* src, at::ScalarType type, float* dst, int64_t dim, const float* cos = nullptr,
                     const float* sin = nullptr, float sign = 1.0f) {
  with_storage_type(type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    convert_row(reinterpret_cast<const T*>(src), dst, dim / 2, cos, sin, sign, 1.0f);
  });
}

// dst (one row of `type`) = scale * (R src or R^T src, or src when cos is null), rounded once.
inline void store_row(const float* src, float scale, char* dst, at::ScalarType type, int64_t dim,
                      const float* cos = nullptr, const float* sin = nullptr, float sign = 1.0f) {
  with_storage_type(type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    convert_row(src, reinterpret_cast<T*>(dst), dim / 2, cos, sin, sign, scale);
  });
}

// M-RoPE inputs: positions [3, B, N] (any strides, int64 or int32), inv_freq [D/2] fp32 contiguous, and the
// section boundaries s0, s0 + s1 (frequency f reads position row 0 below s0, row 1 below s0 + s1, else row 2).
struct Rope {
  const char* positions;
  bool positions_int64;
  int64_t seq, stride_r, stride_b, stride_n;
  const float* inv_freq;
  int64_t half, section_t, section_th;

  Rope(const at::Tensor& pos, const at::Tensor& inv, int64_t s0, int64_t s1)
      : positions(static_cast<const char*>(pos.data_ptr())), positions_int64(pos.scalar_type() == at::kLong),
        seq(pos.size(2)), stride_r(pos.stride(0)), stride_b(pos.stride(1)), stride_n(pos.stride(2)),
        inv_freq(inv.data_ptr<float>()), half(inv.size(0)), section_t(s0), section_th(s0 + s1) {}

  float position(int64_t row, int64_t token) const {
    const int64_t offset = row * stride_r + (token / seq) * stride_b + (token % seq) * stride_n;
    return positions_int64 ? static_cast<float>(reinterpret_cast<const int64_t*>(positions)[offset])
                           : static_cast<float>(reinterpret_cast<const int32_t*>(positions)[offset]);
  }

  // cos and sin [count, D/2] of the angles of tokens [first, first + count): angle = fp32(position) * inv_freq[f]
  // in fp32, as transformers computes it; cos / sin are ATen's (the same vectorised functions the reference uses).
  void cos_sin(int64_t first, int64_t count, float* cos, float* sin) const {
    for (int64_t t = 0; t < count; ++t) {
      const float p[3] = {position(0, first + t), position(1, first + t), position(2, first + t)};
      float* angle = cos + t * half;
      for (int64_t f = 0; f < half; ++f) {
        const int row = f < section_t ? 0 : (f < section_th ? 1 : 2);
        angle[f] = p[row] * inv_freq[f];
      }
    }
    const auto options = at::TensorOptions().dtype(at::kFloat);
    at::Tensor c = at::from_blob(cos, {count * half}, options);
    at::Tensor s = at::from_blob(sin, {count * half}, options);
    at::sin_out(s, c);
    at::cos_out(c, c);
  }
};

}  // namespace laid_cpu

// GeGLU on CPU as one autograd node: y = gelu_tanh(gate) * up, one pass forward and one
// backward, where libtorch runs gelu, its backward and two multiplications as separate passes
// over the [tokens x intermediate] activations.
//
// gelu_tanh(a) = a/2 * (1 + t),  t = tanh(k * (a + c*a^3)),  k = sqrt(2/pi), c = 0.044715
// d gelu / da  = (1 + t)/2 + a/2 * (1 - t^2) * k * (1 + 3c*a^2)
// The forward keeps exp(-2|z|) for the backward, from which t's terms follow without another
// exponential.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include "ffi_error.h"

#include <cmath>
#include <cstdint>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kGrain = 1 << 14;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

// exp(x) for x <= 0 in plain arithmetic the compiler vectorises: x = n*ln2 + r with |r| <=
// ln2/2, exp(r) by its Taylor series to r^7 (remainder below 6e-9 relative), 2^n through the
// exponent bits. Below -87 the result is flushed to 0.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (|n| <= 126 here).
  const float n = (x * 1.4426950408889634f + 12582912.0f) - 12582912.0f;
  // ln2 split in two so that n * ln2_hi is exact.
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// 1 + tanh(z) without cancellation where tanh(z) nears -1: with e = exp(-2|z|), it is
// 2/(1 + e) for z >= 0 and 2e/(1 + e) below; and 1 - tanh(z)^2 = 4e/(1 + e)^2 either way. The
// sign of z is the sign of the gate value (z = k*a*(1 + c*a^2)), so only e is kept.
// `inv` is 1/(1 + e).
inline float one_plus_tanh(float a, float e, float inv) {
  return (a >= 0.0f ? 2.0f : 2.0f * e) * inv;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void forward_span(const float* gate, const float* up, float* y, float* e_out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float a = gate[i];
    const float z = kSqrt2OverPi * (a + kCubic * a * a * a);
    const float e = exp_nonpositive(-2.0f * std::fabs(z));
    e_out[i] = e;
    y[i] = 0.5f * a * one_plus_tanh(a, e, 1.0f / (1.0f + e)) * up[i];
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void backward_span(const float* g, const float* gate, const float* up, const float* e_in,
                   float* d_gate, float* d_up, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float a = gate[i];
    const float e = e_in[i];
    const float inv = 1.0f / (1.0f + e);
    const float s = one_plus_tanh(a, e, inv);
    const float sech2 = 4.0f * e * inv * inv;
    const float slope =
        0.5f * s + 0.5f * a * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kCubic * a * a);
    d_up[i] = g[i] * 0.5f * a * s;
    d_gate[i] = g[i] * up[i] * slope;
  }
}

struct GeGlu : public torch::autograd::Function<GeGlu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate_in,
                            const at::Tensor& up_in) {
    const at::Tensor gate = gate_in.contiguous();
    const at::Tensor up = up_in.contiguous();
    at::Tensor y = at::empty_like(gate);
    at::Tensor e = at::empty_like(gate);
    const float* gp = gate.data_ptr<float>();
    const float* up_p = up.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    float* ep = e.data_ptr<float>();
    at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
      forward_span(gp + begin, up_p + begin, yp + begin, ep + begin, end - begin);
    });
    ctx->save_for_backward({gate, up, e});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& gate = saved[0];
    const at::Tensor& up = saved[1];
    const at::Tensor& e = saved[2];
    const at::Tensor g = grad_outputs[0].contiguous();
    at::Tensor d_gate = at::empty_like(gate);
    at::Tensor d_up = at::empty_like(up);
    const float* gp = g.data_ptr<float>();
    const float* ap = gate.data_ptr<float>();
    const float* bp = up.data_ptr<float>();
    const float* ep = e.data_ptr<float>();
    float* dap = d_gate.data_ptr<float>();
    float* dbp = d_up.data_ptr<float>();
    at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
      backward_span(gp + begin, ap + begin, bp + begin, ep + begin, dap + begin, dbp + begin,
                    end - begin);
    });
    return {d_gate, d_up};
  }
};

}  // namespace

extern "C" at::Tensor* atoll_geglu_cpu(const at::Tensor* gate, const at::Tensor* up,
                                       char** error) {
  *error = nullptr;
  try {
    TORCH_CHECK(gate->device().is_cpu() && gate->scalar_type() == at::kFloat &&
                    up->device().is_cpu() && up->scalar_type() == at::kFloat,
                "the fused GeGLU takes f32 CPU tensors");
    TORCH_CHECK(gate->sizes() == up->sizes(), "GeGLU's gate and up must have the same shape");
    return new at::Tensor(GeGlu::apply(*gate, *up));
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return nullptr;
  }
}

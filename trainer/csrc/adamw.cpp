// One AdamW step over f32 CPU parameters in a single pass per tensor: the gradient (times the
// clipping scale) is read once, the parameter and both moments read and written once, and the
// gradient zeroed in the same pass (when the caller is done with it), where the composite update makes about ten passes and as
// many temporaries. The arithmetic is torch.optim.AdamW's, operation for operation:
//   p *= 1 - lr*wd (matrices only); m += (1 - b1)*(g - m); v = b2*v + ((1 - b2)*g)*g;
//   p += (m * (-lr/bias1)) / (sqrt(v)/sqrt(bias2) + eps)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "ffi_error.h"

namespace {

constexpr int64_t kGrain = 1 << 14;

struct Step {
  float lr, beta1, beta2, eps, decay_factor, bias2_sqrt, step_size, grad_scale;
};

__attribute__((target_clones("avx512f", "avx2", "default")))
void update_span(float* p, float* g, float* m, float* v, int64_t n, Step s, bool decay,
                 bool zero_grad) {
  const float one_minus_b1 = 1.0f - s.beta1;
  const float one_minus_b2 = 1.0f - s.beta2;
  // Multiplying by 1 is exact, so a tensor without decay takes the same loop.
  const float decay_factor = decay ? s.decay_factor : 1.0f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float grad_in = g[i];
    const float grad = grad_in * s.grad_scale;
    const float param = p[i] * decay_factor;
    const float mi = m[i] + one_minus_b1 * (grad - m[i]);
    const float vi = s.beta2 * v[i] + (one_minus_b2 * grad) * grad;
    const float denom = std::sqrt(vi) / s.bias2_sqrt + s.eps;
    p[i] = param + (mi * s.step_size) / denom;
    m[i] = mi;
    v[i] = vi;
    g[i] = zero_grad ? 0.0f : grad_in;
  }
}

bool is_f32_cpu_contiguous(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
         t.is_contiguous();
}

}  // namespace

// `n` parameters with their gradients and moments (libtorch tensors as tch holds them) and
// whether weight decay applies to each; zeroes the gradients when `zero_grads`; returns 0, or -1 with `*error` set to a malloc'd
// message (nothing is updated then).
extern "C" int atoll_adamw_cpu(at::Tensor* const* params, at::Tensor* const* grads,
                               at::Tensor* const* exp_avg, at::Tensor* const* exp_avg_sq,
                               const uint8_t* decay, int64_t n, double lr, double beta1,
                               double beta2, double eps, double weight_decay, double bias1,
                               double bias2, double grad_scale, int zero_grads, char** error) {
  *error = nullptr;
  try {
    for (int64_t k = 0; k < n; ++k) {
      const at::Tensor* ts[] = {params[k], grads[k], exp_avg[k], exp_avg_sq[k]};
      for (const at::Tensor* t : ts) {
        TORCH_CHECK(is_f32_cpu_contiguous(*t),
                    "the fused AdamW takes contiguous f32 CPU tensors (tensor ", k, ")");
        TORCH_CHECK(t->numel() == params[k]->numel(), "tensor ", k, ": sizes differ");
      }
    }
    const Step s{static_cast<float>(lr),
                 static_cast<float>(beta1),
                 static_cast<float>(beta2),
                 static_cast<float>(eps),
                 static_cast<float>(1.0 - lr * weight_decay),
                 static_cast<float>(std::sqrt(bias2)),
                 static_cast<float>(-lr / bias1),
                 static_cast<float>(grad_scale)};
    for (int64_t k = 0; k < n; ++k) {
      float* p = params[k]->data_ptr<float>();
      float* g = grads[k]->data_ptr<float>();
      float* m = exp_avg[k]->data_ptr<float>();
      float* v = exp_avg_sq[k]->data_ptr<float>();
      const bool d = decay[k] != 0 && weight_decay > 0.0;
      at::parallel_for(0, params[k]->numel(), kGrain, [&](int64_t begin, int64_t end) {
        update_span(p + begin, g + begin, m + begin, v + begin, end - begin, s, d, zero_grads != 0);
      });
    }
    return 0;
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return -1;
  }
}

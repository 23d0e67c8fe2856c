// RMSNorm on CPU as one autograd node: a forward pass and a backward pass over each row, where
// libtorch 2.11 has no CPU kernel (its rms_norm is a composite of about ten element-wise
// operators forward and as many backward, each a full pass over the activations).
//
// y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps)      (w optional)
// dx = rstd * (g*w) - x * rstd^3 * sum(g*w*x) / d
// dw = sum over rows of g * x * rstd
//
// Rows are split into fixed blocks, so the sums (and the weight gradient's per-block partials,
// added in block order) do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include "ffi_error.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace {

constexpr int64_t kRowsPerBlock = 32;

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

__attribute__((target_clones("avx512f", "avx2", "default")))
void forward_rows(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t d,
                  float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
    const float s = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    rstd[r] = s;
    if (w != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * s * w[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * s;
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void backward_rows(const float* g, const float* x, const float* w, const float* rstd, float* dx,
                   float* dw_partial, int64_t rows, int64_t d) {
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = g + r * d;
    const float* xr = x + r * d;
    float* dxr = dx + r * d;
    const float s = rstd[r];
    float dot = 0.0f;
    if (w != nullptr) {
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < d; ++j) dot += gr[j] * w[j] * xr[j];
      const float c = s * s * s * dot * inv_d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        dxr[j] = s * gr[j] * w[j] - c * xr[j];
        dw_partial[j] += gr[j] * xr[j] * s;
      }
    } else {
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < d; ++j) dot += gr[j] * xr[j];
      const float c = s * s * s * dot * inv_d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) dxr[j] = s * gr[j] - c * xr[j];
    }
  }
}

// The two passes over every block of rows; `w` undefined for a norm without weight.
at::Tensor forward_all(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& rstd) {
  const int64_t d = x.size(-1);
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  at::Tensor y = at::empty_like(x);
  rstd = at::empty({rows}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  float* sp = rstd.data_ptr<float>();
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * kRowsPerBlock;
      const int64_t n = std::min(kRowsPerBlock, rows - r0);
      forward_rows(xp + r0 * d, wp, yp + r0 * d, sp + r0, n, d, static_cast<float>(eps));
    }
  });
  return y;
}

// dx, and dw (undefined without a weight).
std::pair<at::Tensor, at::Tensor> backward_all(const at::Tensor& grad, const at::Tensor& x,
                                               const at::Tensor& w, const at::Tensor& rstd) {
  const at::Tensor g = grad.contiguous();
  const int64_t d = x.size(-1);
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  at::Tensor dx = at::empty_like(x);
  at::Tensor partial;
  float* pp = nullptr;
  if (w.defined()) {
    partial = at::zeros({blocks, d}, x.options());
    pp = partial.data_ptr<float>();
  }
  const float* gp = g.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* sp = rstd.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * kRowsPerBlock;
      const int64_t n = std::min(kRowsPerBlock, rows - r0);
      backward_rows(gp + r0 * d, xp + r0 * d, wp, sp + r0, dxp + r0 * d,
                    pp == nullptr ? nullptr : pp + b * d, n, d);
    }
  });
  // The blocks' partials in block order: the same sum for any thread count.
  return {dx, w.defined() ? partial.sum(0) : at::Tensor()};
}

// libtorch's custom functions take no undefined tensor as an input, so the norm with a weight
// and the one without are two functions.
struct WeightedRmsNorm : public torch::autograd::Function<WeightedRmsNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, double eps) {
    const at::Tensor x = input.contiguous();
    const at::Tensor w = weight.contiguous();
    at::Tensor rstd;
    at::Tensor y = forward_all(x, w, eps, rstd);
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, dw] = backward_all(grad_outputs[0], saved[0], saved[1], saved[2]);
    return {dx, dw, at::Tensor()};
  }
};

struct PlainRmsNorm : public torch::autograd::Function<PlainRmsNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, double eps) {
    const at::Tensor x = input.contiguous();
    at::Tensor rstd;
    at::Tensor y = forward_all(x, at::Tensor(), eps, rstd);
    ctx->save_for_backward({x, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, dw] = backward_all(grad_outputs[0], saved[0], at::Tensor(), saved[1]);
    return {dx, at::Tensor()};
  }
};

}  // namespace

// `input` and `weight` (null for none) are libtorch tensors as tch holds them; returns a new
// tensor, or null with `*error` set to a malloc'd message.
extern "C" at::Tensor* atoll_rms_norm_cpu(const at::Tensor* input, const at::Tensor* weight,
                                          double eps, char** error) {
  *error = nullptr;
  try {
    const at::Tensor w = weight == nullptr ? at::Tensor() : *weight;
    TORCH_CHECK(input->device().is_cpu() && input->scalar_type() == at::kFloat,
                "the fused RMSNorm takes f32 CPU tensors");
    TORCH_CHECK(!w.defined() || (w.device().is_cpu() && w.scalar_type() == at::kFloat &&
                                 w.dim() == 1 && w.size(0) == input->size(-1)),
                "the RMSNorm weight must be an f32 CPU vector of the last dimension's size");
    return new at::Tensor(w.defined() ? WeightedRmsNorm::apply(*input, w, eps)
                                      : PlainRmsNorm::apply(*input, eps));
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return nullptr;
  }
}

extern "C" void atoll_free_message(char* message) { std::free(message); }

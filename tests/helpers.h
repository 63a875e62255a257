// Shared test helpers: comparisons and a central-difference gradient check.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "flora/spec.h"

namespace flora_test {

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

/// max |a - b| relative to b's largest magnitude: a float32 result against a float64 reference.
inline double relative_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return max_abs_diff(a, b) / b.abs().max().item<double>();
}

/// Fills every tensor with N(0, std) under no-grad (to move adapters away from their zero init).
inline void randomize(const std::vector<torch::Tensor>& params, double std = 0.8) {
  torch::NoGradGuard g;
  for (auto p : params) p.normal_(0.0, std);
}

/// The message of the E that `f` throws, or "no error" when it throws none.
template <class E = flora::Error>
std::string error_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "no error";
}

/// Compares d loss / d p from autograd with central differences (double precision) for every
/// entry of every tensor in `params`. Returns the largest relative error found.
inline double finite_difference_error(const std::function<torch::Tensor()>& loss,
                                      const std::vector<torch::Tensor>& params, double eps = 1e-6) {
  for (auto p : params)
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
  loss().backward();
  double worst = 0.0;
  for (auto p : params) {
    auto analytic = p.grad().defined() ? p.grad().clone() : torch::zeros_like(p);
    auto flat = p.detach().view({-1});
    auto g = analytic.view({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      double numeric;
      {
        torch::NoGradGuard ng;
        const double orig = flat[i].item<double>();
        flat[i] = orig + eps;
        const double up = loss().item<double>();
        flat[i] = orig - eps;
        const double down = loss().item<double>();
        flat[i] = orig;
        numeric = (up - down) / (2 * eps);
      }
      const double a = g[i].item<double>();
      const double err = std::abs(a - numeric) / std::max(1.0, std::abs(numeric));
      worst = std::max(worst, err);
    }
  }
  return worst;
}

// LibTorch's intra-op thread count set for a scope (tests run on 1 thread unless they need the
// kernels' splits across threads), the old count put back after.
struct ScopedThreads {
  const int before = at::get_num_threads();
  explicit ScopedThreads(int n) { at::set_num_threads(n); }
  ~ScopedThreads() { at::set_num_threads(before); }
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;
};

}  // namespace flora_test

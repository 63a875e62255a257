// flora/adapter.h: one adapter's parameters (core G and factors U_n) for one weight.
//
// Usage:
//   1. auto spec = flora::resolve_spec(options, {"fc", LayerKind::Linear, {512, 256}});
//   2. flora::nn::TuckerAdapter a(spec, weight.options());   // allocates and initializes
//   3. a->delta_weight()  -> dW [512, 256];  a->core(), a->factors() for the factorized paths.
//
// Parameters are registered as `core` (Full core [r_0..r_{N-1}]), `core_diagonal` (Diagonal core
// [R]; the Identity core has none) and `factor_<n>` ([I_n, r_n], factored modes only).
// LoRA in PEFT's layout is the same module: core = lora_A ([r, in, k...]), factor_0 = lora_B
// ([out, r]); for Embedding, factor_0 = lora_embedding_A^T and core = lora_embedding_B^T.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <ostream>
#include <vector>

#include "flora/spec.h"

namespace flora {
namespace nn {

class TuckerAdapterImpl : public torch::nn::Module {
 public:
  /// Allocates the parameters of `spec` with `options` (dtype/device of the base weight) and
  /// initializes them as spec.init says.
  explicit TuckerAdapterImpl(AdapterSpec spec, torch::TensorOptions options = {});

  /// Re-draws every parameter according to spec().init.
  void reset_parameters();

  const AdapterSpec& spec() const { return spec_; }
  /// The full core G [r_0..r_{N-1}] (expands a diagonal or identity core).
  torch::Tensor core() const;
  /// U_n per mode; undefined tensors for identity modes.
  const std::vector<torch::Tensor>& factors() const { return factors_; }
  /// The stored core parameter (undefined for an Identity core).
  const torch::Tensor& core_parameter() const { return core_; }
  /// dW = s * G x_0 U_0 ... in the weight's shape. Under no-grad (inference) the result is
  /// cached until a parameter changes (keyed on tensor version counters) or the scale changes:
  /// eval forwards then cost one conv. Do not modify the returned tensor in place. `format`:
  /// the layout wanted (e.g. the base weight's, ChannelsLast), as functional::tucker_delta.
  torch::Tensor delta_weight(at::MemoryFormat format = at::MemoryFormat::Preserve) const;
  /// True when a no-grad delta_weight() would be served from the cache (in the layout it was
  /// built in: asking for another one rebuilds it).
  bool delta_cached() const;
  /// Training mode drops the cache (the parameters are about to change; a factorized training
  /// forward never reads it, and it would otherwise hold a weight-sized tensor per layer).
  void train(bool on = true) override;

  double scale() const { return spec_.scale; }
  /// Runtime scale change (e.g. to sweep s, or to fade an adapter); must be finite.
  void set_scale(double scale);
  /// Forces a conv path (Auto: the cost model). Throws when the path cannot run on this weight
  /// (Separable needs a 2-d conv with in/groups == 1), naming the layer.
  void set_conv_path(ConvPath path) {
    check_conv_path(spec_.target, path, spec_.dropout);
    spec_.conv_path = path;
  }
  /// Marks every parameter of this adapter trainable or frozen.
  void set_trainable(bool trainable);

  void pretty_print(std::ostream& stream) const override;

 private:
  AdapterSpec spec_;
  torch::Tensor core_;
  std::vector<torch::Tensor> factors_;
  // no-grad cache of dW and the (data pointer, version) of every parameter it was built from
  mutable torch::Tensor cache_;
  mutable std::vector<std::pair<const void*, int64_t>> cache_key_;
  mutable double cache_scale_ = 0.0;
  mutable at::MemoryFormat cache_format_ = at::MemoryFormat::Preserve;
  std::vector<std::pair<const void*, int64_t>> cache_key() const;
};
TORCH_MODULE(TuckerAdapter);

}  // namespace nn
}  // namespace flora

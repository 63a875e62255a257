// flora/layers.h: drop-in Linear, Conv1d/2d/3d and Embedding layers that can carry adapters,
// and ParameterAdapter for any other tensor.
//
// Usage:
//   1. flora::nn::Conv2d conv(torch::nn::Conv2dOptions(256, 512, 3).padding(1));  // like torch's
//      (or wrap an existing torch::nn::Conv2d: flora::nn::Conv2d conv(torch_conv); weights shared)
//   2. conv->add_adapter("default", flora::AdapterOptions().ranks({32, 32, 2, 2}).scale(4));
//      This freezes `weight` and `bias`; only the adapter trains.
//   3. y = conv(x);   // base conv + adapter, on the path the cost model picks (or the override)
//   4. conv->merge(); // weight = W0 + dW, forward is the plain conv; conv->unmerge() restores W0
//                     // bit for bit from a copy kept while merged.
//
// Parameter names match torch.nn (`weight`, `bias`), so torchvision state dicts load as they are;
// adapters live under `adapters.<name>.` (see adapter.h for their own names).
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/options/conv.h>
#include <torch/nn/options/embedding.h>
#include <torch/nn/options/linear.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <vector>

#include "flora/adapter.h"
#include "flora/functional.h"
#include "flora/spec.h"

namespace torch {
namespace nn {
class LinearImpl;
class EmbeddingImpl;
template <size_t D, typename Derived>
class ConvNdImpl;
}  // namespace nn
}  // namespace torch

namespace flora {
namespace nn {

/// Whether Linear::forward_recompute recomputes adapter inputs (default on). Off, it is
/// forward(in.value()), keeping the input as every other layer does: for A/B measurements
/// (`flora bench step --keep-inputs`). Process-wide; set it before forward, not during backward.
void set_recompute_inputs(bool on);
bool recompute_inputs();

/// What every adaptable layer shares: named adapters, the active one, enable/disable, merge.
class AdaptableLayer : public torch::nn::Module {
 public:
  /// The adapted tensor (W0, or W0 + dW while merged) and the bias (may be undefined).
  torch::Tensor weight, bias;

  /// Creates adapter `name` for this layer's weight and makes it the active one. Freezes
  /// `weight` and `bias`. Throws flora::Error on bad options or a duplicate name.
  TuckerAdapter add_adapter(const std::string& name, const AdapterOptions& options);
  /// Makes `name` the adapter used in forward; only it stays trainable.
  void set_active_adapter(const std::string& name);
  /// Removes an adapter (it must not be merged).
  void delete_adapter(const std::string& name);
  /// Disabled adapters leave forward equal to the base layer (merged weights stay merged).
  void set_adapters_enabled(bool enabled) { enabled_ = enabled; }
  bool adapters_enabled() const { return enabled_; }
  bool has_adapter(const std::string& name) const;
  std::vector<std::string> adapter_names() const;
  const std::string& active_adapter() const { return active_; }
  /// The named adapter ("" = the active one); throws if absent.
  TuckerAdapter adapter(const std::string& name = "") const;

  /// dW of the named adapter ("" = active) in the weight's shape.
  torch::Tensor delta_weight(const std::string& name = "") const;
  /// weight += dW of the named adapter ("" = active); forward then skips that adapter.
  /// The first merge keeps a copy of W0 so that unmerge() is exact.
  void merge(const std::string& name = "");
  /// Restores W0 exactly (from the copy) and un-merges every merged adapter. False if none was.
  bool unmerge();
  bool merged() const { return !merged_.empty(); }
  const std::vector<std::string>& merged_adapters() const { return merged_; }

  /// Name used in messages (the module path once injected); defaults to the layer type.
  void set_layer_name(std::string name) { name_ = std::move(name); }
  const std::string& layer_name() const { return name_; }
  /// The weight this layer adapts: kind, shape, groups.
  virtual TargetInfo target_info() const = 0;

 protected:
  explicit AdaptableLayer(std::string name) : name_(std::move(name)) {}
  /// Registers `weight` and `bias` (call once from the subclass constructor).
  void register_base(torch::Tensor weight, torch::Tensor bias);
  /// The adapter that contributes to forward (active, enabled, not merged), or nullptr.
  TuckerAdapter live_adapter() const;
  /// Hook for layer-specific adjustments of a new adapter (Embedding's padding row).
  virtual void on_adapter_added(TuckerAdapterImpl& /*adapter*/) {}
  /// Applies adapter dropout to `x` when training.
  torch::Tensor adapter_input(const torch::Tensor& x, const TuckerAdapterImpl& adapter) const;
  void print_adapters(std::ostream& stream) const;

 private:
  std::string name_;
  torch::nn::ModuleDict adapters_{torch::nn::ModuleDict()};
  std::string active_;
  bool enabled_ = true;
  std::vector<std::string> merged_;
  torch::Tensor original_weight_;  // W0 while merged, for an exact unmerge
  bool registered_ = false;
};

/// Linear y = x W^T + b (+ s x U_in G^T U_out^T, computed factorized: no [out, in] dW).
class LinearImpl : public AdaptableLayer {
 public:
  explicit LinearImpl(const torch::nn::LinearOptions& options);
  LinearImpl(int64_t in, int64_t out) : LinearImpl(torch::nn::LinearOptions(in, out)) {}
  /// Wraps an existing torch Linear, sharing its weight and bias tensors.
  explicit LinearImpl(const torch::nn::LinearImpl& base);
  torch::Tensor forward(const torch::Tensor& x);
  /// forward(in.value()) with the same output and gradients, but the adapter branch recomputes
  /// its input in backward instead of keeping it (functional::RecomputableInput): a model whose
  /// Linear follows a GELU, a LayerNorm or attention saves that activation's memory per adapted
  /// layer. It keeps x as forward does where recomputing saves nothing: without gradients, when
  /// x is not on the graph (f's own backward then keeps no sources), when the base weight trains
  /// (its matmul keeps x), while adapter dropout is active (the dropped input is kept), and while
  /// recompute_inputs() is off. A separate name, not an overload: Sequential needs one forward.
  torch::Tensor forward_recompute(const functional::RecomputableInput& in);
  TargetInfo target_info() const override;
  void pretty_print(std::ostream& stream) const override;
  const torch::nn::LinearOptions& options() const { return options_; }

 private:
  torch::nn::LinearOptions options_;
};
TORCH_MODULE(Linear);

/// ConvNd with D spatial dims. Paths: merged conv(x, W0 + dW), factorized, or separable (Conv2d
/// with in/groups == 1 only); see ConvPath.
template <size_t D>
class ConvImpl : public AdaptableLayer {
 public:
  explicit ConvImpl(const torch::nn::ConvOptions<D>& options);
  ConvImpl(int64_t in, int64_t out, int64_t kernel) : ConvImpl(torch::nn::ConvOptions<D>(in, out, kernel)) {}
  torch::Tensor forward(const torch::Tensor& x);
  TargetInfo target_info() const override;
  void pretty_print(std::ostream& stream) const override;
  const functional::ConvGeometry& geometry() const { return geo_; }
  const torch::nn::ConvOptions<D>& options() const { return options_; }
  /// The cost model's estimates for an input of this shape with the active adapter.
  ConvPathCosts path_costs(const std::vector<int64_t>& input_shape, bool training, bool input_requires_grad) const;
  /// The path the last forward took (Auto before any adapted forward).
  ConvPath last_path() const { return last_path_; }

 private:
  torch::nn::ConvOptions<D> options_;
  functional::ConvGeometry geo_;
  ConvPath last_path_ = ConvPath::Auto;
};
class Conv1dImpl : public ConvImpl<1> {
 public:
  using ConvImpl<1>::ConvImpl;
};
class Conv2dImpl : public ConvImpl<2> {
 public:
  using ConvImpl<2>::ConvImpl;
};
class Conv3dImpl : public ConvImpl<3> {
 public:
  using ConvImpl<3>::ConvImpl;
};
TORCH_MODULE(Conv1d);
TORCH_MODULE(Conv2d);
TORCH_MODULE(Conv3d);

/// Embedding (padding_idx supported; max_norm is not). The adapter gathers rows of U_num.
class EmbeddingImpl : public AdaptableLayer {
 public:
  explicit EmbeddingImpl(const torch::nn::EmbeddingOptions& options);
  EmbeddingImpl(int64_t num, int64_t dim) : EmbeddingImpl(torch::nn::EmbeddingOptions(num, dim)) {}
  torch::Tensor forward(const torch::Tensor& indices);
  TargetInfo target_info() const override;
  void pretty_print(std::ostream& stream) const override;
  const torch::nn::EmbeddingOptions& options() const { return options_; }

 protected:
  /// U_num's row padding_idx is zeroed (and gets no gradient), so W0's padding row never moves.
  void on_adapter_added(TuckerAdapterImpl& adapter) override;

 private:
  torch::nn::EmbeddingOptions options_;
};
TORCH_MODULE(Embedding);

/// Any other tensor (positional embeddings, fused in_proj, LayerNorm gains, ...): forward()
/// returns W0 + dW, the tensor the owning computation should use.
class ParameterAdapterImpl : public AdaptableLayer {
 public:
  /// `base` is shared, not copied; `name` appears in messages. `kind` and `groups` describe the
  /// layer that owns the tensor when it is a layer's weight (a TorchScript Conv2d's, say): they
  /// select the initialization and the export layout; the default is a plain parameter.
  ParameterAdapterImpl(torch::Tensor base, std::string name, LayerKind kind = LayerKind::Parameter, int64_t groups = 1);
  torch::Tensor forward();
  TargetInfo target_info() const override;
  void pretty_print(std::ostream& stream) const override;

 private:
  LayerKind kind_;
  int64_t groups_;
};
TORCH_MODULE(ParameterAdapter);

/// Trainable and total parameter counts of a module tree.
struct ParameterSummary {
  int64_t trainable = 0;
  int64_t all = 0;
};
ParameterSummary count_parameters(const torch::nn::Module& module);
/// "trainable params: 28,684 || all params: 1,208,524 || trainable%: 2.3735" (PEFT's line).
std::string format_summary(const ParameterSummary& summary);

}  // namespace nn
}  // namespace flora

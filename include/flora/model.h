// flora/model.h: one interface over the models the trainer and the command line work with:
// TorchScript files (flora::ScriptModel) and native architectures built from flora::nn layers,
// by name: "smallcnn", and torchvision's families with torchvision's state_dict keys
// (flora/vision.h): resnet18, resnet34, resnet50, convnext_tiny, convnext_small, convnext_base,
// vit_b_16, vit_s_16.
//
// Usage:
//   auto m = flora::open_model("model.pt");         // or an architecture name: "resnet50"
//   m->load_state(tensors, /*strict=*/true);         // e.g. a torchvision state dict
//   m->set_num_classes(10, /*seed=*/0);             // new classifier head (trained fully)
//   m->inject(options);                             // adapters; base frozen
//   auto logits = m->forward(x);
#pragma once

#include <torch/types.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "flora/inject.h"
#include "flora/io/adapter_dir.h"

namespace flora {

class Model {
 public:
  virtual ~Model() = default;
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
  /// Training mode for dropout etc.; BatchNorm layers stay in eval mode (frozen statistics)
  /// unless `update_batchnorm`.
  virtual void train(bool on, bool update_batchnorm = false) = 0;
  virtual InjectionReport inject(const InjectOptions& options) = 0;
  /// Adaptable layers by PyTorch name (for adapter directories).
  virtual io::NamedLayers layers() const = 0;
  /// Every parameter of the base model by PyTorch name (adapter tensors excluded).
  virtual std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const = 0;
  /// Adapter parameters by name ("<layer>.<adapter>.<tensor>") for checkpoints.
  std::vector<std::pair<std::string, torch::Tensor>> adapter_parameters(const std::string& adapter_name = "default") const;
  /// Parameters and buffers under their PyTorch names, adapters merged if merged.
  virtual std::vector<std::pair<std::string, torch::Tensor>> state_dict() const = 0;
  /// Loads tensors by name (strict: every name must exist with its shape; lists all problems).
  void load_state(const std::vector<std::pair<std::string, torch::Tensor>>& tensors, bool strict);
  /// Resizes base parameters whose shape in `tensors` differs (values not copied; load_state
  /// does that), only those under `prefix` when given: a saved new head with another class count.
  void adopt_shapes(const std::vector<std::pair<std::string, torch::Tensor>>& tensors, const std::string& prefix = "");
  /// The classifier head: the last Linear in module order.
  std::string head_name() const;
  /// Re-initializes the head for `num_classes` outputs (PyTorch's Linear init) and makes it trainable.
  void set_num_classes(int64_t num_classes, uint64_t seed);
  /// Marks every parameter of the named modules (exact or dotted suffix) trainable.
  std::vector<std::string> train_modules(const std::vector<std::string>& names);
  /// Every parameter trainable (full fine-tuning).
  void unfreeze_all();
  /// Stores every 4-d base parameter (Conv2d weights) channels-last (NHWC) and every 5-d one
  /// channels-last-3d, or back to contiguous (NCHW) when `on` is false; values, names and shapes
  /// are unchanged. oneDNN then runs the convolutions on NHWC activations without its layout
  /// reorders, which also makes the small convolutions of an adapter branch cheap
  /// (docs/PERFORMANCE.md). Adapter tensors keep their layout.
  void set_channels_last(bool on);
  /// Trainable tensors: adapters, plus base parameters made trainable.
  std::vector<std::pair<std::string, torch::Tensor>> trainable_parameters() const;
  /// Applies a saved run's adapter directory: its fully trained tensors
  /// (trained_modules.safetensors: a new head may change the class count) and its adapters
  /// (adapter_config.json), either or both. Returns the adapted module names.
  std::vector<std::string> load_adapter_dir(const std::string& dir, const std::string& adapter_name = "default");
  virtual void merge() = 0;
  /// Writes the model with adapters merged: TorchScript (.pt, TorchScript models only) or the
  /// state dict (.safetensors).
  virtual void save_merged(const std::string& path) = 0;
  virtual void to(const torch::Device& device) = 0;
  const std::string& source() const { return source_; }

 protected:
  std::string source_;
  /// io::load_adapter on this model's layers (TorchScript models also create parameter targets).
  virtual std::vector<std::string> load_adapter_modules(const std::string& dir, const std::string& adapter_name) = 0;
};

/// Renames a module's own tensor keys ("a.in_proj.weight") to the public, PyTorch ones
/// ("a.in_proj_weight") where the two differ; see make_native.
using KeyMap = std::function<std::string(const std::string&)>;

/// Wraps a module built from flora::nn layers as a Model called `name`; `forward` runs it.
/// named_parameters / state_dict / load_state use `public_name(key)` for every parameter and
/// buffer key (identity when empty); layer names (adapters, inject targets) stay the module's.
std::unique_ptr<Model> make_native(std::shared_ptr<torch::nn::Module> module,
                                   std::function<torch::Tensor(const torch::Tensor&)> forward, std::string name,
                                   KeyMap public_name = {});

/// A TorchScript file (.pt) or a registered architecture name; errors list the known names.
std::unique_ptr<Model> open_model(const std::string& name_or_path);
/// The registered native architecture names.
std::vector<std::string> architectures();

}  // namespace flora

// flora/script.h: adapters on TorchScript models (files saved by torch.jit.script or
// torch.jit.trace in Python), with no Python at run time.
//
// Usage:
//   auto model = flora::ScriptModel::load("resnet18.pt");
//   flora::InjectOptions o;
//   o.targets.regex = R"(layer\d\.\d\.conv\d)";
//   o.adapter = flora::AdapterOptions().ranks({16, 16, 2, 2});
//   std::cout << model.inject(o).format();        // base parameters are frozen
//   torch::optim::AdamW opt(model.trainable_parameters(), 1e-3);
//   auto y = model.forward({x}).toTensor();          // gradients reach the adapters
//   flora::io::save_adapter(model.layers(), "run/adapter");
//   model.merge(); model.save("merged.pt");          // loads in PyTorch, no flora needed
//
// Mechanism (docs/DESIGN.md, "TorchScript"): each targeted parameter is wrapped in a
// flora::nn::ParameterAdapter sharing its tensor. forward() puts W0 + dW into the module's
// attribute slot (an autograd-tracked tensor, so the script graph differentiates into the
// factors), runs the scripted forward, and puts W0 back. The cost per step is one dense dW per
// target (the merged path of docs/DESIGN.md), never a change to the script's graph. Targets:
// the `weight` of every Linear, Conv1d/2d/3d and Embedding submodule (their type names, also
// when traced), and any parameter named in TargetSelector::parameters.
#pragma once

#include <torch/script.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "flora/inject.h"
#include "flora/io/adapter_dir.h"

namespace flora {

class ScriptModel {
 public:
  /// Loads a TorchScript archive; errors name the file and what is wrong with it.
  static ScriptModel load(const std::string& path, const torch::Device& device = torch::kCPU);
  explicit ScriptModel(torch::jit::Module module);

  /// Adds adapters to the selected targets (same selectors and report as inject_adapters) and,
  /// with options.freeze_base, freezes every parameter of the script module.
  InjectionReport inject(const InjectOptions& options);

  /// Runs the module's forward with the active adapters on the forward path.
  torch::jit::IValue forward(std::vector<torch::jit::IValue> inputs);
  torch::Tensor forward(const torch::Tensor& x);

  /// Every adaptable target (layer weights and adapted parameters) by PyTorch's name: the module
  /// path for a layer weight, the full parameter name otherwise. For io::save_adapter/load_adapter.
  io::NamedLayers layers() const;
  /// io::load_adapter on this model, parameter targets ("target_parameters") included.
  std::vector<std::string> load_adapter(const std::string& dir, const std::string& adapter_name = "default");
  /// Targets offered to inject(), with the reason for those that cannot carry an adapter.
  std::vector<TargetCandidate> candidates(const TargetSelector& selector);

  /// The adapters' trainable parameters (plus base parameters the caller unfroze).
  std::vector<torch::Tensor> trainable_parameters() const;

  void train(bool on = true);
  bool is_training() const;
  void to(const torch::Device& device);

  /// Adds each target's active adapter (or `adapter_name`) into its weight; unmerge() restores
  /// the weights bit-exactly (flora::nn::AdaptableLayer::merge).
  void merge(const std::string& adapter_name = "");
  void unmerge();
  void set_adapters_enabled(bool enabled);
  void set_active_adapter(const std::string& name);
  void delete_adapter(const std::string& name);

  /// Writes the script module (atomically) as it is: merge() first for a merged model.
  void save(const std::string& path) const;
  /// Parameters and buffers under their PyTorch names (as state_dict()).
  std::vector<std::pair<std::string, torch::Tensor>> state_dict() const;

  torch::jit::Module& module() { return module_; }
  const torch::jit::Module& module() const { return module_; }

 private:
  struct Target {
    std::string name;          // "layer1.0.conv1" (a layer) or "blocks.0.attn.in_proj_weight"
    torch::jit::Module owner;  // the submodule holding the attribute
    std::string attribute;     // "weight", "in_proj_weight", ...
    std::shared_ptr<nn::AdaptableLayer> layer;
    bool is_parameter = false;
  };
  Target& parameter_target(const std::string& full_name);
  torch::jit::Module module_;
  std::vector<Target> targets_;
};

}  // namespace flora

// flora/inject.h: choose targets in a whole model and add adapters to them.
//
// Usage (a native LibTorch model built from flora::nn layers, which are drop-in replacements
// for torch::nn::Linear / ConvNd / Embedding with the same parameter names):
//   1. flora::InjectOptions o;
//      o.targets.names = {"conv1", "layer1.0.conv2"};      // exact names or dotted suffixes
//      o.adapter = flora::AdapterOptions().ranks({16, 16, 2, 2}).scale(4);
//      o.rank_pattern = {{"layer4\\..*", {32, 32, 2, 2}}};  // per-module overrides (full regex)
//   2. auto report = flora::inject_adapters(*model, o);   // also freezes every base parameter
//      std::cout << report.format();
//
// Matching follows PEFT: a list entry matches a module whose name equals it or ends with
// "." + entry; `regex` must match the whole name; `all_linear` takes every Linear but the last one
// (the output head). Matched modules that cannot carry an adapter are reported as skipped with
// the reason. Nothing adapted is an error.
#pragma once

#include <torch/nn/module.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "flora/spec.h"

namespace flora {
namespace nn {
class AdaptableLayer;
}

struct TargetSelector {
  /// Exact module names or dotted suffixes ("conv1" matches "layer1.0.conv1").
  std::vector<std::string> names;
  /// A regex that must match the whole module name (used when non-empty).
  std::string regex;
  /// Every Linear but the output head (the last Linear in module order).
  bool all_linear = false;
  /// Only these layer kinds (empty: any).
  std::vector<LayerKind> kinds;
  /// Names (exact or dotted suffix) never adapted.
  std::vector<std::string> exclude;
  /// Parameters other than a layer's `weight`, by full dotted name or dotted suffix
  /// ("in_proj_weight", "encoder.pos_embedding"): PEFT's target_parameters. TorchScript models
  /// (flora::ScriptModel) adapt any parameter; native models place a flora::nn::ParameterAdapter.
  std::vector<std::string> parameters;
  bool empty() const { return names.empty() && regex.empty() && !all_linear && parameters.empty(); }
};

struct InjectOptions {
  TargetSelector targets;
  /// Options for every target; patterns below override ranks and scale per module.
  AdapterOptions adapter = AdapterOptions().clip_ranks(true);
  /// Full regex on the module name -> FLoRA ranks (one per mode) or, for LoRA, {rank}.
  std::vector<std::pair<std::string, std::vector<int64_t>>> rank_pattern;
  /// Full regex on the module name -> FLoRA scale or LoRA alpha.
  std::vector<std::pair<std::string, double>> scale_pattern;
  std::string adapter_name = "default";
  /// Optional last word per layer, after the patterns (e.g. map one rank list onto layers of
  /// different orders).
  std::function<void(const TargetInfo&, AdapterOptions&)> per_layer;
  /// Freeze every parameter that is not an adapter's (PEFT's behaviour).
  bool freeze_base = true;
};

struct InjectionReport {
  struct Adapted {
    std::string name, kind;
    std::vector<int64_t> shape, ranks;
    std::string path;  ///< conv path: "auto (cost model)", "merged", "factorized"; "-" otherwise
    int64_t params = 0;
    std::vector<std::string> notes;
  };
  struct Skipped {
    std::string name, reason;
  };
  std::vector<Adapted> adapted;
  std::vector<Skipped> skipped;
  int64_t total_params() const;
  /// A readable table of both lists.
  std::string format() const;
};

/// True when `name` is selected by the list semantics (exact or dotted suffix).
bool name_matches(const std::string& name, const std::vector<std::string>& list);

/// Adds adapter `options.adapter_name` to every selected flora::nn layer of `model`.
InjectionReport inject_adapters(torch::nn::Module& model, const InjectOptions& options);

/// One module (or, for target_parameters, one parameter) a model offers for adaptation, in the
/// model's module order. `layer` is null for a leaf that cannot carry an adapter; `skip_reason`
/// then says why. `linear` marks Linear layers (for all-linear); `is_parameter` marks entries
/// selected by TargetSelector::parameters.
struct TargetCandidate {
  std::string name;
  nn::AdaptableLayer* layer = nullptr;
  std::string skip_reason;
  bool linear = false;
  bool is_parameter = false;
};

/// The selection and reporting core shared by native and TorchScript models: applies `options`
/// to `candidates` and adds adapters to the selected layers. Does not freeze anything.
InjectionReport inject_candidates(const std::vector<TargetCandidate>& candidates, const InjectOptions& options);

/// The model's flora::nn layers by module name (named_modules order), adapter containers excluded.
std::vector<std::pair<std::string, nn::AdaptableLayer*>> adaptable_layers(const torch::nn::Module& model);

/// Marks every parameter not inside an adapter (no ".adapters." in its name) frozen.
void freeze_base(torch::nn::Module& model);

}  // namespace flora

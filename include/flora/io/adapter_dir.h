// flora/io/adapter_dir.h: adapter directories in PEFT's layout.
//
//   DIR/adapter_config.json        {"peft_type": "FLORA" | "LORA", ...}
//   DIR/adapter_model.safetensors  metadata {"format": "pt"}
//
// FLoRA: `base_model.model.<module>.flora_core` [r_0..r_{N-1}] and
// `base_model.model.<module>.flora_factors.<n>` [I_n, r_n] (factored modes only), with
// dW = scale * core x_0 factors.0 x_1 factors.1 ... Config: "scale", "target_modules",
// "target_parameters", "scale_pattern" (exact module name -> scale, where it differs),
// "base_model_name_or_path", "format_version" and "layers" (per module: type, weight shape,
// groups; what `flora export` and `flora inspect` need without the model). A diagonal or
// identity core is saved expanded (same dW; it loads as a full core).
// LoRA: PEFT's own format (lora_A / lora_B, lora_embedding_A / _B; "r", "lora_alpha",
// "use_rslora", "rank_pattern", "alpha_pattern"), so PEFT reads our LoRA adapters and we read PEFT's.
// docs/FORMATS.md has the details.
//
// Usage:
//   flora::io::save_adapter(*model, "run/adapter");            // every layer's "default" adapter
//   auto loaded = flora::io::load_adapter(*model, "run/adapter"); // adds and fills the adapters
//   auto dir = flora::io::read_adapter("run/adapter");          // the tensors, no model needed
// Loading validates in a fixed order (files, config, tensor names, complete sets, targets exist in
// the model, shapes) and every error names the tensor or module with a hint.
#pragma once

#include <torch/nn/module.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "flora/spec.h"

namespace flora {
namespace nn {
class AdaptableLayer;
}
namespace io {

/// Layers by module name (parameter name for target_parameters), as flora::adaptable_layers()
/// or flora::ScriptModel::layers() list them.
using NamedLayers = std::vector<std::pair<std::string, nn::AdaptableLayer*>>;

struct SaveAdapterOptions {
  std::string adapter_name = "default";
  std::string base_model_name_or_path;
};

/// One module's adapter as stored in the file.
struct StoredModule {
  std::string name;
  /// FLoRA: the core [r_0..] and factors by mode (identity modes absent).
  /// LoRA: `core` = lora_A [r, in, k...] (Embedding: lora_embedding_B^T [r, dim]) and
  /// factors[0] = lora_B as a matrix [out, r] (Embedding: lora_embedding_A^T [num, r]): the same
  /// core/factor form as flora::nn::TuckerAdapter.
  torch::Tensor core;
  std::map<int64_t, torch::Tensor> factors;
  bool embedding = false;  ///< LoRA stored with lora_embedding_A / _B
  double scale = 1.0;      ///< FLoRA scale, or LoRA's effective scaling (alpha / r or / sqrt(r))
  int64_t lora_rank = 0;   ///< LoRA: r (after rank_pattern)
  double lora_alpha = 0;   ///< LoRA: alpha (after alpha_pattern)
  /// From the "layers" config entry when present: "Linear", "Conv", "Embedding", "Parameter";
  /// empty when the directory does not say (PEFT's own directories).
  std::string kind;
  std::vector<int64_t> weight_shape;
  int64_t groups = 1;
};

struct AdapterDirectory {
  std::string dir;
  Method method = Method::Flora;
  bool use_rslora = false;
  std::string base_model_name_or_path;
  std::vector<StoredModule> modules;  ///< sorted by name
};

/// One module of a PEFT LoRA directory, tensors in PEFT's layout: lora_A [r, in, k...] and
/// lora_B [out, r/groups, 1...], or for Embedding lora_embedding_A [r, num] and _B [dim, r].
struct PeftLoraModule {
  std::string name;
  torch::Tensor a, b;
  int64_t rank = 0;
  double alpha = 0;
  bool embedding = false;
  std::string kind;  ///< for the "layers" entry (flora's extension; PEFT ignores it)
  std::vector<int64_t> weight_shape;
  int64_t groups = 1;
};

/// Writes a PEFT LoRA directory: the most common r / lora_alpha in the config and the others in
/// rank_pattern / alpha_pattern (checked to resolve back to each module's own values).
void write_peft_lora(const std::string& dir, const std::vector<PeftLoraModule>& modules, bool use_rslora,
                     const std::string& base_model_name_or_path);

/// Steps 1-4 of loading (files, config, tensor names, complete sets); no model needed.
AdapterDirectory read_adapter(const std::string& dir);

/// Writes the named adapter of every layer in `layers` that has one into `dir` (created if
/// needed). Both files are written atomically. Returns the number of modules saved.
int save_adapter(const NamedLayers& layers, const std::string& dir, const SaveAdapterOptions& options = {});
/// The same for every flora::nn layer of a native model.
int save_adapter(const torch::nn::Module& model, const std::string& dir, const SaveAdapterOptions& options = {});

/// Reads `dir` and adds adapter `adapter_name` to each listed module, filled with the saved
/// tensors. Returns the module names. Throws flora::Error before changing any layer.
std::vector<std::string> load_adapter(const NamedLayers& layers, const std::string& dir,
                                      const std::string& adapter_name = "default");
std::vector<std::string> load_adapter(torch::nn::Module& model, const std::string& dir,
                                      const std::string& adapter_name = "default");

}  // namespace io
}  // namespace flora

// flora/io/adapter_dir.h: adapter directories in PEFT's layout.
//
//   DIR/adapter_config.json        {"peft_type": "FLORA" | "LORA", ...}
//   DIR/adapter_model.safetensors  metadata {"format": "pt"}
//
// FLoRA: `base_model.model.<module>.flora_core` [r_0..r_{N-1}] and
// `base_model.model.<module>.flora_factors.<n>` [I_n, r_n] (factored modes only), with
// dW = scale * core x_0 factors.0 x_1 factors.1 ... Config: "scale", "target_modules",
// "scale_pattern" (exact module name -> scale, where it differs), "base_model_name_or_path",
// "format_version". A diagonal or identity core is saved expanded (same dW; it loads as a full
// core).
// LoRA: PEFT's own format (lora_A / lora_B, lora_embedding_A / _B; "r", "lora_alpha",
// "use_rslora", "rank_pattern", "alpha_pattern"), so PEFT reads our LoRA adapters and we read PEFT's.
//
// Usage:
//   flora::io::save_adapter(*model, "run/adapter");            // every layer's "default" adapter
//   auto loaded = flora::io::load_adapter(*model, "run/adapter"); // adds and fills the adapters
// Loading validates in a fixed order (files, config, tensor names, complete sets, targets exist in
// the model, shapes) and every error names the tensor or module with a hint.
#pragma once

#include <torch/nn/module.h>

#include <string>
#include <vector>

namespace flora {
namespace io {

struct SaveAdapterOptions {
  std::string adapter_name = "default";
  std::string base_model_name_or_path;
};

/// Writes the named adapter of every flora::nn layer of `model` into `dir` (created if needed).
/// Both files are written atomically. Returns the number of adapted modules saved.
int save_adapter(const torch::nn::Module& model, const std::string& dir, const SaveAdapterOptions& options = {});

/// Reads `dir` and adds adapter `adapter_name` to each listed module of `model`, filled with the
/// saved tensors. Returns the module names. Throws flora::Error before changing the model.
std::vector<std::string> load_adapter(torch::nn::Module& model, const std::string& dir,
                                      const std::string& adapter_name = "default");

}  // namespace io
}  // namespace flora

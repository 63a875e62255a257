// flora/io/export.h: exact conversion of a saved adapter into PEFT LoRA and LyCORIS LoCon, so a
// FLoRA adapter deploys wherever LoRA runs (PEFT, diffusers, vLLM; llama.cpp through its PEFT
// converter; Stable Diffusion tool chains through LyCORIS). docs/FORMATS.md has the algebra.
//
// Usage:
//   auto summary = flora::io::export_adapter("run/adapter", "run/peft", flora::io::ExportFormat::PeftLora);
//   std::cout << summary.format();
//
// The conversions are exact (equal dW to float rounding), not approximations: FLoRA's dW
// factors through its output mode, dW_(0) = U_0 [s G x_1 U_1 ... x_{N-1} U_{N-1}]_(0).
#pragma once

#include <torch/types.h>

#include <string>
#include <vector>

#include "flora/io/adapter_dir.h"

namespace flora {
namespace io {

enum class ExportFormat { PeftLora, Lycoris };
/// "peft-lora" or "lycoris"; anything else throws InvalidArgument listing both.
ExportFormat parse_export_format(const std::string& s);

/// The exact PEFT LoRA form of `module` (a FLoRA or LoRA module of a directory; its kind and
/// groups must be known), in PEFT's layout with scaling = alpha / rank. Throws for parameters
/// (PEFT LoRA has no generic-parameter form).
PeftLoraModule to_peft_lora(const StoredModule& module);

/// LyCORIS LoCon tensors for one module: dW = (alpha / rank) * up x mid x down.
struct LoconTensors {
  torch::Tensor down, mid, up;  ///< mid undefined when no spatial mode is factored
  int64_t rank = 0;
  double alpha = 0;
};
LoconTensors to_locon(const StoredModule& module);

/// The module's layer type: from the directory's "layers" entry, else inferred (LoRA embedding
/// tensors -> Embedding, order >= 3 -> Conv, order 2 -> Linear for LoRA); throws when unknown.
LayerKind stored_kind(const StoredModule& module, Method method);

struct ExportSummary {
  std::string format, out;
  std::vector<std::string> lines;  ///< one per module: name, kind, rank, parameters
  int64_t parameters = 0;
  std::string text() const;
};

/// Reads `adapter_dir` and writes the exact equivalent: a PEFT LoRA directory at `out`
/// (adapter_config.json + adapter_model.safetensors), or one LyCORIS .safetensors file.
/// Validates every module before writing; all writes are atomic.
ExportSummary export_adapter(const std::string& adapter_dir, const std::string& out, ExportFormat format);

}  // namespace io
}  // namespace flora

// `flora merge`, `flora export` and `flora inspect` for adapter directories and TorchScript models.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <iostream>

#include "commands.h"
#include "flora/flora.h"
#include "flora/io/adapter_dir.h"
#include "flora/io/export.h"
#include "flora/io/safetensors.h"
#include "flora/model.h"
#include "flora/script.h"

namespace flora {
namespace cli {
namespace {

namespace fs = std::filesystem;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// ---------------------------------------------------------------------------------------------
// flora merge

struct MergeArgs {
  std::string model, weights, adapter, out, adapter_name = "default";
};

int run_merge(const MergeArgs& a) {
  // Validate everything before loading anything heavy.
  if (!ends_with(a.out, ".pt") && !ends_with(a.out, ".safetensors"))
    throw InvalidArgument("--out '" + a.out + "' must end in .pt (a TorchScript model) or .safetensors (the merged state dict)");
  if (ends_with(a.out, ".pt") && !ends_with(a.model, ".pt"))
    throw InvalidArgument("--out '" + a.out + "': a native architecture (" + a.model +
                          ") merges into a state dict (hint: --out merged.safetensors)");
  const auto parent = fs::path(a.out).parent_path();
  if (!parent.empty() && !fs::is_directory(parent))
    throw InvalidArgument("--out '" + a.out + "': the folder '" + parent.string() + "' does not exist");
  if (!a.weights.empty() && !fs::is_regular_file(a.weights)) throw InvalidArgument("--weights '" + a.weights + "' does not exist");
  if (ends_with(a.model, ".pt") && !fs::is_regular_file(a.model)) throw InvalidArgument("--model '" + a.model + "' does not exist");
  if (!fs::exists(fs::path(a.adapter) / "adapter_config.json") && !fs::exists(fs::path(a.adapter) / "trained_modules.safetensors"))
    throw InvalidArgument("--adapter '" + a.adapter + "' holds neither adapter_config.json nor trained_modules.safetensors (hint: RUN_DIR/adapter)");
  if (fs::exists(fs::path(a.adapter) / "adapter_config.json")) io::read_adapter(a.adapter);  // valid before the model loads

  auto model = open_model(a.model);
  if (!a.weights.empty()) model->load_state(io::SafetensorsFile(a.weights).load_all(), /*strict=*/true);
  model->train(false);
  const auto modules = model->load_adapter_dir(a.adapter, a.adapter_name);
  model->save_merged(a.out);
  std::cout << "merged " << modules.size() << " adapted module(s) of '" << a.adapter << "' into '" << a.model << "' -> "
            << a.out << "\n";
  return 0;
}

void add_merge(CLI::App& app, std::function<int()>& run) {
  auto a = std::make_shared<MergeArgs>();
  auto* c = app.add_subcommand("merge", "Add an adapter (and a run's fully trained modules, e.g. a new head) into a model's "
                                        "weights and write the merged model");
  c->add_option("--model", a->model, "TorchScript model (.pt) or architecture name the adapter was trained on")->required();
  c->add_option("--weights", a->weights, "Base weights (.safetensors state dict) for an architecture");
  c->add_option("--adapter", a->adapter, "Adapter directory (FLoRA or PEFT LoRA; a run's RUN_DIR/adapter)")->required();
  c->add_option("--out", a->out, "merged.pt (TorchScript models; loads in PyTorch) or merged.safetensors (state dict, original names)")
      ->required();
  c->add_option("--adapter-name", a->adapter_name, "Name given to the loaded adapter")->capture_default_str();
  c->callback([a, &run] { run = [a] { return run_merge(*a); }; });
}

// ---------------------------------------------------------------------------------------------
// flora export

struct ExportArgs {
  std::string adapter, format, out;
};

int run_export(const ExportArgs& a) {
  const auto format = io::parse_export_format(a.format);
  const auto summary = io::export_adapter(a.adapter, a.out, format);
  std::cout << summary.text();
  return 0;
}

void add_export(CLI::App& app, std::function<int()>& run) {
  auto a = std::make_shared<ExportArgs>();
  auto* c = app.add_subcommand("export", "Convert an adapter exactly to PEFT LoRA or LyCORIS LoCon (docs/FORMATS.md)");
  c->add_option("--adapter", a->adapter, "Adapter directory to convert")->required();
  c->add_option("--format", a->format, "peft-lora (a PEFT directory) or lycoris (one .safetensors file)")->required();
  c->add_option("--out", a->out, "Output directory (peft-lora) or file (lycoris)")->required();
  c->callback([a, &run] { run = [a] { return run_export(*a); }; });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// flora inspect ADAPTER_DIR | MODEL.pt

int inspect_adapter(const std::string& path, bool json) {
  const auto dir = io::read_adapter(path);
  int64_t total = 0;
  std::vector<int64_t> counts;
  for (const auto& m : dir.modules) {
    int64_t n = m.core.numel();
    for (const auto& [i, f] : m.factors) n += f.numel();
    counts.push_back(n);
    total += n;
  }
  if (json) {
    nlohmann::json j = {{"adapter", path}, {"peft_type", dir.method == Method::Flora ? "FLORA" : "LORA"},
                        {"base_model_name_or_path", dir.base_model_name_or_path}, {"modules", nlohmann::json::array()},
                        {"total_params", total}};
    for (size_t i = 0; i < dir.modules.size(); ++i) {
      const auto& m = dir.modules[i];
      j["modules"].push_back({{"name", m.name}, {"type", m.kind}, {"weight_shape", m.weight_shape}, {"groups", m.groups},
                              {"ranks", m.core.sizes().vec()}, {"scale", m.scale}, {"count", counts[i]},
                              {"dtype", io::to_dtype_name(m.core.scalar_type())}});
    }
    std::cout << j.dump() << "\n";
    return 0;
  }
  size_t w = 6;
  for (const auto& m : dir.modules) w = std::max(w, m.name.size());
  std::printf("%s adapter '%s'%s\n", dir.method == Method::Flora ? "FLoRA" : "PEFT LoRA", path.c_str(),
              dir.base_model_name_or_path.empty() ? "" : (" for " + dir.base_model_name_or_path).c_str());
  std::printf("%-*s  %-9s  %-6s  %-18s  %-16s  %8s %12s\n", static_cast<int>(w), "module", "type", "dtype", "weight",
              "core", "scale", "count");
  for (size_t i = 0; i < dir.modules.size(); ++i) {
    const auto& m = dir.modules[i];
    std::printf("%-*s  %-9s  %-6s  %-18s  %-16s  %8.4g %12s\n", static_cast<int>(w), m.name.c_str(),
                m.kind.empty() ? "?" : m.kind.c_str(), io::to_dtype_name(m.core.scalar_type()).c_str(),
                m.weight_shape.empty() ? "?" : format_shape(m.weight_shape).c_str(), format_shape(m.core.sizes().vec()).c_str(),
                m.scale, format_count(counts[i]).c_str());
  }
  std::printf("%zu modules, %s adapter parameters\n", dir.modules.size(), format_count(total).c_str());
  return 0;
}

int inspect_script(const std::string& path, bool json) {
  auto model = ScriptModel::load(path);
  std::map<std::string, std::string> kinds;
  for (const auto& [name, layer] : model.layers()) {
    const auto t = layer->target_info();
    kinds[name + ".weight"] = to_string(t.kind) + (t.groups != 1 ? " g=" + std::to_string(t.groups) : "");
  }
  int64_t total = 0;
  size_t w = 4, n = 0;
  for (const auto& p : model.module().named_parameters()) {
    total += p.value.numel();
    w = std::max(w, p.name.size());
    ++n;
  }
  if (json) {
    nlohmann::json j = {{"model", path}, {"parameters", nlohmann::json::array()}, {"total_params", total}};
    for (const auto& p : model.module().named_parameters())
      j["parameters"].push_back({{"name", p.name}, {"dtype", io::to_dtype_name(p.value.scalar_type())},
                                 {"shape", p.value.sizes().vec()}, {"count", p.value.numel()},
                                 {"adaptable", kinds.count(p.name) ? kinds[p.name] : ""}});
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::printf("%-*s  %-6s  %-20s %12s  %s\n", static_cast<int>(w), "name", "dtype", "shape", "count", "adaptable as");
  for (const auto& p : model.module().named_parameters())
    std::printf("%-*s  %-6s  %-20s %12s  %s\n", static_cast<int>(w), p.name.c_str(), io::to_dtype_name(p.value.scalar_type()).c_str(),
                format_shape(p.value.sizes().vec()).c_str(), format_count(p.value.numel()).c_str(),
                kinds.count(p.name) ? kinds[p.name].c_str() : "parameter");
  std::printf("%zu parameters, %s values; %zu adaptable layers\n", n, format_count(total).c_str(), kinds.size());
  return 0;
}

void add_adapter_commands(CLI::App& app, std::function<int()>& run) {
  add_merge(app, run);
  add_export(app, run);
}

}  // namespace cli
}  // namespace flora

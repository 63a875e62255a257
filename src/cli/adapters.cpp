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
#include "flora/train.h"

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

int inspect_model(const std::string& name, const train::TrainConfig* plan, bool json) {
  auto model = open_model(name);
  if (plan) {  // what each layer would get
    const auto report = train::prepare_model(*model, *plan);
    int64_t trainable = 0, all = 0;
    for (const auto& [n, p] : model->trainable_parameters()) trainable += p.numel();
    for (const auto& [n, p] : model->named_parameters()) all += p.numel();
    all += report.total_params();
    if (json) {
      nlohmann::json j = {{"model", name}, {"method", plan->method}, {"adapted", nlohmann::json::array()},
                          {"skipped", nlohmann::json::array()}, {"adapter_params", report.total_params()},
                          {"trainable", trainable}, {"all_params", all}};
      for (const auto& a : report.adapted)
        j["adapted"].push_back({{"name", a.name}, {"kind", a.kind}, {"shape", a.shape}, {"ranks", a.ranks}, {"path", a.path},
                                {"params", a.params}, {"notes", a.notes}});
      for (const auto& sk : report.skipped) j["skipped"].push_back({{"name", sk.name}, {"reason", sk.reason}});
      std::cout << j.dump() << "\n";
      return 0;
    }
    if (report.adapted.empty()) std::cout << "method '" << plan->method << "' adds no adapters\n";
    else std::cout << report.format();
    std::cout << nn::format_summary({trainable, all}) << "\n";
    return 0;
  }
  std::map<std::string, std::string> kinds;
  for (const auto& [lname, layer] : model->layers()) {
    const auto t = layer->target_info();
    kinds[lname + ".weight"] = to_string(t.kind) + (t.groups != 1 ? " g=" + std::to_string(t.groups) : "");
  }
  const auto params = model->named_parameters();
  int64_t total = 0;
  size_t w = 4;
  for (const auto& [pname, p] : params) total += p.numel(), w = std::max(w, pname.size());
  if (json) {
    nlohmann::json j = {{"model", name}, {"parameters", nlohmann::json::array()}, {"total_params", total}};
    for (const auto& [pname, p] : params)
      j["parameters"].push_back({{"name", pname}, {"dtype", io::to_dtype_name(p.scalar_type())}, {"shape", p.sizes().vec()},
                                 {"count", p.numel()}, {"adaptable", kinds.count(pname) ? kinds[pname] : ""}});
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::printf("%-*s  %-6s  %-20s %12s  %s\n", static_cast<int>(w), "name", "dtype", "shape", "count", "adaptable as");
  for (const auto& [pname, p] : params)
    std::printf("%-*s  %-6s  %-20s %12s  %s\n", static_cast<int>(w), pname.c_str(), io::to_dtype_name(p.scalar_type()).c_str(),
                format_shape(p.sizes().vec()).c_str(), format_count(p.numel()).c_str(),
                kinds.count(pname) ? kinds[pname].c_str() : "parameter");
  std::printf("%zu parameters, %s values; %zu adaptable layers\n", params.size(), format_count(total).c_str(), kinds.size());
  return 0;
}

void add_adapter_commands(CLI::App& app, std::function<int()>& run) {
  add_merge(app, run);
  add_export(app, run);
}

}  // namespace cli
}  // namespace flora

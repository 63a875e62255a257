#include "flora/io/adapter_dir.h"

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <regex>
#include <set>

#include "flora/io/safetensors.h"
#include "flora/layers.h"

namespace flora {
namespace io {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const char* kConfig = "adapter_config.json";
const char* kWeights = "adapter_model.safetensors";
const std::string kPrefix = "base_model.model.";
constexpr int kFormatVersion = 1;

[[noreturn]] void fail(const std::string& dir, const std::string& what, const std::string& hint) {
  throw Error("adapter '" + dir + "': " + what + (hint.empty() ? "" : " (hint: " + hint + ")"));
}

struct Entry {
  std::string name;
  nn::AdaptableLayer* layer;
  nn::TuckerAdapter adapter;
};

template <typename T>
T most_common(const std::vector<T>& values) {
  std::map<T, int> counts;
  for (const auto& v : values) ++counts[v];
  return std::max_element(counts.begin(), counts.end(), [](auto& a, auto& b) { return a.second < b.second; })->first;
}

// PEFT's pattern semantics: key matches a module name if the name ends with the key (regex),
// at a dot boundary.
template <typename T>
bool lookup_pattern(const json& patterns, const std::string& module, T& out) {
  if (!patterns.is_object()) return false;
  for (auto it = patterns.begin(); it != patterns.end(); ++it) {
    try {
      if (std::regex_match(module, std::regex("(.*\\.)?(" + it.key() + ")"))) {
        out = it.value().get<T>();
        return true;
      }
    } catch (const std::regex_error&) {
      if (module == it.key()) {
        out = it.value().get<T>();
        return true;
      }
    }
  }
  return false;
}

std::vector<int64_t> pointwise_shape(int64_t out, int64_t r, size_t order) {
  std::vector<int64_t> s{out, r};
  s.resize(order, 1);
  return s;
}

}  // namespace

int save_adapter(const torch::nn::Module& model, const std::string& dir, const SaveAdapterOptions& o) {
  std::vector<Entry> entries;
  for (const auto& item : model.named_modules("", false)) {
    auto* layer = dynamic_cast<nn::AdaptableLayer*>(item.value().get());
    if (layer && layer->has_adapter(o.adapter_name)) entries.push_back({item.key(), layer, layer->adapter(o.adapter_name)});
  }
  if (entries.empty())
    fail(dir, "no module of the model has an adapter named '" + o.adapter_name + "'", "inject adapters before saving");
  const Method method = entries.front().adapter->spec().method;
  for (const auto& e : entries)
    if (e.adapter->spec().method != method)
      fail(dir, "module '" + e.name + "' uses " + to_string(e.adapter->spec().method) + " but '" + entries.front().name +
                    "' uses " + to_string(method), "one directory holds one adapter type");

  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  json config;
  std::vector<std::string> targets;
  for (const auto& e : entries) targets.push_back(e.name);
  config["target_modules"] = targets;
  config["base_model_name_or_path"] = o.base_model_name_or_path;
  config["format_version"] = kFormatVersion;

  if (method == Method::Flora) {
    std::vector<double> scales;
    for (const auto& e : entries) scales.push_back(e.adapter->scale());
    const double scale = most_common(scales);
    json pattern = json::object();
    for (const auto& e : entries) {
      const auto& a = e.adapter;
      if (a->scale() != scale) pattern[e.name] = a->scale();
      const std::string base = kPrefix + e.name;
      tensors.emplace_back(base + ".flora_core", a->core().detach());
      for (size_t n = 0; n < a->factors().size(); ++n)
        if (a->factors()[n].defined()) tensors.emplace_back(base + ".flora_factors." + std::to_string(n), a->factors()[n].detach());
    }
    config["peft_type"] = "FLORA";
    config["scale"] = scale;
    config["scale_pattern"] = pattern;
  } else {
    std::vector<int64_t> ranks;
    std::vector<double> alphas;
    for (const auto& e : entries) {
      ranks.push_back(e.adapter->spec().ranks[0]);
      alphas.push_back(e.adapter->spec().alpha);
      if (e.adapter->spec().use_rslora != entries.front().adapter->spec().use_rslora)
        fail(dir, "module '" + e.name + "' disagrees with '" + entries.front().name + "' on use_rslora", "PEFT stores one use_rslora");
    }
    const int64_t r = most_common(ranks);
    const double alpha = most_common(alphas);
    json rank_pattern = json::object(), alpha_pattern = json::object();
    for (const auto& e : entries) {
      const auto& spec = e.adapter->spec();
      if (spec.ranks[0] != r) rank_pattern[e.name] = spec.ranks[0];
      if (spec.alpha != alpha) alpha_pattern[e.name] = spec.alpha;
      const std::string base = kPrefix + e.name;
      auto core = e.adapter->core().detach(), b = e.adapter->factors()[0].detach();
      if (spec.target.kind == LayerKind::Embedding) {
        tensors.emplace_back(base + ".lora_embedding_A", b.t().contiguous());
        tensors.emplace_back(base + ".lora_embedding_B", core.t().contiguous());
      } else {
        tensors.emplace_back(base + ".lora_A.weight", core);
        tensors.emplace_back(base + ".lora_B.weight", b.reshape(pointwise_shape(b.size(0), b.size(1), core.dim())));
      }
    }
    config["peft_type"] = "LORA";
    config["r"] = r;
    config["lora_alpha"] = alpha;
    config["use_rslora"] = entries.front().adapter->spec().use_rslora;
    config["rank_pattern"] = rank_pattern;
    config["alpha_pattern"] = alpha_pattern;
    config["bias"] = "none";
    config["fan_in_fan_out"] = false;
    config["task_type"] = nullptr;
    config["modules_to_save"] = nullptr;
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(dir, "cannot create the directory: " + ec.message(), "");
  atomic_write((fs::path(dir) / kWeights).string(), serialize_safetensors(tensors, {{"format", "pt"}}));
  atomic_write((fs::path(dir) / kConfig).string(), config.dump(2) + "\n");
  return static_cast<int>(entries.size());
}

std::vector<std::string> load_adapter(torch::nn::Module& model, const std::string& dir, const std::string& name) {
  // 1. Files.
  const auto config_path = fs::path(dir) / kConfig, weights_path = fs::path(dir) / kWeights;
  if (!fs::is_directory(dir)) fail(dir, "not a directory", "pass the folder holding adapter_config.json");
  for (const auto& p : {config_path, weights_path})
    if (!fs::exists(p)) fail(dir, "missing " + p.filename().string(), "an adapter directory holds adapter_config.json and adapter_model.safetensors");
  // 2. Config.
  json config;
  try {
    std::ifstream in(config_path);
    config = json::parse(in);
  } catch (const json::exception& e) {
    fail(dir, std::string("adapter_config.json is not valid JSON: ") + e.what(), "");
  }
  if (!config.is_object() || !config.contains("peft_type") || !config["peft_type"].is_string())
    fail(dir, "adapter_config.json has no \"peft_type\"", "expected \"FLORA\" or \"LORA\"");
  const std::string type = config["peft_type"];
  if (type != "FLORA" && type != "LORA") fail(dir, "unsupported peft_type '" + type + "'", "flora reads FLORA and LORA adapters");
  const bool flora = type == "FLORA";
  static const std::set<std::string> known_flora{"peft_type", "scale", "target_modules", "target_parameters", "scale_pattern",
                                                 "base_model_name_or_path", "format_version"};
  static const std::set<std::string> known_lora{"peft_type", "r", "lora_alpha", "use_rslora", "target_modules",
                                                "rank_pattern", "alpha_pattern", "base_model_name_or_path", "bias",
                                                "fan_in_fan_out", "task_type", "modules_to_save", "lora_dropout",
                                                "init_lora_weights", "inference_mode", "revision", "layers_to_transform",
                                                "layers_pattern", "use_dora", "format_version"};
  for (auto it = config.begin(); it != config.end(); ++it)
    if (!(flora ? known_flora : known_lora).count(it.key()))
      std::cerr << "flora: warning: adapter '" << dir << "': ignoring unknown config key \"" << it.key() << "\"\n";
  if (flora && config.value("format_version", kFormatVersion) > kFormatVersion)
    fail(dir, "format_version " + std::to_string(config["format_version"].get<int>()) + " is newer than this flora reads (" +
                  std::to_string(kFormatVersion) + ")", "upgrade flora");
  SafetensorsFile file(weights_path.string());

  // 3. Tensor names -> (module, role).
  struct Parts {
    torch::Tensor core, a, b;
    std::map<int64_t, torch::Tensor> factors;
    bool embedding = false;
  };
  std::map<std::string, Parts> modules;
  const std::vector<std::string> suffixes = flora ? std::vector<std::string>{".flora_core", ".flora_factors."}
                                                  : std::vector<std::string>{".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"};
  for (const auto& t : file.tensors()) {
    if (t.name.rfind(kPrefix, 0) != 0)
      fail(dir, "tensor '" + t.name + "' does not start with '" + kPrefix + "'", "not a PEFT-layout adapter file?");
    std::string rest = t.name.substr(kPrefix.size()), module, role;
    for (const auto& s : suffixes) {
      const auto pos = rest.rfind(s);
      if (pos != std::string::npos && pos > 0 && (s.back() == '.' || pos + s.size() == rest.size())) {
        module = rest.substr(0, pos);
        role = rest.substr(pos + 1);
        break;
      }
    }
    if (module.empty())
      fail(dir, "tensor '" + t.name + "' is not a " + type + " tensor name", flora ? "expected <module>.flora_core or <module>.flora_factors.<n>" : "expected <module>.lora_A.weight / lora_B.weight");
    auto& p = modules[module];
    auto value = file.load(t.name);
    if (role == "flora_core") p.core = value;
    else if (role.rfind("flora_factors.", 0) == 0) {
      const std::string idx = role.substr(14);
      if (idx.empty() || idx.find_first_not_of("0123456789") != std::string::npos)
        fail(dir, "tensor '" + t.name + "' has a factor index '" + idx + "'", "factors are numbered from 0");
      p.factors[std::stoll(idx)] = value;
    } else if (role == "lora_A.weight") p.a = value;
    else if (role == "lora_B.weight") p.b = value;
    else if (role == "lora_embedding_A") { p.a = value; p.embedding = true; }
    else { p.b = value; p.embedding = true; }
  }
  if (modules.empty()) fail(dir, "adapter_model.safetensors holds no tensors", "");
  // 4. Complete sets.
  for (const auto& [module, p] : modules) {
    if (flora && !p.core.defined()) fail(dir, "module '" + module + "' has factors but no flora_core", "incomplete adapter file");
    if (!flora && (!p.a.defined() || !p.b.defined()))
      fail(dir, "module '" + module + "' needs both lora_A and lora_B", "incomplete adapter file");
  }
  // 5. Targets exist in the model and can carry an adapter.
  std::map<std::string, nn::AdaptableLayer*> layers;
  for (const auto& item : model.named_modules("", false))
    if (auto* l = dynamic_cast<nn::AdaptableLayer*>(item.value().get())) layers[item.key()] = l;
  for (const auto& [module, p] : modules) {
    auto it = layers.find(module);
    if (it == layers.end())
      fail(dir, "module '" + module + "' of the adapter is not an adaptable layer of the model", "adapter trained for another base model?");
    if (it->second->has_adapter(name)) fail(dir, "module '" + module + "' already has an adapter '" + name + "'", "delete it or load under another name");
  }
  // 6. Shapes, and the options each adapter is rebuilt with.
  std::map<std::string, AdapterOptions> options;
  for (const auto& [module, p] : modules) {
    const auto target = layers[module]->target_info();
    const auto& I = target.shape;
    auto shape_error = [&](const std::string& tensor, const torch::Tensor& v, const std::vector<int64_t>& want) {
      fail(dir, "tensor '" + kPrefix + module + "." + tensor + "' has shape " + format_shape(v.sizes().vec()) + ", expected " +
                    format_shape(want) + " for the weight " + format_shape(I), "adapter trained for another base model?");
    };
    if (flora) {
      if (p.core.dim() != static_cast<int64_t>(I.size())) shape_error("flora_core", p.core, I);
      std::vector<bool> identity(I.size());
      for (size_t n = 0; n < I.size(); ++n) {
        auto f = p.factors.find(static_cast<int64_t>(n));
        identity[n] = f == p.factors.end();
        if (identity[n] && p.core.size(n) != I[n]) {
          auto want = p.core.sizes().vec();
          want[n] = I[n];
          shape_error("flora_core", p.core, want);
        }
        if (!identity[n] && (f->second.dim() != 2 || f->second.size(0) != I[n] || f->second.size(1) != p.core.size(n)))
          shape_error("flora_factors." + std::to_string(n), f->second, {I[n], p.core.size(n)});
      }
      for (const auto& [n, f] : p.factors)
        if (n >= static_cast<int64_t>(I.size())) shape_error("flora_factors." + std::to_string(n), f, {});
      double scale = config.value("scale", 1.0);
      lookup_pattern(config.value("scale_pattern", json::object()), module, scale);
      options[module] = AdapterOptions().ranks(p.core.sizes().vec()).identity_modes(identity).scale(scale);
    } else {
      int64_t r = config.value("r", int64_t{8});
      double alpha = config.value("lora_alpha", 8.0);
      lookup_pattern(config.value("rank_pattern", json::object()), module, r);
      lookup_pattern(config.value("alpha_pattern", json::object()), module, alpha);
      if (p.embedding) {
        if (target.kind != LayerKind::Embedding) fail(dir, "module '" + module + "' has embedding tensors but is a " + to_string(target.kind), "");
        if (p.a.sizes().vec() != std::vector<int64_t>{r, I[0]}) shape_error("lora_embedding_A", p.a, {r, I[0]});
        if (p.b.sizes().vec() != std::vector<int64_t>{I[1], r}) shape_error("lora_embedding_B", p.b, {I[1], r});
      } else {
        auto want_a = I;
        want_a[0] = r;
        if (p.a.sizes().vec() != want_a) shape_error("lora_A.weight", p.a, want_a);
        auto want_b = pointwise_shape(I[0], r, I.size());
        if (p.b.sizes().vec() != want_b) shape_error("lora_B.weight", p.b, want_b);
      }
      options[module] = AdapterOptions().method(Method::Lora).rank(r).alpha(alpha).use_rslora(config.value("use_rslora", false));
    }
  }
  // All checks passed: only now change the model.
  std::vector<std::string> loaded;
  for (auto& [module, p] : modules) {
    auto* layer = layers[module];
    layer->set_layer_name(module);
    auto a = layer->add_adapter(name, options[module]);
    torch::NoGradGuard no_grad;
    const auto dtype = layer->weight.dtype();
    if (flora) {
      a->core_parameter().copy_(p.core.to(dtype));
      for (auto& [n, f] : p.factors) a->factors()[n].copy_(f.to(dtype));
    } else if (p.embedding) {
      a->factors()[0].copy_(p.a.t().to(dtype));
      a->core_parameter().copy_(p.b.t().to(dtype));
    } else {
      a->core_parameter().copy_(p.a.to(dtype));
      a->factors()[0].copy_(p.b.reshape({p.b.size(0), p.b.size(1)}).to(dtype));
    }
    loaded.push_back(module);
  }
  return loaded;
}

}  // namespace io
}  // namespace flora

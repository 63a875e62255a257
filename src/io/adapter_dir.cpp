#include "flora/io/adapter_dir.h"

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <cmath>
#include <map>
#include <regex>
#include <set>

#include "flora/io/safetensors.h"
#include "flora/inject.h"
#include "flora/io/export.h"
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

// Whether lora_A's `groups` blocks of rows are equal bit for bit: flora's own saves repeat one
// block per group (PEFT's grouped layout of a rank r / groups update); PEFT trains them apart.
bool repeats_per_group(const torch::Tensor& a, int64_t groups) {
  if (a.size(0) % groups != 0) return false;
  const auto blocks = a.reshape({groups, a.size(0) / groups, -1});
  for (int64_t j = 1; j < groups; ++j)
    if (!torch::equal(blocks[j], blocks[0])) return false;
  return true;
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
  return save_adapter(adaptable_layers(model), dir, o);
}

std::vector<std::string> load_adapter(torch::nn::Module& model, const std::string& dir, const std::string& name) {
  return load_adapter(adaptable_layers(model), dir, name);
}

int save_adapter(const NamedLayers& layers, const std::string& dir, const SaveAdapterOptions& o) {
  std::vector<Entry> entries;
  for (const auto& [name, layer] : layers)
    if (layer && layer->has_adapter(o.adapter_name)) entries.push_back({name, layer, layer->adapter(o.adapter_name)});
  if (entries.empty())
    fail(dir, "no module of the model has an adapter named '" + o.adapter_name + "'", "inject adapters before saving");
  const Method method = entries.front().adapter->spec().method;
  for (const auto& e : entries)
    if (e.adapter->spec().method != method)
      fail(dir, "module '" + e.name + "' uses " + to_string(e.adapter->spec().method) + " but '" + entries.front().name +
                    "' uses " + to_string(method), "one directory holds one adapter type");

  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  json config;
  std::vector<std::string> targets, parameters;
  json layer_info = json::object();
  for (const auto& e : entries) {
    const auto t = e.layer->target_info();
    (t.kind == LayerKind::Parameter ? parameters : targets).push_back(e.name);
    json info = {{"type", to_string(t.kind)}, {"shape", t.shape}};
    if (t.groups != 1) info["groups"] = t.groups;
    layer_info[e.name] = info;
  }
  config["target_modules"] = targets;
  if (!parameters.empty()) config["target_parameters"] = parameters;
  config["base_model_name_or_path"] = o.base_model_name_or_path;
  config["format_version"] = kFormatVersion;
  config["layers"] = layer_info;
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
    std::vector<PeftLoraModule> modules;
    const bool rslora = entries.front().adapter->spec().use_rslora;
    for (const auto& e : entries) {
      const auto& spec = e.adapter->spec();
      if (spec.use_rslora != rslora)
        fail(dir, "module '" + e.name + "' disagrees with '" + entries.front().name + "' on use_rslora", "PEFT stores one use_rslora");
      // PEFT's layout is the export algebra (flora/io/export.h); for grouped convs it repeats
      // lora_A per group, so the saved r is groups * r with the same dW.
      StoredModule m;
      m.name = e.name;
      m.kind = to_string(spec.target.kind);
      m.weight_shape = spec.target.shape;
      m.groups = spec.target.groups;
      m.scale = e.adapter->scale();
      m.lora_rank = spec.ranks[0];
      m.lora_alpha = spec.alpha;
      m.core = e.adapter->core().detach();
      m.factors[0] = e.adapter->factors()[0].detach();
      auto peft = to_peft_lora(m);
      peft.alpha = peft.rank == spec.ranks[0] ? spec.alpha
                   : rslora ? m.scale * std::sqrt(static_cast<double>(peft.rank)) : m.scale * static_cast<double>(peft.rank);
      modules.push_back(std::move(peft));
    }
    write_peft_lora(dir, modules, entries.front().adapter->spec().use_rslora, o.base_model_name_or_path);
    return static_cast<int>(entries.size());
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(dir, "cannot create the directory: " + ec.message(), "");
  atomic_write((fs::path(dir) / kWeights).string(), serialize_safetensors(tensors, {{"format", "pt"}}));
  atomic_write((fs::path(dir) / kConfig).string(), config.dump(2) + "\n");
  return static_cast<int>(entries.size());
}

void write_peft_lora(const std::string& dir, const std::vector<PeftLoraModule>& modules, bool use_rslora,
                     const std::string& base_model_name_or_path) {
  if (modules.empty()) fail(dir, "no modules to write", "");
  std::vector<int64_t> ranks;
  std::vector<double> alphas;
  for (const auto& m : modules) {
    ranks.push_back(m.rank);
    alphas.push_back(m.alpha);
  }
  const int64_t r = most_common(ranks);
  const double alpha = most_common(alphas);
  json rank_pattern = json::object(), alpha_pattern = json::object(), layer_info = json::object();
  std::vector<std::string> targets;
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& m : modules) {
    targets.push_back(m.name);
    if (m.rank != r) rank_pattern[m.name] = m.rank;
    if (m.alpha != alpha) alpha_pattern[m.name] = m.alpha;
    const std::string base = kPrefix + m.name;
    if (m.embedding) {
      tensors.emplace_back(base + ".lora_embedding_A", m.a.contiguous());
      tensors.emplace_back(base + ".lora_embedding_B", m.b.contiguous());
    } else {
      tensors.emplace_back(base + ".lora_A.weight", m.a.contiguous());
      tensors.emplace_back(base + ".lora_B.weight", m.b.contiguous());
    }
    if (!m.kind.empty()) {
      json info = {{"type", m.kind}, {"shape", m.weight_shape}};
      if (m.groups != 1) info["groups"] = m.groups;
      layer_info[m.name] = info;
    }
  }
  // PEFT matches pattern keys as dotted suffixes: make sure each module resolves to its own values.
  for (const auto& m : modules) {
    int64_t got_r = r;
    double got_alpha = alpha;
    lookup_pattern(rank_pattern, m.name, got_r);
    lookup_pattern(alpha_pattern, m.name, got_alpha);
    if (got_r != m.rank || got_alpha != m.alpha)
      fail(dir, "rank_pattern / alpha_pattern cannot give module '" + m.name + "' its own rank " + std::to_string(m.rank) +
                    ": a pattern for another module is a dotted suffix of its name",
           "give modules whose names are suffixes of each other the same rank");
  }
  json config;
  config["peft_type"] = "LORA";
  config["r"] = r;
  config["lora_alpha"] = alpha;
  config["use_rslora"] = use_rslora;
  config["rank_pattern"] = rank_pattern;
  config["alpha_pattern"] = alpha_pattern;
  config["target_modules"] = targets;
  config["base_model_name_or_path"] = base_model_name_or_path;
  config["bias"] = "none";
  config["fan_in_fan_out"] = false;
  config["task_type"] = nullptr;
  config["modules_to_save"] = nullptr;
  config["lora_dropout"] = 0.0;
  config["format_version"] = kFormatVersion;
  config["layers"] = layer_info;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(dir, "cannot create the directory: " + ec.message(), "");
  atomic_write((fs::path(dir) / kWeights).string(), serialize_safetensors(tensors, {{"format", "pt"}}));
  atomic_write((fs::path(dir) / kConfig).string(), config.dump(2) + "\n");
}

AdapterDirectory read_adapter(const std::string& dir) {
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
                                                 "base_model_name_or_path", "format_version", "layers"};
  static const std::set<std::string> known_lora{"peft_type", "r", "lora_alpha", "use_rslora", "target_modules",
                                                "rank_pattern", "alpha_pattern", "base_model_name_or_path", "bias",
                                                "fan_in_fan_out", "task_type", "modules_to_save", "lora_dropout",
                                                "init_lora_weights", "inference_mode", "revision", "layers_to_transform",
                                                "layers_pattern", "use_dora", "format_version", "layers", "target_parameters"};
  for (auto it = config.begin(); it != config.end(); ++it)
    if (!(flora ? known_flora : known_lora).count(it.key()))
      std::cerr << "flora: warning: adapter '" << dir << "': ignoring unknown config key \"" << it.key() << "\"\n";
  AdapterDirectory out;
  out.dir = dir;
  out.method = flora ? Method::Flora : Method::Lora;
  try {
    if (flora && config.value("format_version", kFormatVersion) > kFormatVersion)
      fail(dir, "format_version " + std::to_string(config["format_version"].get<int>()) + " is newer than this flora reads (" +
                    std::to_string(kFormatVersion) + ")", "upgrade flora");
    out.use_rslora = config.value("use_rslora", false);
    if (config.contains("base_model_name_or_path") && config["base_model_name_or_path"].is_string())
      out.base_model_name_or_path = config["base_model_name_or_path"];
  } catch (const json::exception& e) {
    fail(dir, std::string("adapter_config.json has a value of the wrong type: ") + e.what(), "compare with docs/FORMATS.md");
  }
  SafetensorsFile file(weights_path.string());

  // 3. Tensor names -> (module, role).
  std::map<std::string, StoredModule> modules;
  std::map<std::string, torch::Tensor> lora_a, lora_b;
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
    p.name = module;
    auto value = file.load(t.name);
    if (role == "flora_core") p.core = value;
    else if (role.rfind("flora_factors.", 0) == 0) {
      const std::string idx = role.substr(14);
      if (idx.empty() || idx.size() > 3 || idx.find_first_not_of("0123456789") != std::string::npos)
        fail(dir, "tensor '" + t.name + "' has a factor index '" + idx + "'", "factors are numbered from 0");
      p.factors[std::stoll(idx)] = value;
    } else if (role == "lora_A.weight") lora_a[module] = value;
    else if (role == "lora_B.weight") lora_b[module] = value;
    else if (role == "lora_embedding_A") { lora_a[module] = value; p.embedding = true; }
    else { lora_b[module] = value; p.embedding = true; }
  }
  if (modules.empty()) fail(dir, "adapter_model.safetensors holds no tensors", "");
  // 4. Complete sets, and the per-module hyper-parameters.
  const json layers = config.value("layers", json::object());
  for (auto& [module, p] : modules) {
    if (flora) {
      if (!p.core.defined()) fail(dir, "module '" + module + "' has factors but no flora_core", "incomplete adapter file");
      for (const auto& [n, f] : p.factors)
        if (n >= p.core.dim() || f.dim() != 2 || f.size(1) != p.core.size(n))
          fail(dir, "tensor '" + kPrefix + module + ".flora_factors." + std::to_string(n) + "' has shape " + format_shape(f.sizes().vec()) +
                        ", which does not fit flora_core " + format_shape(p.core.sizes().vec()),
               "factor n is [I_n, r_n] with r_n = flora_core.shape[n]");
      p.scale = config.value("scale", 1.0);
      lookup_pattern(config.value("scale_pattern", json::object()), module, p.scale);
    } else {
      if (!lora_a.count(module) || !lora_b.count(module))
        fail(dir, "module '" + module + "' needs both lora_A and lora_B", "incomplete adapter file");
      const auto a = lora_a[module], b = lora_b[module];
      p.lora_rank = config.value("r", int64_t{8});
      p.lora_alpha = config.value("lora_alpha", 8.0);
      lookup_pattern(config.value("rank_pattern", json::object()), module, p.lora_rank);
      lookup_pattern(config.value("alpha_pattern", json::object()), module, p.lora_alpha);
      const int64_t r = p.lora_rank;
      auto bad = [&](const std::string& role, const torch::Tensor& v, const std::string& want) {
        fail(dir, "tensor '" + kPrefix + module + "." + role + "' has shape " + format_shape(v.sizes().vec()) + ", expected " + want +
                      " with r = " + std::to_string(r), "check r / rank_pattern in adapter_config.json");
      };
      if (r < 1) fail(dir, "module '" + module + "' has r = " + std::to_string(r), "r must be positive");
      p.scale = out.use_rslora ? p.lora_alpha / std::sqrt(static_cast<double>(r)) : p.lora_alpha / static_cast<double>(r);
      if (p.embedding) {
        if (a.dim() != 2 || a.size(0) != r) bad("lora_embedding_A", a, "[r, num_embeddings]");
        if (b.dim() != 2 || b.size(1) != r) bad("lora_embedding_B", b, "[embedding_dim, r]");
        p.core = b.t().contiguous();
        p.factors[0] = a.t().contiguous();
      } else {
        if (a.dim() < 2 || a.size(0) != r) bad("lora_A.weight", a, "[r, in, k...]");
        // Grouped convs: lora_B is [out, r/groups, 1...] (PEFT's grouped 1x1 conv).
        bool pointwise = b.dim() == a.dim() && b.size(1) >= 1 && r % b.size(1) == 0 && b.size(0) % (r / b.size(1)) == 0;
        for (int64_t d = 2; pointwise && d < b.dim(); ++d) pointwise = b.size(d) == 1;
        if (!pointwise) bad("lora_B.weight", b, "[out, r/groups, 1...]");
        const int64_t groups = r / b.size(1), out_per_group = b.size(0) / groups, r_per_group = b.size(1);
        const auto b2 = b.reshape({b.size(0), r_per_group});
        if (groups > 1 && repeats_per_group(a, groups)) {
          // Every group sees the same lora_A block, as flora's own saves write them (FORMATS.md):
          // dW_(0) = B A_0 with B as one [out, r/groups] matrix, the rank the adapter was saved
          // from. The scaling is kept (alpha restated for r/groups), so dW is the saved one.
          p.core = a.slice(0, 0, r_per_group);
          p.factors[0] = b2;
          p.lora_rank = r_per_group;
          p.lora_alpha = out.use_rslora ? p.scale * std::sqrt(static_cast<double>(r_per_group)) : p.scale * static_cast<double>(r_per_group);
        } else {
          p.core = a;
          // The grouped 1x1 conv as one [out, r] matrix: block j maps rank channels of group j to
          // the outputs of group j (zero elsewhere), so dW_(0) = B A exactly as for groups = 1.
          auto dense = torch::zeros({b.size(0), r}, b.options());
          for (int64_t j = 0; j < groups; ++j)
            dense.slice(0, j * out_per_group, (j + 1) * out_per_group).slice(1, j * r_per_group, (j + 1) * r_per_group)
                .copy_(b2.slice(0, j * out_per_group, (j + 1) * out_per_group));
          p.factors[0] = dense;
        }
        p.groups = groups;
      }
    }
    if (layers.contains(module) && layers[module].is_object()) {
      const auto& info = layers[module];
      try {
        p.kind = info.value("type", std::string());
        p.weight_shape = info.value("shape", std::vector<int64_t>{});
        p.groups = info.value("groups", int64_t{1});
      } catch (const json::exception& e) {
        fail(dir, "the \"layers\" entry of module '" + module + "' is malformed: " + e.what(), "compare with docs/FORMATS.md");
      }
    }
  }
  for (auto& [module, p] : modules) {
    if (p.kind.empty()) {  // PEFT's own directories do not say; the tensors do, except FLoRA order 2
      if (p.embedding) p.kind = "Embedding";
      else if (p.core.dim() >= 3) p.kind = "Conv";
      else if (!flora) p.kind = "Linear";
    }
    out.modules.push_back(std::move(p));
  }
  return out;
}

std::vector<std::string> load_adapter(const NamedLayers& model_layers, const std::string& dir, const std::string& name) {
  const AdapterDirectory stored = read_adapter(dir);
  const bool flora = stored.method == Method::Flora;
  // 5. Targets exist in the model and can carry an adapter.
  std::map<std::string, nn::AdaptableLayer*> layers;
  for (const auto& [n, l] : model_layers) layers[n] = l;
  for (const auto& p : stored.modules) {
    auto it = layers.find(p.name);
    if (it == layers.end() || !it->second)
      fail(dir, "module '" + p.name + "' of the adapter is not an adaptable layer of the model", "adapter trained for another base model?");
    if (it->second->has_adapter(name)) fail(dir, "module '" + p.name + "' already has an adapter '" + name + "'", "delete it or load under another name");
  }
  // 6. Shapes, and the options each adapter is rebuilt with.
  std::map<std::string, AdapterOptions> options;
  for (const auto& p : stored.modules) {
    const auto target = layers[p.name]->target_info();
    const auto& I = target.shape;
    auto shape_error = [&](const std::string& tensor, const torch::Tensor& v, const std::vector<int64_t>& want) {
      fail(dir, "tensor '" + kPrefix + p.name + "." + tensor + "' has shape " + format_shape(v.sizes().vec()) + ", expected " +
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
        if (!identity[n] && f->second.size(0) != I[n]) shape_error("flora_factors." + std::to_string(n), f->second, {I[n], p.core.size(n)});
      }
      options[p.name] = AdapterOptions().ranks(p.core.sizes().vec()).identity_modes(identity).scale(p.scale).allow_redundant_ranks(true);
    } else {
      const int64_t r = p.lora_rank;
      if (p.embedding) {
        if (target.kind != LayerKind::Embedding) fail(dir, "module '" + p.name + "' has embedding tensors but is a " + to_string(target.kind), "");
        if (p.factors.at(0).size(0) != I[0]) shape_error("lora_embedding_A", p.factors.at(0).t(), {r, I[0]});
        if (p.core.size(1) != I[1]) shape_error("lora_embedding_B", p.core.t(), {I[1], r});
      } else {
        auto want_a = I;
        want_a[0] = r;
        if (p.core.sizes().vec() != want_a) shape_error("lora_A.weight", p.core, want_a);
        if (p.factors.at(0).size(0) != I[0]) shape_error("lora_B.weight", p.factors.at(0), pointwise_shape(I[0], r, I.size()));
      }
      options[p.name] = AdapterOptions().method(Method::Lora).rank(r).alpha(p.lora_alpha).use_rslora(stored.use_rslora).allow_redundant_ranks(true);
    }
  }
  // All checks passed: only now change the model.
  std::vector<std::string> loaded;
  for (const auto& p : stored.modules) {
    auto* layer = layers[p.name];
    layer->set_layer_name(p.name);
    auto a = layer->add_adapter(name, options[p.name]);
    torch::NoGradGuard no_grad;
    const auto dtype = layer->weight.dtype();
    a->core_parameter().copy_(p.core.to(dtype));
    for (const auto& [n, f] : p.factors) a->factors()[n].copy_(f.to(dtype));
    if (stored.method == Method::Lora) a->set_scale(p.scale);  // the file's scaling, even where r was restated
    loaded.push_back(p.name);
  }
  return loaded;
}

}  // namespace io
}  // namespace flora

#include "flora/inject.h"

#include <torch/torch.h>

#include <algorithm>
#include <regex>
#include <sstream>

#include "flora/layers.h"

namespace flora {
namespace {

std::regex compile(const std::string& pattern, const std::string& what) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw InvalidArgument(what + " '" + pattern + "' is not a valid regex: " + e.what());
  }
}

bool is_torch_layer(const torch::nn::Module& m) {
  return dynamic_cast<const torch::nn::LinearImpl*>(&m) || dynamic_cast<const torch::nn::Conv1dImpl*>(&m) ||
         dynamic_cast<const torch::nn::Conv2dImpl*>(&m) || dynamic_cast<const torch::nn::Conv3dImpl*>(&m) ||
         dynamic_cast<const torch::nn::EmbeddingImpl*>(&m);
}

}  // namespace

bool name_matches(const std::string& name, const std::vector<std::string>& list) {
  for (const auto& t : list) {
    if (name == t) return true;
    if (name.size() > t.size() && name.compare(name.size() - t.size(), t.size(), t) == 0 &&
        name[name.size() - t.size() - 1] == '.')
      return true;
  }
  return false;
}

int64_t InjectionReport::total_params() const {
  int64_t n = 0;
  for (const auto& a : adapted) n += a.params;
  return n;
}

std::string InjectionReport::format() const {
  std::ostringstream os;
  size_t w = 6;
  for (const auto& a : adapted) w = std::max(w, a.name.size());
  for (const auto& s : skipped) w = std::max(w, s.name.size());
  char line[512];
  std::snprintf(line, sizeof line, "%-*s  %-9s  %-20s  %-16s  %-18s %10s\n", static_cast<int>(w), "module", "type",
                "shape", "ranks", "path", "params");
  os << line;
  for (const auto& a : adapted) {
    std::snprintf(line, sizeof line, "%-*s  %-9s  %-20s  %-16s  %-18s %10s\n", static_cast<int>(w), a.name.c_str(),
                  a.kind.c_str(), format_shape(a.shape).c_str(), format_shape(a.ranks).c_str(), a.path.c_str(),
                  format_count(a.params).c_str());
    os << line;
    for (const auto& n : a.notes) os << "    note: " << n << "\n";
  }
  os << adapted.size() << " adapted, " << format_count(total_params()) << " adapter parameters\n";
  for (const auto& s : skipped) os << "skipped " << s.name << ": " << s.reason << "\n";
  return os.str();
}

void freeze_base(torch::nn::Module& model) {
  for (auto& item : model.named_parameters()) {
    const auto& name = item.key();
    const bool adapter = name.find(".adapters.") != std::string::npos || name.rfind("adapters.", 0) == 0;
    if (!adapter) item.value().requires_grad_(false);
  }
}

std::vector<std::pair<std::string, nn::AdaptableLayer*>> adaptable_layers(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, nn::AdaptableLayer*>> out;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    const std::string& name = item.key();
    if (name.find(".adapters") != std::string::npos || name.rfind("adapters", 0) == 0) continue;  // our own
    if (auto* l = dynamic_cast<nn::AdaptableLayer*>(item.value().get())) out.emplace_back(name, l);
  }
  return out;
}

InjectionReport inject_adapters(torch::nn::Module& model, const InjectOptions& o) {
  if (!o.targets.parameters.empty())
    throw InvalidArgument("target_parameters are for TorchScript models (hint: in a native model, hold the tensor in a "
                          "flora::nn::ParameterAdapter and target that module by name)");
  // Module names as PyTorch spells them ("layer1.0.conv1"); the root has an empty name.
  std::vector<TargetCandidate> candidates;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    const std::string& name = item.key();
    if (name.find(".adapters") != std::string::npos || name.rfind("adapters", 0) == 0) continue;  // our own
    auto* layer = dynamic_cast<nn::AdaptableLayer*>(item.value().get());
    if (!layer && !item.value()->children().empty()) continue;  // containers are not targets
    TargetCandidate c;
    c.name = name;
    c.layer = layer;
    c.linear = dynamic_cast<nn::LinearImpl*>(item.value().get()) || dynamic_cast<torch::nn::LinearImpl*>(item.value().get());
    if (!layer)
      c.skip_reason = is_torch_layer(*item.value())
                          ? "a torch::nn layer: build the model with flora::nn layers (drop-in, same names)"
                          : "not an adaptable layer (" + item.value()->name() + ")";
    candidates.push_back(std::move(c));
  }
  auto report = inject_candidates(candidates, o);
  if (o.freeze_base) freeze_base(model);
  return report;
}

InjectionReport inject_candidates(const std::vector<TargetCandidate>& candidates, const InjectOptions& o) {
  const auto& sel = o.targets;
  if (sel.empty())
    throw InvalidArgument("no targets given (hint: name modules, give a regex, use all-linear, or name parameters)");
  const std::regex target_re = sel.regex.empty() ? std::regex() : compile(sel.regex, "target regex");
  std::vector<std::pair<std::regex, std::vector<int64_t>>> ranks;
  for (const auto& [p, r] : o.rank_pattern) ranks.emplace_back(compile(p, "rank_pattern"), r);
  std::vector<std::pair<std::regex, double>> scales;
  for (const auto& [p, s] : o.scale_pattern) scales.emplace_back(compile(p, "scale_pattern"), s);

  std::string output_head;
  if (sel.all_linear)
    for (const auto& c : candidates)
      if (c.linear) output_head = c.name;

  InjectionReport report;
  for (const auto& c : candidates) {
    const std::string& name = c.name;
    bool selected = false;
    if (c.is_parameter) {
      selected = name_matches(name, sel.parameters);
    } else {
      if (!sel.regex.empty()) selected = std::regex_match(name, target_re);
      else if (!sel.names.empty()) selected = name_matches(name, sel.names);
      if (sel.all_linear && c.linear && name != output_head) selected = true;
    }
    if (!selected) continue;
    if (name_matches(name, sel.exclude)) {
      report.skipped.push_back({name, "excluded"});
      continue;
    }
    if (!c.layer) {
      report.skipped.push_back({name, c.skip_reason});
      continue;
    }
    const auto target = c.layer->target_info();
    if (!sel.kinds.empty() && std::find(sel.kinds.begin(), sel.kinds.end(), target.kind) == sel.kinds.end()) {
      report.skipped.push_back({name, "type " + to_string(target.kind) + " is filtered out"});
      continue;
    }
    AdapterOptions opt = o.adapter;
    for (const auto& [re, r] : ranks)
      if (std::regex_match(name, re)) {
        if (opt.method() == Method::Lora) {
          if (r.size() != 1) throw InvalidArgument("rank_pattern for LoRA module '" + name + "' must give one rank, got " + format_shape(r));
          opt.rank(r[0]);
        } else {
          opt.ranks(r);
        }
      }
    for (const auto& [re, s] : scales)
      if (std::regex_match(name, re)) {
        if (opt.method() == Method::Lora) opt.alpha(s);
        else opt.scale(s);
      }
    if (o.per_layer) o.per_layer(target, opt);
    c.layer->set_layer_name(name);
    auto adapter = c.layer->add_adapter(o.adapter_name, opt);
    const auto& spec = adapter->spec();
    report.adapted.push_back({name, to_string(target.kind), target.shape, spec.ranks,
                              target.kind == LayerKind::Conv
                                  ? (spec.conv_path == ConvPath::Auto ? "auto (cost model)" : to_string(spec.conv_path))
                                  : "-",
                              parameter_count(spec), spec.notes});
  }
  if (report.adapted.empty()) {
    std::string why;
    for (const auto& s : report.skipped) why += " " + s.name + " (" + s.reason + ");";
    throw InvalidArgument("no module was adapted" + (why.empty() ? std::string(": no module name matched the targets") : ":" + why) +
                          " (hint: module names look like 'layer1.0.conv1'; `flora inspect` lists them)");
  }
  return report;
}

}  // namespace flora

#include "flora/script.h"

#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <sstream>
#include <unordered_set>

#include "flora/io/safetensors.h"
#include "flora/layers.h"

namespace flora {
namespace {

// The unqualified class name: "__torch__.torch.nn.modules.conv.___torch_mangle_3.Conv2d" -> "Conv2d".
std::string type_name(const torch::jit::Module& m) {
  const auto qn = m.type()->name();
  return qn ? qn->name() : std::string();
}

bool layer_kind(const std::string& type, LayerKind& kind) {
  if (type == "Linear" || type == "NonDynamicallyQuantizableLinear") kind = LayerKind::Linear;
  else if (type == "Conv1d" || type == "Conv2d" || type == "Conv3d") kind = LayerKind::Conv;
  else if (type == "Embedding") kind = LayerKind::Embedding;
  else return false;
  return true;
}

// Conv groups are a constant of the scripted or traced graph (aten::_convolution input 8,
// aten::convNd input 6); 1 when the graph does not say.
int64_t conv_groups(const torch::jit::Module& m) {
  try {
    auto graph = m.get_method("forward").graph()->copy();
    torch::jit::Inline(*graph);
    int64_t groups = 0;
    std::function<void(torch::jit::Block*)> visit = [&](torch::jit::Block* block) {
      for (auto* node : block->nodes()) {
        const std::string kind = node->kind().toQualString();
        size_t index = 0;
        if (kind == "aten::_convolution") index = 8;
        else if (kind == "aten::conv1d" || kind == "aten::conv2d" || kind == "aten::conv3d") index = 6;
        if (index && node->inputs().size() > index && groups == 0)
          if (auto v = torch::jit::toIValue(node->input(index)); v && v->isInt()) groups = v->toInt();
        for (auto* b : node->blocks()) visit(b);
      }
    };
    visit(graph->block());
    return groups > 0 ? groups : 1;
  } catch (const c10::Error&) {
    return 1;
  }
}

bool has_parameter(const torch::jit::Module& m, const std::string& name) {
  for (const auto& p : m.named_parameters(/*recurse=*/false))
    if (p.name == name) return true;
  return false;
}

nn::ParameterAdapterImpl& as_parameter_adapter(const std::shared_ptr<nn::AdaptableLayer>& l) {
  return static_cast<nn::ParameterAdapterImpl&>(*l);
}

}  // namespace

ScriptModel ScriptModel::load(const std::string& path, const torch::Device& device) {
  if (!std::filesystem::is_regular_file(path))
    throw Error("model '" + path + "': no such file (hint: export it in Python with torch.jit.script(m).save(path))");
  try {
    return ScriptModel(torch::jit::load(path, device));
  } catch (const c10::Error& e) {
    std::string what = e.what_without_backtrace();
    if (auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
    throw Error("model '" + path + "': not a loadable TorchScript archive: " + what +
                " (hint: save it in Python with torch.jit.script(m).save(path) or torch.jit.trace(m, x).save(path))");
  }
}

ScriptModel::ScriptModel(torch::jit::Module module) : module_(std::move(module)) {
  for (const auto& item : module_.named_modules()) {
    if (item.name.empty()) continue;
    LayerKind kind;
    if (!layer_kind(type_name(item.value), kind) || !has_parameter(item.value, "weight")) continue;
    const auto weight = item.value.attr("weight").toTensor();
    const int64_t groups = kind == LayerKind::Conv ? conv_groups(item.value) : 1;
    auto layer = std::make_shared<nn::ParameterAdapterImpl>(weight, item.name, kind, groups);
    targets_.push_back({item.name, item.value, "weight", layer, false});
  }
}

ScriptModel::Target& ScriptModel::parameter_target(const std::string& full_name) {
  for (auto& t : targets_)
    if (t.is_parameter && t.name == full_name) return t;
  const auto dot = full_name.rfind('.');
  torch::jit::Module owner = module_;
  if (dot != std::string::npos) {
    std::string path = full_name.substr(0, dot);
    for (const auto& item : module_.named_modules())
      if (item.name == path) owner = item.value;
  }
  const std::string attribute = dot == std::string::npos ? full_name : full_name.substr(dot + 1);
  auto layer = std::make_shared<nn::ParameterAdapterImpl>(owner.attr(attribute).toTensor(), full_name);
  targets_.push_back({full_name, owner, attribute, layer, true});
  return targets_.back();
}

std::vector<TargetCandidate> ScriptModel::candidates(const TargetSelector& selector) {
  std::vector<TargetCandidate> out;
  std::unordered_set<std::string> layer_weights;
  for (const auto& t : targets_)
    if (!t.is_parameter) layer_weights.insert(t.name + ".weight");
  // Leaves in module order: adaptable layers, and the rest with the reason they are not.
  for (const auto& item : module_.named_modules()) {
    if (item.name.empty()) continue;
    auto it = std::find_if(targets_.begin(), targets_.end(), [&](const Target& t) { return !t.is_parameter && t.name == item.name; });
    TargetCandidate c;
    c.name = item.name;
    if (it != targets_.end()) {
      c.layer = it->layer.get();
      c.linear = it->layer->target_info().kind == LayerKind::Linear;
    } else {
      if (item.value.children().size() > 0) continue;  // containers are not targets
      const std::string type = type_name(item.value);
      c.skip_reason = "not an adaptable layer (" + type + "; hint: name its parameters in target_parameters)";
    }
    out.push_back(std::move(c));
  }
  if (!selector.parameters.empty())
    for (const auto& p : module_.named_parameters(/*recurse=*/true)) {
      if (!name_matches(p.name, selector.parameters)) continue;
      TargetCandidate c;
      c.name = p.name;
      c.is_parameter = true;
      if (layer_weights.count(p.name))
        c.skip_reason = "the weight of layer '" + p.name.substr(0, p.name.size() - 7) + "': target that module instead";
      else
        c.layer = parameter_target(p.name).layer.get();
      out.push_back(std::move(c));
    }
  return out;
}

std::vector<std::string> ScriptModel::load_adapter(const std::string& dir, const std::string& adapter_name) {
  std::unordered_set<std::string> parameters;
  for (const auto& p : module_.named_parameters(/*recurse=*/true)) parameters.insert(p.name);
  std::unordered_set<std::string> layers;
  for (const auto& t : targets_) layers.insert(t.name);
  for (const auto& m : io::read_adapter(dir).modules)
    if (!layers.count(m.name) && parameters.count(m.name)) parameter_target(m.name);
  return io::load_adapter(this->layers(), dir, adapter_name);
}

InjectionReport ScriptModel::inject(const InjectOptions& options) {
  auto report = inject_candidates(candidates(options.targets), options);
  if (options.freeze_base)
    for (auto p : module_.parameters(/*recurse=*/true)) p.requires_grad_(false);
  for (auto& t : targets_) t.layer->train(module_.is_training());
  return report;
}

torch::jit::IValue ScriptModel::forward(std::vector<torch::jit::IValue> inputs) {
  // Put W0 + dW into each adapted slot for this call; put W0 back however the call ends.
  struct Restore {
    std::vector<Target*> swapped;
    ~Restore() {
      for (auto* t : swapped) t->owner.setattr(t->attribute, t->layer->weight);
    }
  } restore;
  for (auto& t : targets_) {
    auto w = as_parameter_adapter(t.layer).forward();  // W0 itself when no adapter is live
    if (w.unsafeGetTensorImpl() == t.layer->weight.unsafeGetTensorImpl()) continue;
    t.owner.setattr(t.attribute, w);
    restore.swapped.push_back(&t);
  }
  return module_.forward(std::move(inputs));
}

torch::Tensor ScriptModel::forward(const torch::Tensor& x) {
  auto out = forward(std::vector<torch::jit::IValue>{x});
  if (!out.isTensor())
    throw Error("TorchScript model: forward returned " + out.tagKind() + ", expected a Tensor (hint: call forward(inputs) and unpack it)");
  return out.toTensor();
}

io::NamedLayers ScriptModel::layers() const {
  io::NamedLayers out;
  for (const auto& t : targets_) out.emplace_back(t.name, t.layer.get());
  return out;
}

std::vector<torch::Tensor> ScriptModel::trainable_parameters() const {
  std::vector<torch::Tensor> out;
  std::unordered_set<const void*> seen;
  auto add = [&](const torch::Tensor& p) {
    if (p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) out.push_back(p);
  };
  for (const auto& p : module_.parameters(/*recurse=*/true)) add(p);
  for (const auto& t : targets_)
    for (const auto& p : t.layer->parameters()) add(p);
  return out;
}

void ScriptModel::train(bool on) {
  module_.train(on);
  for (auto& t : targets_) t.layer->train(on);
}

bool ScriptModel::is_training() const { return module_.is_training(); }

void ScriptModel::to(const torch::Device& device) {
  module_.to(device);  // moves parameter data in place, so the wrappers' shared tensors follow
  for (auto& t : targets_) t.layer->to(device);
}

void ScriptModel::merge(const std::string& adapter_name) {
  int merged = 0;
  for (auto& t : targets_) {
    const std::string key = adapter_name.empty() ? t.layer->active_adapter() : adapter_name;
    if (key.empty() || !t.layer->has_adapter(key)) continue;
    t.layer->merge(key);
    ++merged;
  }
  if (merged == 0)
    throw InvalidArgument("TorchScript model: no target has adapter '" + (adapter_name.empty() ? std::string("<active>") : adapter_name) +
                          "' to merge (hint: inject or load an adapter first)");
}

void ScriptModel::unmerge() {
  for (auto& t : targets_) t.layer->unmerge();
}

void ScriptModel::set_adapters_enabled(bool enabled) {
  for (auto& t : targets_) t.layer->set_adapters_enabled(enabled);
}

void ScriptModel::set_active_adapter(const std::string& name) {
  for (auto& t : targets_)
    if (t.layer->has_adapter(name)) t.layer->set_active_adapter(name);
}

void ScriptModel::delete_adapter(const std::string& name) {
  for (auto& t : targets_)
    if (t.layer->has_adapter(name)) t.layer->delete_adapter(name);
}

void ScriptModel::save(const std::string& path) const {
  std::ostringstream out;
  module_.save(out);
  io::atomic_write(path, out.str());
}

std::vector<std::pair<std::string, torch::Tensor>> ScriptModel::state_dict() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : module_.named_parameters(/*recurse=*/true)) out.emplace_back(p.name, p.value.detach());
  for (const auto& b : module_.named_buffers(/*recurse=*/true)) out.emplace_back(b.name, b.value);
  return out;
}

}  // namespace flora

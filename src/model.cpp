#include "flora/model.h"

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <unordered_set>

#include "flora/io/safetensors.h"
#include "flora/layers.h"
#include "flora/script.h"
#include "flora/vision.h"

namespace flora {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

class ScriptBacked : public Model {
 public:
  ScriptBacked(ScriptModel m, std::string path) : m_(std::move(m)) { source_ = std::move(path); }
  torch::Tensor forward(const torch::Tensor& x) override { return m_.forward(x); }
  void train(bool on, bool update_batchnorm) override {
    m_.train(on);
    if (on && !update_batchnorm)
      for (auto sub : m_.module().modules()) {
        const auto qn = sub.type()->name();
        if (qn && qn->name().rfind("BatchNorm", 0) == 0) sub.train(false);
      }
  }
  InjectionReport inject(const InjectOptions& o) override { return m_.inject(o); }
  io::NamedLayers layers() const override { return m_.layers(); }
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const override {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (const auto& p : m_.module().named_parameters()) out.emplace_back(p.name, p.value);
    return out;
  }
  std::vector<std::pair<std::string, torch::Tensor>> state_dict() const override { return m_.state_dict(); }
  void merge() override { m_.merge(); }
  void save_merged(const std::string& path) override {
    m_.merge();
    if (ends_with(path, ".pt")) m_.save(path);
    else io::save_safetensors(path, m_.state_dict(), {{"format", "pt"}});
    m_.unmerge();
  }
  void to(const torch::Device& d) override { m_.to(d); }

 protected:
  std::vector<std::string> load_adapter_modules(const std::string& dir, const std::string& name) override {
    return m_.load_adapter(dir, name);
  }

 private:
  ScriptModel m_;
};

class Native : public Model {
 public:
  Native(std::shared_ptr<torch::nn::Module> module, std::function<torch::Tensor(const torch::Tensor&)> fwd, std::string name,
         KeyMap public_name)
      : module_(std::move(module)), fwd_(std::move(fwd)), public_name_(std::move(public_name)) {
    source_ = std::move(name);
  }
  torch::Tensor forward(const torch::Tensor& x) override { return fwd_(x); }
  void train(bool on, bool update_batchnorm) override {
    module_->train(on);
    if (on && !update_batchnorm)
      for (auto& m : module_->modules()) {
        if (dynamic_cast<torch::nn::BatchNorm1dImpl*>(m.get()) || dynamic_cast<torch::nn::BatchNorm2dImpl*>(m.get()) ||
            dynamic_cast<torch::nn::BatchNorm3dImpl*>(m.get()))
          m->eval();
      }
  }
  InjectionReport inject(const InjectOptions& o) override { return inject_adapters(*module_, o); }
  io::NamedLayers layers() const override { return adaptable_layers(*module_); }
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const override {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (const auto& p : module_->named_parameters())
      if (p.key().find("adapters.") == std::string::npos) out.emplace_back(public_key(p.key()), p.value());
    return out;
  }
  std::vector<std::pair<std::string, torch::Tensor>> state_dict() const override {
    auto out = named_parameters();
    for (const auto& b : module_->named_buffers()) out.emplace_back(public_key(b.key()), b.value());
    return out;
  }
  void merge() override {
    for (auto& [name, layer] : layers())
      if (!layer->adapter_names().empty() && !layer->merged()) layer->merge();
  }
  void save_merged(const std::string& path) override {
    if (!ends_with(path, ".safetensors"))
      throw InvalidArgument("'" + path + "': a native model (" + source_ + ") merges into a .safetensors state dict (hint: --out merged.safetensors)");
    merge();
    io::save_safetensors(path, state_dict(), {{"format", "pt"}});
    for (auto& [name, layer] : layers()) layer->unmerge();
  }
  void to(const torch::Device& d) override { module_->to(d); }

 protected:
  std::vector<std::string> load_adapter_modules(const std::string& dir, const std::string& name) override {
    return io::load_adapter(*module_, dir, name);
  }

 private:
  std::string public_key(const std::string& key) const { return public_name_ ? public_name_(key) : key; }
  std::shared_ptr<torch::nn::Module> module_;
  std::function<torch::Tensor(const torch::Tensor&)> fwd_;
  KeyMap public_name_;
};

// A small CNN for the demo and tests: five conv-BN-ReLU stages (32, 64, 64, 128, 128 channels;
// stride 2 in the 2nd, 4th and 5th: a 21-pixel receptive field), global average pooling and a
// linear head: features.{0,3,...,12} convs, features.{1,4,...,13} BatchNorms, fc.
struct SmallCnnImpl : torch::nn::Module {
  SmallCnnImpl() {
    torch::nn::Sequential f;
    int64_t in = 3;
    for (auto [out, stride] : {std::pair<int64_t, int64_t>{32, 1}, {64, 2}, {64, 1}, {128, 2}, {128, 2}}) {
      f->push_back(nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false)));
      f->push_back(torch::nn::BatchNorm2d(out));
      f->push_back(torch::nn::ReLU());
      in = out;
    }
    features = register_module("features", f);
    fc = register_module("fc", nn::Linear(128, 10));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc(features->forward(x).mean({2, 3})); }
  torch::nn::Sequential features{nullptr};
  nn::Linear fc{nullptr};
};
TORCH_MODULE(SmallCnn);

using Factory = std::function<std::unique_ptr<Model>()>;
const std::map<std::string, Factory>& registry() {
  static const std::map<std::string, Factory> r = [] {
    std::map<std::string, Factory> r{
        {"smallcnn", [] {
           SmallCnn m;
           return make_native(m.ptr(), [m](const torch::Tensor& x) mutable { return m->forward(x); }, "smallcnn");
         }},
    };
    for (const auto& arch : vision::architectures()) r[arch] = [arch] { return vision::make_model(arch); };
    return r;
  }();
  return r;
}

}  // namespace

std::unique_ptr<Model> make_native(std::shared_ptr<torch::nn::Module> module,
                                   std::function<torch::Tensor(const torch::Tensor&)> forward, std::string name,
                                   KeyMap public_name) {
  return std::make_unique<Native>(std::move(module), std::move(forward), std::move(name), std::move(public_name));
}

std::vector<std::string> architectures() {
  std::vector<std::string> out;
  for (const auto& [k, v] : registry()) out.push_back(k);
  return out;
}

std::unique_ptr<Model> open_model(const std::string& name) {
  if (ends_with(name, ".pt")) return std::make_unique<ScriptBacked>(ScriptModel::load(name), name);
  auto it = registry().find(name);
  if (it == registry().end()) {
    std::string known;
    for (const auto& a : architectures()) known += (known.empty() ? "" : ", ") + a;
    throw InvalidArgument("model '" + name + "' is neither a TorchScript file (.pt) nor a known architecture (" + known + ")");
  }
  return it->second();
}

std::vector<std::pair<std::string, torch::Tensor>> Model::adapter_parameters(const std::string& adapter_name) const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& [lname, layer] : layers()) {
    if (!layer->has_adapter(adapter_name)) continue;
    for (const auto& p : layer->adapter(adapter_name)->named_parameters())
      out.emplace_back(lname + "." + adapter_name + "." + p.key(), p.value());
  }
  return out;
}

void Model::load_state(const std::vector<std::pair<std::string, torch::Tensor>>& tensors, bool strict) {
  std::map<std::string, torch::Tensor> own;
  for (auto& [k, v] : state_dict()) own[k] = v;
  std::vector<std::string> missing, unexpected, mismatched;
  std::unordered_set<std::string> given;
  for (const auto& [k, v] : tensors) {
    given.insert(k);
    auto it = own.find(k);
    if (it == own.end()) unexpected.push_back(k);
    else if (it->second.sizes() != v.sizes())
      mismatched.push_back(k + " (file " + format_shape(v.sizes().vec()) + ", model " + format_shape(it->second.sizes().vec()) + ")");
  }
  for (const auto& [k, v] : own)
    if (!given.count(k)) missing.push_back(k);
  auto list = [](const std::vector<std::string>& v) {
    std::string s;
    for (size_t i = 0; i < v.size() && i < 8; ++i) s += (i ? ", " : "") + v[i];
    if (v.size() > 8) s += ", ... (" + std::to_string(v.size()) + " in all)";
    return s;
  };
  std::string problems;
  if (!mismatched.empty()) problems += " mis-shaped: " + list(mismatched) + ";";
  if (strict && !missing.empty()) problems += " missing: " + list(missing) + ";";
  if (strict && !unexpected.empty()) problems += " unexpected: " + list(unexpected) + ";";
  if (!problems.empty()) {
    std::string head;
    try {
      head = head_name();
    } catch (const Error&) {
    }
    bool head_only = !mismatched.empty() && missing.empty() && unexpected.empty() && !head.empty();
    for (const auto& m : mismatched) head_only = head_only && m.rfind(head + ".", 0) == 0;
    throw Error("weights do not fit model '" + source_ + "':" + problems +
                (head_only ? " (hint: the file's classifier head has another class count: --num-classes K)"
                           : " (hint: a checkpoint of another architecture, or one saved with different key names)"));
  }
  torch::NoGradGuard no_grad;
  for (const auto& [k, v] : tensors)
    if (own.count(k)) own[k].copy_(v.to(own[k].dtype()));
}

std::vector<std::string> Model::load_adapter_dir(const std::string& dir, const std::string& adapter_name) {
  const auto trained = std::filesystem::path(dir) / "trained_modules.safetensors";
  const bool has_adapter = std::filesystem::exists(std::filesystem::path(dir) / "adapter_config.json");
  if (!std::filesystem::exists(trained) && !has_adapter)
    throw InvalidArgument("'" + dir + "' holds neither adapter_config.json nor trained_modules.safetensors (hint: RUN_DIR/adapter)");
  if (std::filesystem::exists(trained)) {
    auto tensors = io::SafetensorsFile(trained.string()).load_all();
    adopt_shapes(tensors);  // a new head may have another class count than the base model's
    load_state(tensors, /*strict=*/false);
  }
  return has_adapter ? load_adapter_modules(dir, adapter_name) : std::vector<std::string>{};
}

void Model::adopt_shapes(const std::vector<std::pair<std::string, torch::Tensor>>& tensors, const std::string& prefix) {
  std::map<std::string, torch::Tensor> own;
  for (auto& [k, v] : named_parameters()) own[k] = v;
  for (const auto& [k, v] : tensors) {
    auto it = own.find(k);
    if (it != own.end() && k.rfind(prefix, 0) == 0 && it->second.sizes() != v.sizes()) it->second.set_data(torch::empty_like(v));
  }
}

std::string Model::head_name() const {
  std::string head;
  for (const auto& [name, layer] : layers())
    if (layer->target_info().kind == LayerKind::Linear) head = name;
  if (head.empty()) throw InvalidArgument("model '" + source_ + "' has no Linear layer to use as the classifier head");
  return head;
}

void Model::set_num_classes(int64_t k, uint64_t seed) {
  if (k < 1) throw InvalidArgument("--num-classes " + std::to_string(k) + " is invalid (expected >= 1)");
  const std::string head = head_name();
  torch::Tensor w, b;
  for (auto& [name, p] : named_parameters()) {
    if (name == head + ".weight") w = p;
    if (name == head + ".bias") b = p;
  }
  if (!w.defined()) throw Error("model '" + source_ + "': head '" + head + "' has no weight parameter");
  torch::NoGradGuard no_grad;
  auto gen = at::detail::createCPUGenerator(seed);
  const int64_t in = w.size(1);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));  // PyTorch's Linear init (kaiming_uniform a=sqrt(5))
  w.set_data(torch::empty({k, in}, w.options()).uniform_(-bound, bound, gen));
  w.requires_grad_(true);
  if (b.defined()) {
    b.set_data(torch::empty({k}, b.options()).uniform_(-bound, bound, gen));
    b.requires_grad_(true);
  }
}

std::vector<std::string> Model::train_modules(const std::vector<std::string>& names) {
  std::vector<std::string> matched;
  for (auto& [name, p] : named_parameters()) {
    const auto dot = name.rfind('.');
    const std::string module = dot == std::string::npos ? "" : name.substr(0, dot);
    if (name_matches(module, names) || name_matches(name, names)) {
      p.requires_grad_(true);
      if (matched.empty() || matched.back() != module) matched.push_back(module);
    }
  }
  if (matched.empty())
    throw InvalidArgument("--train-modules matched no module of '" + source_ + "' (hint: `flora inspect` lists the names)");
  return matched;
}

void Model::unfreeze_all() {
  for (auto& [name, p] : named_parameters()) p.requires_grad_(true);
}

void Model::set_channels_last(bool on) {
  for (auto& [name, p] : named_parameters()) {
    if (p.dim() != 4 && p.dim() != 5) continue;
    const auto format = !on ? at::MemoryFormat::Contiguous
                            : p.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    if (!p.is_contiguous(format)) p.set_data(p.detach().contiguous(format));
  }
}

std::vector<std::pair<std::string, torch::Tensor>> Model::trainable_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::unordered_set<const void*> seen;
  for (const auto& [lname, layer] : layers())
    for (const auto& a : layer->adapter_names())
      for (const auto& p : layer->adapter(a)->named_parameters())
        if (p.value().requires_grad() && seen.insert(p.value().unsafeGetTensorImpl()).second)
          out.emplace_back(lname + "." + a + "." + p.key(), p.value());
  for (const auto& [name, p] : named_parameters())
    if (p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) out.emplace_back(name, p);
  return out;
}

}  // namespace flora

// TuckerAdapter and the adaptable layers. The math lives in functional.cpp; this file holds
// parameters, state (active / merged / enabled) and the choice of forward path.
#include <torch/torch.h>

#include <atomic>
#include <cmath>
#include <iomanip>
#include <sstream>
#include <unordered_set>

#include <ATen/autocast_mode.h>

#include "flora/detail/compat.h"
#include "flora/layers.h"

namespace flora {
namespace nn {
namespace F = flora::functional;

// ---------------------------------------------------------------------------------------------
// TuckerAdapter

TuckerAdapterImpl::TuckerAdapterImpl(AdapterSpec spec, torch::TensorOptions options) : spec_(std::move(spec)) {
  options = options.requires_grad(false);
  const auto N = spec_.ranks.size();
  switch (spec_.core) {
    case CoreKind::Full: core_ = register_parameter("core", torch::empty(spec_.ranks, options)); break;
    case CoreKind::Diagonal:
      core_ = register_parameter("core_diagonal", torch::empty(spec_.core_param_shape(), options));
      break;
    case CoreKind::Identity: break;
  }
  factors_.resize(N);
  for (size_t n = 0; n < N; ++n)
    if (!spec_.identity[n])
      factors_[n] = register_parameter("factor_" + std::to_string(n),
                                       torch::empty({spec_.target.shape[n], spec_.ranks[n]}, options));
  reset_parameters();
}

void TuckerAdapterImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  namespace init = torch::nn::init;
  const double sqrt3 = std::sqrt(3.0), sqrt5 = std::sqrt(5.0);
  switch (spec_.init) {
    case Init::Default:  // resolved away by resolve_spec; treat as Authors
    case Init::Authors:
      if (core_.defined()) core_.zero_();
      for (auto& u : factors_)
        if (u.defined()) init::kaiming_normal_(u, sqrt3, torch::kFanIn, torch::kLeakyReLU);
      break;
    case Init::Orthogonal:
      if (core_.defined()) core_.zero_();
      for (auto& u : factors_)
        if (u.defined()) init::orthogonal_(u);
      break;
    case Init::LoraStyle:
      for (size_t n = 0; n < factors_.size(); ++n) {
        if (!factors_[n].defined()) continue;
        if (n == 0)
          factors_[n].zero_();
        else
          init::kaiming_uniform_(factors_[n], sqrt5, torch::kFanIn, torch::kLeakyReLU);
      }
      if (core_.defined()) {
        if (spec_.target.kind == LayerKind::Embedding)
          core_.normal_();  // PEFT: lora_embedding_B ~ N(0, 1)
        else if (core_.dim() >= 2)
          init::kaiming_uniform_(core_, sqrt5, torch::kFanIn, torch::kLeakyReLU);
        else
          core_.fill_(1.0);  // a diagonal (or order-1) core starts as the identity
      }
      // With an identity mode 0 there is no factor to zero: zero the core instead, so dW = 0.
      if (spec_.identity[0] && core_.defined()) core_.zero_();
      break;
  }
}

torch::Tensor TuckerAdapterImpl::core() const {
  const auto N = static_cast<int64_t>(spec_.ranks.size());
  switch (spec_.core) {
    case CoreKind::Full: return core_;
    case CoreKind::Diagonal: return F::superdiagonal(core_, N);
    case CoreKind::Identity: {
      torch::TensorOptions o;
      for (auto& u : factors_)
        if (u.defined()) o = u.options();
      return F::superdiagonal(torch::ones({spec_.ranks[0]}, o.requires_grad(false)), N);
    }
  }
  return core_;
}

std::vector<std::pair<const void*, int64_t>> TuckerAdapterImpl::cache_key() const {
  std::vector<std::pair<const void*, int64_t>> key;
  for (const auto& p : parameters()) key.emplace_back(p.data_ptr(), static_cast<int64_t>(p._version()));
  return key;
}

bool TuckerAdapterImpl::delta_cached() const {
  return cache_.defined() && cache_scale_ == spec_.scale && cache_key_ == cache_key();
}

torch::Tensor TuckerAdapterImpl::delta_weight(at::MemoryFormat format) const {
  if (torch::GradMode::is_enabled()) {
    cache_ = torch::Tensor();  // training: parameters are about to change
    return F::tucker_delta(core(), factors_, spec_.scale, format);
  }
  if (!delta_cached() || (format != at::MemoryFormat::Preserve && format != cache_format_)) {
    cache_ = F::tucker_delta(core(), factors_, spec_.scale, format);
    cache_key_ = cache_key();
    cache_scale_ = spec_.scale;
    cache_format_ = format;
  }
  return cache_;
}

void TuckerAdapterImpl::train(bool on) {
  torch::nn::Module::train(on);
  if (on) cache_ = torch::Tensor();
}

void TuckerAdapterImpl::set_scale(double scale) {
  check_scale(scale, "layer '" + spec_.target.name + "'");
  spec_.scale = scale;
}

void TuckerAdapterImpl::set_trainable(bool trainable) {
  for (auto& p : parameters()) p.requires_grad_(trainable);
}

void TuckerAdapterImpl::pretty_print(std::ostream& os) const {
  os << "flora::nn::TuckerAdapter(" << to_string(spec_.method) << ", ranks=" << format_shape(spec_.ranks);
  bool any_identity = false;
  for (bool b : spec_.identity) any_identity |= b;
  if (any_identity) {
    os << ", identity=[";
    for (size_t n = 0; n < spec_.identity.size(); ++n) os << (n ? ", " : "") << (spec_.identity[n] ? 1 : 0);
    os << "]";
  }
  if (spec_.core != CoreKind::Full) os << ", core=" << to_string(spec_.core);
  os << ", scale=" << spec_.scale << ", params=" << parameter_count(spec_) << ")";
}

// ---------------------------------------------------------------------------------------------
// AdaptableLayer

void AdaptableLayer::register_base(torch::Tensor w, torch::Tensor b) {
  TORCH_INTERNAL_ASSERT(!registered_, "register_base called twice");
  registered_ = true;
  weight = register_parameter("weight", std::move(w));
  if (b.defined()) bias = register_parameter("bias", std::move(b));
  register_module("adapters", adapters_);
}

TuckerAdapter AdaptableLayer::add_adapter(const std::string& name, const AdapterOptions& options) {
  if (name.empty() || name.find('.') != std::string::npos)
    throw InvalidArgument("layer '" + name_ + "': adapter name '" + name + "' is invalid (hint: a non-empty name without '.')");
  if (adapters_->contains(name))
    throw InvalidArgument("layer '" + name_ + "': adapter '" + name + "' already exists (hint: delete_adapter it first)");
  auto target = target_info();
  auto spec = resolve_spec(options, target);
  TuckerAdapter adapter(std::move(spec), weight.options());
  on_adapter_added(*adapter);
  adapters_->update({{name, adapter.ptr()}});
  weight.requires_grad_(false);
  if (bias.defined()) bias.requires_grad_(false);
  set_active_adapter(name);
  if (!is_training()) adapter->eval();
  return adapter;
}

void AdaptableLayer::set_active_adapter(const std::string& name) {
  auto a = adapter(name);  // throws if absent
  for (const auto& item : adapters_->items()) item.second->as<TuckerAdapterImpl>()->set_trainable(item.first == name);
  active_ = name;
}

void AdaptableLayer::delete_adapter(const std::string& name) {
  adapter(name);
  if (std::find(merged_.begin(), merged_.end(), name) != merged_.end())
    throw InvalidArgument("layer '" + name_ + "': adapter '" + name + "' is merged (hint: unmerge() before deleting it)");
  adapters_->pop(name);
  if (active_ == name) active_.clear();
}

bool AdaptableLayer::has_adapter(const std::string& name) const { return adapters_->contains(name); }

std::vector<std::string> AdaptableLayer::adapter_names() const { return adapters_->keys(); }

TuckerAdapter AdaptableLayer::adapter(const std::string& name) const {
  const std::string& key = name.empty() ? active_ : name;
  if (key.empty() || !adapters_->contains(key)) {
    std::string known;
    for (auto& k : adapters_->keys()) known += (known.empty() ? "" : ", ") + k;
    throw InvalidArgument("layer '" + name_ + "': no adapter '" + key + "' (present: " + (known.empty() ? "none" : known) +
                ") (hint: add_adapter first)");
  }
  return TuckerAdapter(std::dynamic_pointer_cast<TuckerAdapterImpl>((*adapters_)[key]));
}

torch::Tensor AdaptableLayer::delta_weight(const std::string& name) const { return adapter(name)->delta_weight(); }

void AdaptableLayer::merge(const std::string& name) {
  auto a = adapter(name);
  const std::string key = name.empty() ? active_ : name;
  if (std::find(merged_.begin(), merged_.end(), key) != merged_.end())
    throw InvalidArgument("layer '" + name_ + "': adapter '" + key + "' is already merged");
  torch::NoGradGuard no_grad;
  if (!original_weight_.defined()) original_weight_ = weight.detach().clone();
  weight.add_(a->delta_weight().to(weight.dtype()));
  merged_.push_back(key);
}

bool AdaptableLayer::unmerge() {
  if (merged_.empty()) return false;
  torch::NoGradGuard no_grad;
  weight.copy_(original_weight_);
  original_weight_ = torch::Tensor();
  merged_.clear();
  return true;
}

TuckerAdapter AdaptableLayer::live_adapter() const {
  if (!enabled_ || active_.empty()) return nullptr;
  if (std::find(merged_.begin(), merged_.end(), active_) != merged_.end()) return nullptr;
  return adapter(active_);
}

torch::Tensor AdaptableLayer::adapter_input(const torch::Tensor& x, const TuckerAdapterImpl& a) const {
  const double p = a.spec().dropout;
  return (p > 0.0 && is_training()) ? torch::dropout(x, p, true) : x;
}

void AdaptableLayer::print_adapters(std::ostream& os) const {
  if (adapters_->size() == 0) return;
  os << ", adapters=[";
  bool first = true;
  for (const auto& item : adapters_->items()) {
    os << (first ? "" : ", ") << item.first << (item.first == active_ ? "*" : "") << ": ";
    item.second->pretty_print(os);
    first = false;
  }
  os << "]";
  if (!enabled_) os << ", disabled";
  if (merged()) os << ", merged";
}

// ---------------------------------------------------------------------------------------------
// Linear

LinearImpl::LinearImpl(const torch::nn::LinearOptions& options) : AdaptableLayer("Linear"), options_(options) {
  torch::nn::Linear base(options);  // torch's own initialization
  register_base(base->weight, base->bias);
}

LinearImpl::LinearImpl(const torch::nn::LinearImpl& base)
    : AdaptableLayer("Linear"), options_(base.options) {
  register_base(base.weight, base.bias);
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  auto a = live_adapter();
  if (!a) return torch::linear(x, weight, bias);
  const torch::Tensor in = adapter_input(x, *a);
  if (in.is_same(x)) return F::adapted_linear(x, weight, bias, a->core(), a->factors(), a->scale());
  return torch::linear(x, weight, bias) + F::linear_branch(in, a->core(), a->factors(), a->scale());  // dropout
}

namespace {
std::atomic<bool> recompute_inputs_{true};
}  // namespace

void set_recompute_inputs(bool on) { recompute_inputs_ = on; }
bool recompute_inputs() { return recompute_inputs_; }

torch::Tensor LinearImpl::forward_recompute(const F::RecomputableInput& in) {
  const auto& x = in.value();
  auto a = live_adapter();
  // Recompute only where it saves memory: with gradients on, x on the graph (otherwise f's
  // backward keeps no sources, and keeping them could cost more than x: attention weights),
  // and the base weight frozen (a trained one keeps x in its own matmul anyway).
  if (!a || !recompute_inputs_ || !torch::GradMode::is_enabled() || !x.requires_grad() || weight.requires_grad() ||
      (a->spec().dropout > 0.0 && is_training()))
    return forward(x);
  return F::adapted_linear(in, weight, bias, a->core(), a->factors(), a->scale());
}

TargetInfo LinearImpl::target_info() const {
  return {layer_name(), LayerKind::Linear, weight.sizes().vec(), 1};
}

void LinearImpl::pretty_print(std::ostream& os) const {
  os << "flora::nn::Linear(in_features=" << options_.in_features() << ", out_features=" << options_.out_features()
     << ", bias=" << (bias.defined() ? "true" : "false");
  print_adapters(os);
  os << ")";
}

// ---------------------------------------------------------------------------------------------
// ConvNd

namespace {

template <size_t D>
functional::ConvGeometry geometry_of(const torch::nn::ConvOptions<D>& o, const std::string& where) {
  functional::ConvGeometry g;
  g.stride = std::vector<int64_t>(o.stride()->begin(), o.stride()->end());
  g.dilation = std::vector<int64_t>(o.dilation()->begin(), o.dilation()->end());
  g.groups = o.groups();
  const auto kernel = std::vector<int64_t>(o.kernel_size()->begin(), o.kernel_size()->end());
  if (auto* p = flora::detail::variant_get_if<torch::ExpandingArray<D>>(o.padding())) {
    g.padding = std::vector<int64_t>((*p)->begin(), (*p)->end());
  } else if (flora::detail::variant_get_if<torch::enumtype::kValid>(o.padding())) {
    g.padding.assign(D, 0);
  } else {  // kSame
    for (size_t i = 0; i < D; ++i) {
      const int64_t total = g.dilation[i] * (kernel[i] - 1);
      if (total % 2 != 0)
        throw InvalidArgument("layer '" + where + "': padding='same' with kernel " + format_shape(kernel) +
                    " needs asymmetric padding, which is not supported (hint: pad explicitly)");
      g.padding.push_back(total / 2);
    }
  }
  const auto& m = o.padding_mode();
  if (flora::detail::variant_get_if<torch::enumtype::kZeros>(m)) g.padding_mode = functional::PaddingMode::Zeros;
  else if (flora::detail::variant_get_if<torch::enumtype::kReflect>(m)) g.padding_mode = functional::PaddingMode::Reflect;
  else if (flora::detail::variant_get_if<torch::enumtype::kReplicate>(m)) g.padding_mode = functional::PaddingMode::Replicate;
  else g.padding_mode = functional::PaddingMode::Circular;
  if (o.in_channels() % o.groups() != 0 || o.out_channels() % o.groups() != 0)
    throw InvalidArgument("layer '" + where + "': groups " + std::to_string(o.groups()) + " do not divide in_channels " +
                std::to_string(o.in_channels()) + " and out_channels " + std::to_string(o.out_channels()) +
                " (hint: both must be multiples of groups)");
  return g;
}

template <size_t D>
std::pair<torch::Tensor, torch::Tensor> torch_conv_init(const torch::nn::ConvOptions<D>& o) {
  if constexpr (D == 1) {
    torch::nn::Conv1d c(o);
    return {c->weight, c->bias};
  } else if constexpr (D == 2) {
    torch::nn::Conv2d c(o);
    return {c->weight, c->bias};
  } else {
    torch::nn::Conv3d c(o);
    return {c->weight, c->bias};
  }
}

}  // namespace

template <size_t D>
ConvImpl<D>::ConvImpl(const torch::nn::ConvOptions<D>& options)
    : AdaptableLayer("Conv" + std::to_string(D) + "d"), options_(options) {
  geo_ = geometry_of<D>(options_, layer_name());  // validates before torch does
  auto wb = torch_conv_init<D>(options_);
  register_base(wb.first, wb.second);
}

template <size_t D>
TargetInfo ConvImpl<D>::target_info() const {
  return {layer_name(), LayerKind::Conv, weight.sizes().vec(), options_.groups()};
}

template <size_t D>
ConvPathCosts ConvImpl<D>::path_costs(const std::vector<int64_t>& shape, bool training, bool input_requires_grad) const {
  auto a = adapter();
  ConvCostInput in;
  in.batch = shape.size() == D + 2 ? shape[0] : 1;
  in.in_channels = options_.in_channels();
  in.out_channels = options_.out_channels();
  in.groups = options_.groups();
  in.kernel = std::vector<int64_t>(options_.kernel_size()->begin(), options_.kernel_size()->end());
  in.in_spatial = std::vector<int64_t>(shape.end() - D, shape.end());
  in.out_spatial = geo_.output_size(in.in_spatial, in.kernel);
  in.training = training;
  in.input_requires_grad = input_requires_grad;
  in.dropout = is_training() && a->spec().dropout > 0.0;  // as forward: dropout is on in train mode
  in.autocast = at::autocast::is_cpu_enabled() || at::autocast::is_enabled();
  // Only where the model chooses (every forward asks): builds a placeholder input of this shape.
  in.fused_narrow = D == 2 && training && !in.dropout && !in.autocast && a->spec().conv_path == ConvPath::Auto &&
                    F::factorized_fuses_narrow(shape, weight, a->core(), a->factors(), geo_);
  return conv_path_costs(a->spec(), in);
}

template <size_t D>
torch::Tensor ConvImpl<D>::forward(const torch::Tensor& x) {
  auto a = live_adapter();
  if (!a) return F::conv_nd(x, weight, bias, geo_);
  const auto params = a->parameters();
  const bool grads = torch::GradMode::is_enabled() && !params.empty() && params.front().requires_grad();
  const auto costs = path_costs(x.sizes().vec(), grads, x.requires_grad());
  last_path_ = costs.choice;
  const bool drop = is_training() && a->spec().dropout > 0.0;
  if (costs.choice == ConvPath::Hybrid) {
    if (grads) return F::hybrid_conv(x, weight, bias, a->core(), a->factors(), a->scale(), geo_);
    last_path_ = ConvPath::Merged;  // without adapter gradients hybrid is the merged path (cached dW)
  }
  if (costs.choice == ConvPath::Factorized) {
    if (drop)  // the branch takes the dropped-out input, the base conv x
      return F::conv_nd(x, weight, bias, geo_) +
             F::conv_branch(adapter_input(x, *a), a->core(), a->factors(), a->scale(), geo_);
    return F::factorized_conv(x, weight, bias, a->core(), a->factors(), a->scale(), geo_);
  }
  if (costs.choice == ConvPath::Separable) {  // the base conv needs no weight gradient: W0 is frozen
    // Its hand-written backward runs after any autocast scope has closed: keep the branch in the
    // factors' dtype (float32), with autocast off, so forward and backward agree.
    torch::Tensor branch;
    {
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
      auto in = adapter_input(x, *a);
      const auto dtype = a->core().scalar_type();
      branch = F::separable_branch(in.scalar_type() == dtype ? in : in.to(dtype), a->core(), a->factors(), a->scale(), geo_);
    }
    return F::conv_nd(x, weight, bias, geo_) + branch;
  }
  // dW in W0's layout (channels-last in a channels-last model): the sum needs no reorder.
  const auto layout = D == 2 && weight.is_contiguous(at::MemoryFormat::ChannelsLast) && !weight.is_contiguous()
                          ? at::MemoryFormat::ChannelsLast
                          : at::MemoryFormat::Preserve;
  if (drop)  // dropout applies to the adapter's input only: a second conv is unavoidable
    return F::conv_nd(x, weight, bias, geo_) + F::conv_nd(adapter_input(x, *a), a->delta_weight(layout), {}, geo_);
  return F::conv_nd(x, weight + a->delta_weight(layout), bias, geo_);
}

template <size_t D>
void ConvImpl<D>::pretty_print(std::ostream& os) const {
  os << "flora::nn::Conv" << D << "d(" << options_.in_channels() << ", " << options_.out_channels()
     << ", kernel_size=" << options_.kernel_size() << ", stride=" << options_.stride()
     << ", padding=" << format_shape(geo_.padding);
  if (options_.groups() != 1) os << ", groups=" << options_.groups();
  if (geo_.padding_mode != functional::PaddingMode::Zeros) os << ", padding_mode=" << to_string(geo_.padding_mode);
  print_adapters(os);
  os << ")";
}

template class ConvImpl<1>;
template class ConvImpl<2>;
template class ConvImpl<3>;

// ---------------------------------------------------------------------------------------------
// Embedding

EmbeddingImpl::EmbeddingImpl(const torch::nn::EmbeddingOptions& options)
    : AdaptableLayer("Embedding"), options_(options) {
  if (options.max_norm())
    throw InvalidArgument("layer 'Embedding': max_norm is not supported (it rewrites the frozen weight in forward) "
                "(hint: renormalize the weight once before adapting)");
  torch::nn::Embedding base(options);  // torch's init, padding row zero, padding_idx normalized
  options_ = base->options;
  register_base(base->weight, {});
}

void EmbeddingImpl::on_adapter_added(TuckerAdapterImpl& adapter) {
  if (!options_.padding_idx()) return;
  torch::NoGradGuard no_grad;
  const int64_t p = *options_.padding_idx();
  const auto& u = adapter.factors()[0];
  if (u.defined()) u[p].zero_();
  else if (adapter.core_parameter().defined() && adapter.spec().core == CoreKind::Full) adapter.core_parameter()[p].zero_();
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& indices) {
  const int64_t pad = options_.padding_idx().value_or(-1);
  auto y = torch::embedding(weight, indices, pad, options_.scale_grad_by_freq(), options_.sparse());
  if (auto a = live_adapter())
    y = y + F::embedding_branch(indices, a->core(), a->factors(), a->scale(), options_.padding_idx());
  return y;
}

TargetInfo EmbeddingImpl::target_info() const {
  return {layer_name(), LayerKind::Embedding, weight.sizes().vec(), 1};
}

void EmbeddingImpl::pretty_print(std::ostream& os) const {
  os << "flora::nn::Embedding(num_embeddings=" << options_.num_embeddings()
     << ", embedding_dim=" << options_.embedding_dim();
  if (options_.padding_idx()) os << ", padding_idx=" << *options_.padding_idx();
  print_adapters(os);
  os << ")";
}

// ---------------------------------------------------------------------------------------------
// ParameterAdapter

ParameterAdapterImpl::ParameterAdapterImpl(torch::Tensor base, std::string name, LayerKind kind, int64_t groups)
    : AdaptableLayer(std::move(name)), kind_(kind), groups_(groups) {
  if (!base.defined()) throw InvalidArgument("ParameterAdapter '" + layer_name() + "': the base tensor is undefined");
  if (groups < 1 || (kind == LayerKind::Conv && base.dim() >= 1 && base.size(0) % groups != 0))
    throw InvalidArgument("ParameterAdapter '" + layer_name() + "': groups " + std::to_string(groups) + " do not divide " +
                          std::to_string(base.dim() >= 1 ? base.size(0) : 0) + " output channels");
  register_base(std::move(base), {});
}

torch::Tensor ParameterAdapterImpl::forward() {
  if (auto a = live_adapter()) return weight + a->delta_weight();
  return weight;
}

TargetInfo ParameterAdapterImpl::target_info() const {
  return {layer_name(), kind_, weight.sizes().vec(), groups_};
}

void ParameterAdapterImpl::pretty_print(std::ostream& os) const {
  os << "flora::nn::ParameterAdapter(" << layer_name() << ", shape=" << format_shape(weight.sizes().vec());
  print_adapters(os);
  os << ")";
}

// ---------------------------------------------------------------------------------------------

ParameterSummary count_parameters(const torch::nn::Module& module) {
  ParameterSummary s;
  std::unordered_set<const void*> seen;  // tied parameters count once, as in PyTorch
  for (const auto& p : module.parameters()) {
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    s.all += p.numel();
    if (p.requires_grad()) s.trainable += p.numel();
  }
  return s;
}

std::string format_summary(const ParameterSummary& s) {
  std::ostringstream os;
  const double pct = s.all > 0 ? 100.0 * static_cast<double>(s.trainable) / static_cast<double>(s.all) : 0.0;
  os << "trainable params: " << format_count(s.trainable) << " || all params: " << format_count(s.all)
     << " || trainable%: " << std::fixed << std::setprecision(4) << pct;
  return os.str();
}

}  // namespace nn
}  // namespace flora

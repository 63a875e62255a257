// The behaviour battery: every property below runs for every row of {FLoRA, LoRA} x {Linear,
// Conv1d, Conv2d, Conv3d, grouped Conv2d, depthwise Conv2d, Embedding, generic parameter}.
// References are independent of the code under test: torch's own ops applied to W0 + dW, the
// Tucker formula via explicit einsum, and central finite differences in double precision.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <ATen/autocast_mode.h>

#include <cmath>
#include <memory>
#include <numeric>

#include "flora/detail/compat.h"
#include "flora/detail/narrow_gemm.h"
#include "flora/flora.h"
#include "helpers.h"

namespace {

using flora::AdapterOptions;
using flora::ConvPath;
using flora::Method;
using flora::nn::AdaptableLayer;
using flora_test::finite_difference_error;
using flora_test::max_abs_diff;
using flora_test::randomize;
using torch::Tensor;

// One layer kind: how to build it, feed it, and compute its output from an explicit weight.
struct Kind {
  std::string name;
  std::function<std::shared_ptr<AdaptableLayer>()> make;
  std::function<Tensor()> input;
  std::function<Tensor(AdaptableLayer&, const Tensor&)> forward;
  /// The base op with an explicit weight (torch's op): the reference for W0 and W0 + dW.
  std::function<Tensor(AdaptableLayer&, const Tensor& x, const Tensor& weight)> reference;
  std::vector<int64_t> flora_ranks;
  bool is_conv = false;
  /// Input for the finite-difference check (Embedding: without padding_idx, whose row of U_num
  /// deliberately gets no gradient).
  std::function<Tensor()> grad_input;
};

template <size_t D>
Kind conv_kind(std::string name, torch::nn::ConvOptions<D> opt, std::vector<int64_t> in_shape,
               std::vector<int64_t> ranks) {
  Kind k;
  k.name = std::move(name);
  k.is_conv = true;
  k.flora_ranks = std::move(ranks);
  k.make = [opt] { return std::make_shared<flora::nn::ConvImpl<D>>(opt); };
  k.input = [in_shape] { return torch::randn(in_shape, torch::kFloat64); };
  k.forward = [](AdaptableLayer& l, const Tensor& x) { return static_cast<flora::nn::ConvImpl<D>&>(l).forward(x); };
  k.reference = [opt](AdaptableLayer& l, const Tensor& x, const Tensor& w) {
    // torch's functional conv with the module's options (padding via F::pad for other modes).
    namespace F = torch::nn::functional;
    auto pad = *flora::detail::variant_get_if<torch::ExpandingArray<D>>(opt.padding());
    Tensor in = x;
    std::vector<int64_t> p((*pad).begin(), (*pad).end());
    if (!flora::detail::variant_get_if<torch::enumtype::kZeros>(opt.padding_mode())) {
      std::vector<int64_t> rev;
      for (int i = D - 1; i >= 0; --i) rev.insert(rev.end(), {p[i], p[i]});
      in = F::pad(x, F::PadFuncOptions(rev).mode(torch::kReflect));
      std::fill(p.begin(), p.end(), 0);
    }
    std::vector<int64_t> st((*opt.stride()).begin(), (*opt.stride()).end());
    std::vector<int64_t> dl((*opt.dilation()).begin(), (*opt.dilation()).end());
    return at::convolution(in, w, l.bias, st, p, dl, false, std::vector<int64_t>(D, 0), opt.groups());
  };
  return k;
}

std::vector<Kind> kinds() {
  std::vector<Kind> v;
  {
    Kind k;
    k.name = "Linear";
    k.flora_ranks = {3, 2};
    k.make = [] { return std::make_shared<flora::nn::LinearImpl>(6, 5); };
    k.input = [] { return torch::randn({4, 6}, torch::kFloat64); };
    k.forward = [](AdaptableLayer& l, const Tensor& x) { return static_cast<flora::nn::LinearImpl&>(l).forward(x); };
    k.reference = [](AdaptableLayer& l, const Tensor& x, const Tensor& w) { return torch::linear(x, w, l.bias); };
    v.push_back(k);
  }
  v.push_back(conv_kind<1>("Conv1d", torch::nn::Conv1dOptions(3, 4, 3).stride(2).padding(1), {2, 3, 9}, {2, 2, 2}));
  v.push_back(conv_kind<2>("Conv2d", torch::nn::Conv2dOptions(3, 4, 3).padding(1).dilation(2), {2, 3, 6, 6}, {2, 2, 2, 2}));
  v.push_back(conv_kind<3>("Conv3d", torch::nn::Conv3dOptions(2, 3, 2).stride({1, 2, 1}), {1, 2, 4, 5, 4}, {2, 2, 1, 2, 1}));
  v.push_back(conv_kind<2>("GroupedConv2d", torch::nn::Conv2dOptions(4, 6, 3).groups(2).padding(1), {2, 4, 5, 5}, {2, 2, 2, 2}));
  v.push_back(conv_kind<2>("DepthwiseConv2d",
                           torch::nn::Conv2dOptions(4, 4, 3).groups(4).padding(1).padding_mode(torch::kReflect),
                           {2, 4, 5, 5}, {2, 1, 2, 2}));
  {
    Kind k;
    k.name = "Embedding";
    k.flora_ranks = {3, 2};
    k.make = [] { return std::make_shared<flora::nn::EmbeddingImpl>(torch::nn::EmbeddingOptions(7, 4).padding_idx(1)); };
    k.input = [] { return torch::tensor({{0, 1, 6}, {3, 3, 1}}, torch::kLong); };
    k.grad_input = [] { return torch::tensor({{0, 2, 6}, {3, 3, 5}}, torch::kLong); };
    k.forward = [](AdaptableLayer& l, const Tensor& x) { return static_cast<flora::nn::EmbeddingImpl&>(l).forward(x); };
    k.reference = [](AdaptableLayer&, const Tensor& x, const Tensor& w) { return torch::embedding(w, x, 1); };
    v.push_back(k);
  }
  {
    Kind k;
    k.name = "Parameter";
    k.flora_ranks = {2, 2, 3};
    k.make = [] { return std::make_shared<flora::nn::ParameterAdapterImpl>(torch::randn({4, 3, 5}), "pos_embedding"); };
    k.input = [] { return torch::randn({4, 3, 5}, torch::kFloat64); };
    k.forward = [](AdaptableLayer& l, const Tensor& x) {
      return x * static_cast<flora::nn::ParameterAdapterImpl&>(l).forward();
    };
    k.reference = [](AdaptableLayer&, const Tensor& x, const Tensor& w) { return x * w; };
    v.push_back(k);
  }
  return v;
}

struct Row {
  Kind kind;
  Method method;
  std::string name() const { return kind.name + (method == Method::Flora ? "_FLoRA" : "_LoRA"); }
  AdapterOptions options() const {
    if (method == Method::Flora) return AdapterOptions().ranks(kind.flora_ranks).scale(0.8);
    return AdapterOptions().method(Method::Lora).rank(2).alpha(4);
  }
};

std::vector<Row> rows() {
  std::vector<Row> r;
  for (auto& k : kinds())
    for (auto m : {Method::Flora, Method::Lora}) r.push_back({k, m});
  return r;
}

class Battery : public ::testing::TestWithParam<Row> {
 protected:
  void SetUp() override {
    torch::manual_seed(7);
    layer = GetParam().kind.make();
    layer->to(torch::kFloat64);
    w0 = layer->weight.detach().clone();
    adapter = layer->add_adapter("default", GetParam().options());
  }
  Tensor forward(const Tensor& x) { return GetParam().kind.forward(*layer, x); }
  Tensor reference(const Tensor& x, const Tensor& w) { return GetParam().kind.reference(*layer, x, w); }
  std::vector<Tensor> adapter_params() { return adapter->parameters(); }
  std::vector<ConvPath> paths() const {
    if (!GetParam().kind.is_conv) return {ConvPath::Auto};
    std::vector<ConvPath> p{ConvPath::Merged, ConvPath::Factorized};
    if (flora::separable_applies(layer->target_info())) p.push_back(ConvPath::Separable);
    if (flora::hybrid_applies(layer->target_info())) p.push_back(ConvPath::Hybrid);
    return p;
  }

  std::shared_ptr<AdaptableLayer> layer;
  flora::nn::TuckerAdapter adapter{nullptr};
  Tensor w0;
};

TEST_P(Battery, ZeroInitGivesBaseOutput) {
  auto x = GetParam().kind.input();
  for (auto path : paths()) {
    adapter->set_conv_path(path);
    EXPECT_LT(max_abs_diff(forward(x), reference(x, w0)), 1e-12) << flora::to_string(path);
  }
  EXPECT_LT(adapter->delta_weight().abs().max().item<double>(), 1e-15);
}

TEST_P(Battery, AdapterIsOnForwardPathAndEqualsWeightDelta) {
  randomize(adapter_params());
  auto x = GetParam().kind.input();
  const auto dw = adapter->delta_weight();
  ASSERT_GT(dw.abs().max().item<double>(), 1e-3);
  for (auto path : paths()) {
    adapter->set_conv_path(path);
    auto y = forward(x);
    EXPECT_GT(max_abs_diff(y, reference(x, w0)), 1e-3) << "adapter has no effect on " << flora::to_string(path);
    EXPECT_LT(max_abs_diff(y, reference(x, w0 + dw)), 1e-10) << flora::to_string(path);
  }
  layer->set_adapters_enabled(false);
  EXPECT_LT(max_abs_diff(forward(x), reference(x, w0)), 1e-12);
}

TEST_P(Battery, MergedEqualsUnmergedAndUnmergeRestoresExactly) {
  randomize(adapter_params());
  auto x = GetParam().kind.input();
  auto y = forward(x).detach();
  layer->merge();
  EXPECT_TRUE(layer->merged());
  EXPECT_LT(max_abs_diff(forward(x), y), 1e-10);
  EXPECT_LT(max_abs_diff(layer->weight, w0 + adapter->delta_weight()), 1e-12);
  EXPECT_THROW(layer->merge(), flora::Error);  // already merged
  EXPECT_THROW(layer->delete_adapter("default"), flora::Error);
  EXPECT_TRUE(layer->unmerge());
  EXPECT_TRUE(torch::equal(layer->weight, w0)) << "unmerge must restore W0 bit for bit";
  EXPECT_LT(max_abs_diff(forward(x), y), 1e-10);
  EXPECT_FALSE(layer->unmerge());
}

TEST_P(Battery, OnlyAdapterParametersChangeUnderTraining) {
  layer->train();
  torch::optim::AdamW opt(layer->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  Tensor bias0 = layer->bias.defined() ? layer->bias.detach().clone() : Tensor();
  std::vector<Tensor> before;
  for (auto& p : adapter_params()) before.push_back(p.detach().clone());
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    auto x = GetParam().kind.input();
    (forward(x) - 1.0).pow(2).mean().backward();
    opt.step();
  }
  EXPECT_TRUE(torch::equal(layer->weight, w0));
  if (bias0.defined()) EXPECT_TRUE(torch::equal(layer->bias, bias0));
  auto after = adapter_params();
  for (size_t i = 0; i < after.size(); ++i)
    EXPECT_FALSE(torch::equal(after[i], before[i])) << "adapter parameter " << i << " did not train";
  EXPECT_FALSE(layer->weight.requires_grad());
}

TEST_P(Battery, GradientsMatchFiniteDifferences) {
  randomize(adapter_params());
  auto x = GetParam().kind.grad_input ? GetParam().kind.grad_input() : GetParam().kind.input();
  auto probe = torch::randn_like(reference(x, w0));
  for (auto path : paths()) {
    adapter->set_conv_path(path);
    auto loss = [&] { return (forward(x) * probe).sum(); };
    EXPECT_LT(finite_difference_error(loss, adapter_params()), 1e-6) << flora::to_string(path);
  }
}

class ConvBattery : public Battery {};

TEST_P(ConvBattery, ConvPathsAgreeOnOutputsAndGradients) {
  randomize(adapter_params());
  auto x = GetParam().kind.input().requires_grad_(true);
  std::vector<Tensor> outs, grads;
  for (auto path : paths()) {
    adapter->set_conv_path(path);
    for (auto& p : adapter_params()) p.mutable_grad() = Tensor();
    x.mutable_grad() = Tensor();
    auto y = forward(x);
    y.pow(2).sum().backward();
    outs.push_back(y.detach());
    std::vector<Tensor> g{x.grad().clone()};
    for (auto& p : adapter_params()) g.push_back(p.grad().clone());
    grads.push_back(torch::cat([&] {
      std::vector<Tensor> flat;
      for (auto& t : g) flat.push_back(t.reshape(-1));
      return flat;
    }()));
  }
  for (size_t i = 1; i < outs.size(); ++i) {
    EXPECT_LT(max_abs_diff(outs[0], outs[i]), 1e-10) << flora::to_string(paths()[i]);
    EXPECT_LT(max_abs_diff(grads[0], grads[i]), 1e-9) << flora::to_string(paths()[i]);
  }
}

TEST_P(Battery, ParameterCountMatchesFormula) {
  const auto& s = adapter->spec();
  // Independent formula: FLoRA prod(r) + sum I_n r_n; LoRA r * (I_0 + prod(I_1..)) (PEFT).
  int64_t expected = 0;
  const auto shape = layer->weight.sizes().vec();
  if (GetParam().method == Method::Flora) {
    expected = std::accumulate(s.ranks.begin(), s.ranks.end(), int64_t{1}, std::multiplies<int64_t>());
    for (size_t n = 0; n < shape.size(); ++n) expected += shape[n] * s.ranks[n];
  } else {
    const int64_t fan_in = std::accumulate(shape.begin() + 1, shape.end(), int64_t{1}, std::multiplies<int64_t>());
    expected = 2 * (shape[0] + fan_in);
  }
  EXPECT_EQ(flora::parameter_count(s), expected);
  EXPECT_EQ(flora::nn::count_parameters(*adapter).trainable, expected);
  const int64_t base = layer->weight.numel() + (layer->bias.defined() ? layer->bias.numel() : 0);
  auto summary = flora::nn::count_parameters(*layer);
  EXPECT_EQ(summary.trainable, expected);
  EXPECT_EQ(summary.all, base + expected);
}

TEST_P(Battery, ScaleChangeScalesTheUpdate) {
  randomize(adapter_params());
  auto dw = adapter->delta_weight().detach();
  adapter->set_scale(adapter->scale() * 2.5);
  EXPECT_LT(max_abs_diff(adapter->delta_weight(), dw * 2.5), 1e-12);
  EXPECT_THROW(adapter->set_scale(std::numeric_limits<double>::infinity()), flora::Error);
  EXPECT_THROW(adapter->set_scale(std::nan("")), flora::Error);
}

TEST_P(Battery, SeveralNamedAdaptersSelectDeleteAndMergeOne) {
  randomize(adapter_params());
  auto other = layer->add_adapter("other", GetParam().options());
  randomize(other->parameters());
  EXPECT_EQ(layer->active_adapter(), "other");
  auto x = GetParam().kind.input();
  EXPECT_LT(max_abs_diff(forward(x), reference(x, w0 + other->delta_weight())), 1e-10);
  for (auto& p : adapter->parameters()) EXPECT_FALSE(p.requires_grad()) << "inactive adapter must be frozen";
  layer->set_active_adapter("default");
  EXPECT_LT(max_abs_diff(forward(x), reference(x, w0 + adapter->delta_weight())), 1e-10);
  for (auto& p : adapter->parameters()) EXPECT_TRUE(p.requires_grad());
  layer->merge("other");  // merged "other" plus the live "default"
  EXPECT_LT(max_abs_diff(forward(x), reference(x, w0 + other->delta_weight() + adapter->delta_weight())), 1e-10);
  layer->unmerge();
  layer->delete_adapter("other");
  EXPECT_EQ(layer->adapter_names(), std::vector<std::string>{"default"});
  EXPECT_THROW(layer->set_active_adapter("other"), flora::Error);
  EXPECT_THROW(layer->add_adapter("default", GetParam().options()), flora::Error);
}

std::string row_name(const ::testing::TestParamInfo<Row>& info) { return info.param.name(); }
void PrintTo(const Row& row, std::ostream* os) { *os << row.name(); }
INSTANTIATE_TEST_SUITE_P(AllLayers, Battery, ::testing::ValuesIn(rows()), row_name);
std::vector<Row> conv_rows() {
  auto all = rows();
  all.erase(std::remove_if(all.begin(), all.end(), [](const Row& r) { return !r.kind.is_conv; }), all.end());
  return all;
}
INSTANTIATE_TEST_SUITE_P(ConvLayers, ConvBattery, ::testing::ValuesIn(conv_rows()), row_name);

// ---------------------------------------------------------------------------------------------
// The separable path (Conv2d with in/groups == 1): one row per geometry and adapter shape. Each
// row checks the output and every gradient (input and all adapter parameters) against the merged
// path conv(x, W0 + dW) in float64; rows marked fd also check finite differences.

struct SeparableRow {
  std::string name;
  torch::nn::Conv2dOptions conv;
  std::vector<int64_t> input;
  AdapterOptions adapter;
  bool fd = false;
};

std::vector<SeparableRow> separable_rows() {
  using O = torch::nn::Conv2dOptions;
  const auto flora = [](std::vector<int64_t> r) { return AdapterOptions().ranks(std::move(r)).scale(0.7); };
  return {
      {"k3_stride1_full_ranks", O(4, 4, 3).groups(4).padding(1), {2, 4, 6, 5}, flora({4, 1, 3, 3})},
      {"k7_convnext_ranks_clipped", O(6, 6, 7).groups(6).padding(3), {2, 6, 9, 8},
       flora({16, 16, 2, 2}).clip_ranks(true)},
      {"k7_input_smaller_than_kernel", O(8, 8, 7).groups(8).padding(3), {3, 8, 2, 2},
       flora({16, 16, 2, 2}).clip_ranks(true)},
      {"k3_stride2", O(5, 5, 3).groups(5).stride(2).padding(1), {2, 5, 9, 8}, flora({3, 1, 2, 2}), true},
      {"k3_dilation2_stride_1x2", O(4, 4, 3).groups(4).dilation(2).padding(2).stride({1, 2}), {2, 4, 8, 9},
       flora({3, 1, 2, 3})},
      {"k3x5_asymmetric_no_bias", O(3, 3, {3, 5}).groups(3).padding({1, 2}).bias(false), {2, 3, 6, 7},
       flora({2, 1, 2, 2})},
      {"k3_unpadded", O(4, 4, 3).groups(4), {2, 4, 6, 6}, flora({2, 1, 1, 2})},
      {"k3_reflect_padding", O(4, 4, 3).groups(4).padding(1).padding_mode(torch::kReflect), {2, 4, 5, 6},
       flora({3, 1, 2, 2}), true},
      {"k3_circular_padding", O(4, 4, 3).groups(4).padding(1).padding_mode(torch::kCircular), {2, 4, 5, 6},
       flora({3, 1, 2, 2})},
      {"channel_multiplier_2", O(3, 6, 3).groups(3).padding(1), {2, 3, 5, 5}, flora({4, 1, 2, 2}), true},
      {"single_input_channel_groups1", O(1, 5, 3).padding(1), {2, 1, 6, 6}, flora({3, 1, 2, 2})},
      {"tucker2_identity_spatial_modes", O(4, 4, 3).groups(4).padding(1), {2, 4, 5, 5},
       AdapterOptions().ranks({2, 1, 3, 3}).identity_modes({false, false, true, true}).scale(0.7)},
      {"cp_core_rank1", O(4, 4, 3).groups(4).padding(1), {2, 4, 5, 5},
       AdapterOptions().ranks({1, 1, 1, 1}).core(flora::CoreKind::Diagonal).scale(0.7)},
      {"lora_r2", O(4, 4, 3).groups(4).padding(1), {2, 4, 5, 5}, AdapterOptions().method(Method::Lora).rank(2).alpha(4)},
  };
}

class SeparableBattery : public ::testing::TestWithParam<SeparableRow> {};

TEST_P(SeparableBattery, SeparablePathMatchesMergedWeight) {
  torch::manual_seed(11);
  const auto& row = GetParam();
  flora::nn::Conv2d conv(row.conv);
  conv->to(torch::kFloat64);
  auto a = conv->add_adapter("default", row.adapter);
  randomize(a->parameters());
  auto x = torch::randn(row.input, torch::kFloat64).requires_grad_(true);
  auto probe = torch::randn_like(conv->forward(x));
  std::vector<Tensor> outs, grads;
  for (auto path : {ConvPath::Merged, ConvPath::Separable}) {
    a->set_conv_path(path);
    for (auto& p : a->parameters()) p.mutable_grad() = Tensor();
    x.mutable_grad() = Tensor();
    auto y = conv->forward(x);
    EXPECT_EQ(conv->last_path(), path);
    (y * probe).sum().backward();
    outs.push_back(y.detach());
    std::vector<Tensor> flat{x.grad().reshape(-1)};
    for (auto& p : a->parameters()) flat.push_back(p.grad().reshape(-1));
    grads.push_back(torch::cat(flat));
  }
  ASSERT_EQ(outs[0].sizes(), outs[1].sizes());
  EXPECT_LT(max_abs_diff(outs[0], outs[1]), 1e-11);
  EXPECT_LT(max_abs_diff(grads[0], grads[1]), 1e-10);
  if (row.fd) {
    a->set_conv_path(ConvPath::Separable);
    auto xd = x.detach();
    EXPECT_LT(finite_difference_error([&] { return (conv->forward(xd) * probe).sum(); }, a->parameters()), 1e-6);
  }
}

INSTANTIATE_TEST_SUITE_P(Depthwise, SeparableBattery, ::testing::ValuesIn(separable_rows()),
                         [](const ::testing::TestParamInfo<SeparableRow>& info) { return info.param.name; });

// The trainer's --precision bf16 runs forward under CPU autocast and backward after it: a path
// with a hand-written backward must see one dtype (separable and hybrid stay in float32). Runs
// `conv` on the merged path and on `path`, and compares outputs and adapter gradients to bf16's
// ~3 significant digits.
void expect_matches_merged_under_bf16_autocast(flora::nn::Conv2d& conv, const Tensor& x, ConvPath path) {
  auto a = conv->adapter();
  std::vector<std::vector<Tensor>> grads;
  std::vector<Tensor> outs;
  for (auto p : {ConvPath::Merged, path}) {
    a->set_conv_path(p);
    for (auto& q : a->parameters()) q.mutable_grad() = Tensor();
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
    auto y = conv->forward(x);
    at::autocast::clear_cache();
    at::autocast::set_cpu_enabled(false);
    EXPECT_EQ(conv->last_path(), p);
    ASSERT_NO_THROW(y.to(torch::kFloat32).pow(2).sum().backward()) << flora::to_string(p);
    outs.push_back(y.detach().to(torch::kFloat32));
    grads.emplace_back();
    for (auto& q : a->parameters()) grads.back().push_back(q.grad().clone());
  }
  EXPECT_LT(max_abs_diff(outs[0], outs[1]), 5e-2 * outs[0].abs().max().item<double>());
  // Each gradient against its own size, floored at 1 % of the largest: a gradient that is zero
  // on one path (LoRA-style init zeroes some) may come out at bf16's rounding on the other.
  double largest = 0;
  for (const auto& g : grads[0]) largest = std::max(largest, g.abs().max().item<double>());
  for (size_t k = 0; k < grads[0].size(); ++k)
    EXPECT_LT(max_abs_diff(grads[0][k], grads[1][k]), 5e-2 * std::max(grads[0][k].abs().max().item<double>(), 1e-2 * largest))
        << "parameter " << k;
}

TEST(FloraConv, SeparablePathUnderBf16AutocastMatchesMergedPath) {
  torch::manual_seed(3);
  flora::nn::Conv2d conv(torch::nn::Conv2dOptions(8, 8, 7).groups(8).padding(3));
  conv->add_adapter("default", AdapterOptions().ranks({4, 1, 2, 2}).init(flora::Init::LoraStyle));
  expect_matches_merged_under_bf16_autocast(conv, torch::randn({2, 8, 9, 9}), ConvPath::Separable);
}

// `path` is refused for `layer` both when an adapter is added with it (the message contains each
// of `on_add`) and when set on an added adapter (each of `on_set`), and the refused path is not kept.
void expect_path_refused(AdaptableLayer& layer, ConvPath path, const std::vector<int64_t>& ranks,
                         const std::vector<std::string>& on_add, const std::vector<std::string>& on_set) {
  const auto message = flora_test::error_message<flora::InvalidArgument>;
  auto m = message([&] { layer.add_adapter("default", AdapterOptions().ranks(ranks).conv_path(path)); });
  for (const auto& s : on_add) EXPECT_NE(m.find(s), std::string::npos) << m;
  auto a = layer.add_adapter("default", AdapterOptions().ranks(ranks));
  m = message([&] { a->set_conv_path(path); });
  for (const auto& s : on_set) EXPECT_NE(m.find(s), std::string::npos) << m;
  EXPECT_EQ(a->spec().conv_path, ConvPath::Auto) << "a refused path must not be kept";
}

TEST(FloraConv, SeparablePathRefusesConvsItCannotRunNamingLayerAndValues) {
  const auto message = flora_test::error_message<flora::InvalidArgument>;
  flora::nn::Conv2d dense(torch::nn::Conv2dOptions(6, 8, 3));
  dense->set_layer_name("features.3");
  expect_path_refused(*dense, ConvPath::Separable, {4, 4, 2, 2}, {"features.3", "in_channels/groups = 6", "[8, 6, 3, 3]", "hint:"},
                      {"features.3"});

  std::string m;
  flora::nn::Conv2d grouped(torch::nn::Conv2dOptions(4, 4, 3).groups(2));
  grouped->set_layer_name("g");
  m = message([&] { grouped->add_adapter("default", AdapterOptions().conv_path(ConvPath::Separable)); });
  EXPECT_NE(m.find("in_channels/groups = 2 (groups 2)"), std::string::npos) << m;

  flora::nn::Conv1d dw1d(torch::nn::Conv1dOptions(4, 4, 3).groups(4));
  dw1d->set_layer_name("dw1d");
  m = message([&] { dw1d->add_adapter("default", AdapterOptions().conv_path(ConvPath::Separable)); });
  EXPECT_NE(m.find("1-d convolution"), std::string::npos) << m;
  EXPECT_EQ(flora::parse_conv_path("Separable"), ConvPath::Separable);
}

TEST(FloraConv, CostModelEstimatesSeparableForDepthwiseOnlyAndAutoLeavesItOptIn) {
  // ConvNeXt-tiny's depthwise 7x7 convs at batch 16, 64x64 images: stages at 16, 8, 4, 2 pixels.
  for (auto [c, hw] : std::vector<std::pair<int64_t, int64_t>>{{96, 16}, {192, 8}, {384, 4}, {768, 2}}) {
    flora::nn::Conv2d dw(torch::nn::Conv2dOptions(c, c, 7).groups(c).padding(3));
    dw->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}).clip_ranks(true));
    const auto costs = dw->path_costs({16, c, hw, hw}, true, true);
    // With conv_nd's fast depthwise weight gradient, merged is rated (and measured) cheaper.
    EXPECT_EQ(costs.choice, ConvPath::Merged) << c << " channels at " << hw;
    EXPECT_GT(costs.separable, costs.merged);
    // Inference: the cached merged weight costs nothing extra.
    EXPECT_EQ(dw->path_costs({16, c, hw, hw}, false, false).choice, ConvPath::Merged);
    // LoRA keeps the spatial modes whole (r_2 = r_3 = 7): 49 mix terms, measured slower.
    flora::nn::Conv2d lora(torch::nn::Conv2dOptions(c, c, 7).groups(c).padding(3));
    lora->add_adapter("default", AdapterOptions().method(Method::Lora).rank(16));
    const auto lc = lora->path_costs({16, c, hw, hw}, true, true);
    EXPECT_GT(lc.separable, lc.merged) << c << " channels (LoRA)";
  }
  // Large images: the banded matrices are dense in H and W, so 56x56 stays merged.
  flora::nn::Conv2d big(torch::nn::Conv2dOptions(96, 96, 7).groups(96).padding(3));
  big->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}).clip_ranks(true));
  const auto bc = big->path_costs({16, 96, 56, 56}, true, true);
  EXPECT_EQ(bc.choice, ConvPath::Merged);
  EXPECT_GT(bc.separable, bc.merged);
  // Ordinary and 1-d depthwise convs never get it.
  flora::nn::Conv2d wide(torch::nn::Conv2dOptions(256, 256, 3).padding(1));
  wide->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}));
  const auto w = wide->path_costs({16, 256, 14, 14}, true, true);
  EXPECT_NE(w.choice, ConvPath::Separable);
  EXPECT_TRUE(std::isinf(w.separable));
  flora::nn::Conv1d dw1d(torch::nn::Conv1dOptions(64, 64, 7).groups(64).padding(3));
  dw1d->add_adapter("default", AdapterOptions().ranks({16, 16, 2}).clip_ranks(true));
  EXPECT_EQ(dw1d->path_costs({16, 64, 32}, true, true).choice, ConvPath::Merged);
  // The override still wins over the model.
  big->adapter()->set_conv_path(ConvPath::Separable);
  EXPECT_EQ(big->path_costs({16, 96, 56, 56}, true, true).choice, ConvPath::Separable);
}

TEST(FloraConv, FactorizedBranchFoldsTheInputFactorExactlyWhereThatIsLessWork) {
  // fold_input_factor against the multiply-adds it compares, on the shapes it was made for
  // (batch cancels): {in, groups, r_in, r_out, kernel elements, input pixels, output pixels, folds}.
  struct Row { int64_t in, groups, r_in, r_out, k; double p_in, p_out; bool folds; };
  const std::vector<Row> rows = {
      {96, 1, 16, 16, 4, 256, 64, true},     // ConvNeXt 2x2/2 downsampling: LoRA's shape
      {3, 1, 3, 16, 16, 4096, 256, true},    // ConvNeXt 4x4/4 stem
      {64, 1, 16, 16, 1, 256, 64, true},     // ResNet 1x1/2 downsample
      {64, 1, 4, 32, 1, 256, 256, false},    // 1x1 with r_out >> r_in: the two steps are cheaper
      {64, 1, 16, 16, 9, 256, 256, false},   // ResNet 3x3/1
      {64, 1, 16, 16, 9, 256, 64, false},    // ResNet 3x3/2
      {3, 1, 3, 16, 49, 4096, 1024, true},   // ResNet 7x7/2 stem (in 3: the 1x1 saves nothing)
      {8, 2, 2, 2, 4, 64, 16, true},         // grouped 2x2/2
  };
  for (const auto& r : rows) {
    const double folded = r.p_out * r.groups * r.r_out * (r.in / r.groups) * r.k;
    const double unfolded = r.p_in * r.in * r.r_in + r.p_out * r.groups * r.r_out * r.r_in * r.k;
    EXPECT_EQ(folded <= unfolded, r.folds) << "in " << r.in << " k " << r.k;  // the rows' premise
    EXPECT_EQ(flora::fold_input_factor(r.in, r.groups, r.r_in, r.r_out, r.k, r.p_in, r.p_out), r.folds)
        << "in " << r.in << " k " << r.k;
  }
  // The cost model charges the folded branch: ConvNeXt's downsampling at 16x16 -> 8x8, batch 16,
  // costs exactly the folded conv and the 1x1 (3 passes each) plus their traffic, no step 1.
  flora::nn::Conv2d down(torch::nn::Conv2dOptions(96, 192, 2).stride(2));
  down->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}));
  const auto folded = down->path_costs({16, 96, 16, 16}, true, true);
  flora::nn::Conv2d same(torch::nn::Conv2dOptions(96, 192, 2).stride(2));
  same->add_adapter("default", AdapterOptions().method(Method::Lora).rank(16));
  const auto lora = same->path_costs({16, 96, 16, 16}, true, true);
  EXPECT_DOUBLE_EQ(folded.factorized, lora.factorized) << "folded FLoRA and PEFT LoRA run the same two convs";
}

// ---------------------------------------------------------------------------------------------
// The hybrid path (functional::hybrid_conv): merged-weight forward and input gradient, the
// adapter's gradients from projections. Each row builds a float64 conv, runs merged, factorized
// and hybrid on the same input, and compares outputs and every gradient (input, adapter, and the
// weight and bias where a row trains them); rows marked fd also check finite differences.

struct HybridRow {
  std::string name;
  std::function<std::shared_ptr<AdaptableLayer>()> make;
  std::function<Tensor(AdaptableLayer&, const Tensor&)> forward;
  std::vector<int64_t> input;
  AdapterOptions adapter;
  bool channels_last = false;  ///< weight and input in channels-last (3-d: ChannelsLast3d)
  bool train_base = false;     ///< weight and bias trainable as well
  bool fd = false;
};

template <size_t D>
HybridRow hybrid_row(std::string name, torch::nn::ConvOptions<D> opt, std::vector<int64_t> input, AdapterOptions a,
                     bool channels_last = false, bool train_base = false, bool fd = false) {
  return {std::move(name),
          [opt] { return std::make_shared<flora::nn::ConvImpl<D>>(opt); },
          [](AdaptableLayer& l, const Tensor& x) { return static_cast<flora::nn::ConvImpl<D>&>(l).forward(x); },
          std::move(input), std::move(a), channels_last, train_base, fd};
}

std::vector<HybridRow> hybrid_rows() {
  using O2 = torch::nn::Conv2dOptions;
  const auto flora = [](std::vector<int64_t> r) { return AdapterOptions().ranks(std::move(r)).scale(0.7); };
  return {
      hybrid_row<2>("k3_resnet_like", O2(6, 5, 3).padding(1), {2, 6, 7, 6}, flora({3, 3, 2, 2}), false, false, true),
      hybrid_row<2>("k3_channels_last", O2(6, 5, 3).padding(1), {2, 6, 7, 6}, flora({3, 3, 2, 2}), true, false, true),
      hybrid_row<2>("k3_stride2_dilation2_bias", O2(4, 6, 3).stride(2).padding(2).dilation(2), {2, 4, 9, 8},
                    flora({2, 3, 2, 1}), false, false, true),
      hybrid_row<2>("k3x5_asymmetric_channels_last", O2(5, 4, {3, 5}).padding({1, 2}).stride({1, 2}), {2, 5, 6, 9},
                    flora({2, 3, 2, 3}), true),
      hybrid_row<2>("k3_reflect_padding", O2(4, 4, 3).padding(1).padding_mode(torch::kReflect), {2, 4, 5, 6},
                    flora({2, 2, 2, 2}), false, false, true),
      hybrid_row<2>("k3_circular_padding_channels_last", O2(4, 4, 3).padding(1).padding_mode(torch::kCircular),
                    {2, 4, 5, 6}, flora({2, 2, 2, 2}), true),
      hybrid_row<2>("k1_stride2_downsample_no_bias", O2(6, 8, 1).stride(2).bias(false), {2, 6, 7, 7}, flora({3, 2, 1, 1})),
      hybrid_row<2>("k2_stride2_convnext_downsample", O2(4, 6, 2).stride(2), {2, 4, 8, 8}, flora({3, 3, 2, 2}), true),
      hybrid_row<2>("tucker2_identity_spatial_modes", O2(5, 4, 3).padding(1), {2, 5, 6, 6},
                    AdapterOptions().ranks({2, 3, 3, 3}).identity_modes({false, false, true, true}).scale(0.7), false,
                    false, true),
      hybrid_row<2>("identity_output_mode", O2(5, 4, 3).padding(1), {2, 5, 6, 6},
                    AdapterOptions().ranks({4, 2, 2, 2}).identity_modes({true, false, false, false}).scale(0.7), true),
      hybrid_row<2>("identity_input_mode", O2(5, 4, 3).padding(1), {2, 5, 6, 6},
                    AdapterOptions().ranks({2, 5, 2, 2}).identity_modes({false, true, false, false}).scale(0.7), false,
                    false, true),
      hybrid_row<2>("cp_core", O2(5, 4, 3).padding(1), {2, 5, 6, 6},
                    AdapterOptions().ranks({2, 2, 2, 2}).core(flora::CoreKind::Diagonal).scale(0.7)),
      hybrid_row<2>("lora_r2", O2(5, 4, 3).padding(1), {2, 5, 6, 6}, AdapterOptions().method(Method::Lora).rank(2).alpha(4),
                    false, false, true),
      hybrid_row<2>("lora_r2_channels_last", O2(5, 4, 3).padding(1).stride(2), {2, 5, 7, 6},
                    AdapterOptions().method(Method::Lora).rank(2).alpha(4), true),
      hybrid_row<2>("weight_and_bias_trainable_too", O2(4, 5, 3).padding(1), {2, 4, 5, 5}, flora({2, 2, 2, 2}), false, true),
      hybrid_row<2>("weight_and_bias_trainable_channels_last", O2(4, 5, 3).padding(1), {2, 4, 5, 5}, flora({2, 2, 2, 2}),
                    true, true),
      hybrid_row<2>("unbatched_input", O2(6, 5, 3).padding(1), {6, 7, 6}, flora({3, 3, 2, 2}), false, false, true),
      hybrid_row<1>("conv1d_unbatched_reflect", torch::nn::Conv1dOptions(3, 4, 3).padding(1).padding_mode(torch::kReflect),
                    {3, 9}, flora({2, 2, 2})),
      hybrid_row<1>("conv1d_stride2", torch::nn::Conv1dOptions(3, 4, 3).stride(2).padding(1), {2, 3, 9}, flora({2, 2, 2}),
                    false, false, true),
      hybrid_row<3>("conv3d_channels_last", torch::nn::Conv3dOptions(2, 3, 2).stride({1, 2, 1}).padding(1), {1, 2, 4, 5, 4},
                    flora({2, 2, 1, 2, 1}), true),
  };
}

ConvPath last_path_of(AdaptableLayer& l) {
  if (auto* c = dynamic_cast<flora::nn::ConvImpl<1>*>(&l)) return c->last_path();
  if (auto* c = dynamic_cast<flora::nn::ConvImpl<2>*>(&l)) return c->last_path();
  return dynamic_cast<flora::nn::ConvImpl<3>&>(l).last_path();
}

class HybridBattery : public ::testing::TestWithParam<HybridRow> {};

TEST_P(HybridBattery, HybridPathMatchesMergedAndFactorizedPaths) {
  torch::manual_seed(13);
  const auto& row = GetParam();
  auto layer = row.make();
  layer->to(torch::kFloat64);
  auto a = layer->add_adapter("default", row.adapter);
  randomize(a->parameters());
  auto x = torch::randn(row.input, torch::kFloat64);
  if (row.channels_last) {
    const auto fmt = x.dim() == 5 ? torch::MemoryFormat::ChannelsLast3d : torch::MemoryFormat::ChannelsLast;
    torch::NoGradGuard g;
    layer->weight.set_data(layer->weight.contiguous(fmt));
    x = x.contiguous(fmt);
    ASSERT_FALSE(layer->weight.is_contiguous());
  }
  x.requires_grad_(true);
  std::vector<Tensor> trained = a->parameters();
  if (row.train_base) {
    layer->weight.requires_grad_(true);
    trained.push_back(layer->weight);
    if (layer->bias.defined()) layer->bias.requires_grad_(true), trained.push_back(layer->bias);
  }
  const Tensor w0 = layer->weight.detach().clone();
  auto probe = torch::randn_like(row.forward(*layer, x));
  std::vector<Tensor> outs, grads;
  for (auto path : {ConvPath::Merged, ConvPath::Factorized, ConvPath::Hybrid}) {
    a->set_conv_path(path);
    for (auto& p : trained) p.mutable_grad() = Tensor();
    x.mutable_grad() = Tensor();
    auto y = row.forward(*layer, x);
    EXPECT_EQ(last_path_of(*layer), path);
    (y * probe).sum().backward();
    outs.push_back(y.detach());
    std::vector<Tensor> flat{x.grad().reshape(-1)};
    for (auto& p : trained) {
      EXPECT_TRUE(p.grad().defined()) << flora::to_string(path);
      flat.push_back(p.grad().reshape(-1));
    }
    grads.push_back(torch::cat(flat));
  }
  for (size_t i : {size_t{1}, size_t{2}}) {
    ASSERT_EQ(outs[0].sizes(), outs[i].sizes());
    EXPECT_LT(max_abs_diff(outs[0], outs[i]), 1e-11) << i;
    EXPECT_LT(max_abs_diff(grads[0], grads[i]), 1e-10) << i;
  }
  layer->set_adapters_enabled(false);
  EXPECT_GT(max_abs_diff(outs[2], row.forward(*layer, x.detach())), 1e-3) << "the adapter must be on the hybrid path";
  layer->set_adapters_enabled(true);
  EXPECT_TRUE(torch::equal(layer->weight, w0)) << "the hybrid path must not touch W0";
  if (row.fd) {
    a->set_conv_path(ConvPath::Hybrid);
    auto xd = x.detach();
    EXPECT_LT(finite_difference_error([&] { return (row.forward(*layer, xd) * probe).sum(); }, trained), 1e-6);
  }
}

INSTANTIATE_TEST_SUITE_P(Conv, HybridBattery, ::testing::ValuesIn(hybrid_rows()),
                         [](const ::testing::TestParamInfo<HybridRow>& info) { return info.param.name; });

TEST(FloraConv, HybridPathRecordsItselfAndIsTheMergedPathWithoutGradients) {
  flora::nn::Conv2d conv(torch::nn::Conv2dOptions(8, 8, 3).padding(1));
  auto a = conv->add_adapter("default", AdapterOptions().ranks({4, 4, 2, 2}).conv_path(ConvPath::Hybrid));
  randomize(a->parameters());
  const auto x = torch::randn({2, 8, 6, 6});
  const auto y = conv->forward(x);
  EXPECT_EQ(conv->last_path(), ConvPath::Hybrid);
  torch::NoGradGuard no_grad;
  // Two float computations of W0 + dW (addmm into W0's layout, and the cached dW added): equal
  // to rounding, relative to the outputs' size.
  EXPECT_LT(max_abs_diff(conv->forward(x), y) / (1 + y.abs().max().item<double>()), 1e-6);
  EXPECT_EQ(conv->last_path(), ConvPath::Merged);
  EXPECT_TRUE(a->delta_cached()) << "inference under hybrid reuses the cached dW, as merged does";
}

TEST(FloraConv, HybridPathUnderBf16AutocastMatchesMergedPath) {
  torch::manual_seed(5);
  flora::nn::Conv2d conv(torch::nn::Conv2dOptions(8, 6, 3).padding(1));
  conv->add_adapter("default", AdapterOptions().ranks({4, 4, 2, 2}).init(flora::Init::LoraStyle));
  expect_matches_merged_under_bf16_autocast(conv, torch::randn({2, 8, 7, 7}), ConvPath::Hybrid);
}

TEST(FloraConv, HybridPathRefusesGroupedConvsAndDropoutNamingLayerAndValues) {
  const auto message = flora_test::error_message<flora::InvalidArgument>;
  flora::nn::Conv2d grouped(torch::nn::Conv2dOptions(4, 6, 3).groups(2));
  grouped->set_layer_name("stages.1.dw");
  expect_path_refused(*grouped, ConvPath::Hybrid, {2, 2, 2, 2}, {"stages.1.dw", "groups 2", "hint:"}, {"groups 2"});
  std::string m;

  flora::nn::Conv2d dense(torch::nn::Conv2dOptions(4, 4, 3));
  dense->set_layer_name("layer1.0.conv1");
  m = message([&] { dense->add_adapter("default", AdapterOptions().dropout(0.1).conv_path(ConvPath::Hybrid)); });
  EXPECT_NE(m.find("layer1.0.conv1"), std::string::npos) << m;
  EXPECT_NE(m.find("dropout 0.1"), std::string::npos) << m;
  auto d = dense->add_adapter("default", AdapterOptions().ranks({2, 2, 2, 2}).dropout(0.1));
  EXPECT_THROW(d->set_conv_path(ConvPath::Hybrid), flora::InvalidArgument);
  // A conv path means nothing to a Linear: accepted there, as merged and factorized are.
  flora::nn::Linear fc(4, 3);
  EXPECT_NO_THROW(fc->add_adapter("default", AdapterOptions().ranks({2, 2}).conv_path(ConvPath::Hybrid)));
  EXPECT_EQ(flora::parse_conv_path("Hybrid"), ConvPath::Hybrid);
  EXPECT_EQ(flora::to_string(ConvPath::Hybrid), "hybrid");
  // The functional form refuses groups itself.
  namespace F = flora::functional;
  F::ConvGeometry geo{{1, 1}, {0, 0}, {1, 1}, 2};
  m = message([&] {
    F::hybrid_conv(torch::randn({1, 4, 5, 5}), torch::randn({4, 2, 3, 3}), {}, torch::randn({2, 2, 2, 2}),
                   {torch::randn({4, 2}), torch::randn({2, 2}), torch::randn({3, 2}), torch::randn({3, 2})}, 1.0, geo);
  });
  EXPECT_NE(m.find("groups 2"), std::string::npos) << m;
  // Double backward: the saved W0 + dW carries no history, so it is refused, not wrong.
  flora::nn::Conv2d conv(torch::nn::Conv2dOptions(4, 4, 3).padding(1));
  auto h = conv->add_adapter("default", AdapterOptions().ranks({2, 2, 2, 2}).conv_path(ConvPath::Hybrid));
  auto y = conv->forward(torch::randn({1, 4, 5, 5}));
  m = message([&] { torch::autograd::grad({y.pow(2).sum()}, {h->core_parameter()}, {}, true, true); });
  EXPECT_NE(m.find("double backward"), std::string::npos) << m;
}

TEST(FloraConv, CostModelPicksHybridWherePixelsOutweighTheWeight) {
  // ResNet's 3x3 convs at batch 16: hybrid where activations dominate (224-pixel ResNet-18's
  // stages, and its 64x64-image stage 1); factorized where the weight does (512 channels, 256
  // channels at 4x4, 128 at 8x8), since Wm = W0 + dW is built twice (forward, backward) and read
  // every step.
  struct Row { int64_t c, hw; ConvPath expect; };
  for (const auto& r : std::vector<Row>{{64, 56, ConvPath::Hybrid}, {128, 28, ConvPath::Hybrid},
                                         {256, 14, ConvPath::Hybrid}, {512, 7, ConvPath::Factorized},
                                         {64, 16, ConvPath::Hybrid}, {128, 8, ConvPath::Factorized},
                                         {256, 4, ConvPath::Factorized},
                                         {512, 2, ConvPath::Factorized}}) {
    flora::nn::Conv2d conv(torch::nn::Conv2dOptions(r.c, r.c, 3).padding(1).bias(false));
    conv->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}));
    const auto c = conv->path_costs({16, r.c, r.hw, r.hw}, true, true);
    EXPECT_EQ(c.choice, r.expect) << r.c << " channels at " << r.hw << ": hybrid " << c.hybrid << ", factorized "
                                  << c.factorized << ", merged " << c.merged;
    EXPECT_TRUE(std::isinf(conv->path_costs({16, r.c, r.hw, r.hw}, false, false).hybrid)) << "inference: merged";
  }
  // 64 -> 128 3x3/2 at 16x16 (ResNet-18's layer2.0.conv1 for 64-px images): hybrid by the
  // model's charges, factorized where that path runs as the fused node on the narrow GEMMs
  // (float32 on an AVX2 CPU), which measured faster; as the cost input says.
  flora::nn::Conv2d down(torch::nn::Conv2dOptions(64, 128, 3).stride(2).padding(1).bias(false));
  down->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}));
  const auto dc = down->path_costs({16, 64, 16, 16}, true, true);
  EXPECT_LT(dc.hybrid, dc.factorized) << "the charges alone favour hybrid";
  EXPECT_EQ(dc.choice, flora::detail::avx2_fma_enabled() ? ConvPath::Factorized : ConvPath::Hybrid);
  flora::ConvCostInput in;
  in.batch = 16, in.in_channels = 64, in.out_channels = 128, in.kernel = {3, 3}, in.in_spatial = {16, 16},
  in.out_spatial = {8, 8};
  const auto spec = down->adapter()->spec();
  EXPECT_EQ(flora::conv_path_costs(spec, in).choice, ConvPath::Hybrid);
  in.fused_narrow = true;
  EXPECT_EQ(flora::conv_path_costs(spec, in).choice, ConvPath::Factorized);
  // Never for grouped convs, active dropout or autocast.
  flora::nn::Conv2d grouped(torch::nn::Conv2dOptions(64, 64, 3).padding(1).groups(2));
  grouped->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}));
  EXPECT_TRUE(std::isinf(grouped->path_costs({16, 64, 56, 56}, true, true).hybrid));
  flora::nn::Conv2d dropped(torch::nn::Conv2dOptions(64, 64, 3).padding(1));
  dropped->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}).dropout(0.1));
  dropped->train();
  EXPECT_TRUE(std::isinf(dropped->path_costs({16, 64, 56, 56}, true, true).hybrid));
  dropped->eval();  // dropout is off in eval mode: gradients there (e.g. saliency) may take hybrid
  EXPECT_EQ(dropped->path_costs({16, 64, 56, 56}, true, true).choice, ConvPath::Hybrid);
  flora::nn::Conv2d plain(torch::nn::Conv2dOptions(64, 64, 3).padding(1));
  plain->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}));
  at::autocast::set_cpu_enabled(true);
  const auto under_autocast = plain->path_costs({16, 64, 56, 56}, true, true);
  at::autocast::set_cpu_enabled(false);
  EXPECT_TRUE(std::isinf(under_autocast.hybrid));
  EXPECT_EQ(plain->path_costs({16, 64, 56, 56}, true, true).choice, ConvPath::Hybrid);
}

TEST(FloraConv, HybridFoldsTheInputFactorOnlyWhereWindowsDoNotOverlap) {
  struct Row { const char* name; int64_t in, r_in, kernel_elements; double in_pixels, out_pixels; bool fold; };
  for (const auto& r : std::vector<Row>{
           {"ConvNeXt 2x2/2 downsampling, 96 ch at 16x16", 96, 16, 4, 256, 64, true},
           {"ConvNeXt 4x4/4 stem, 3 ch (ranks clipped to 3)", 3, 3, 16, 4096, 256, true},
           {"ResNet-50 1x1, 256 ch at 14x14", 256, 16, 1, 196, 196, false},
           {"ResNet 1x1/2 downsampling", 64, 16, 1, 256, 64, false},
           {"ResNet 3x3/1, 64 ch", 64, 16, 9, 3136, 3136, false},
           {"ResNet 7x7/2 stem, 3 ch (ranks clipped to 3)", 3, 3, 49, 4096, 1024, false},
           {"2x2/2 at input rank 1 of 64: the projection is cheaper than a folded kernel", 64, 1, 4, 256, 64, false},
       })
    EXPECT_EQ(flora::hybrid_folds_input(r.in, r.r_in, 16, r.kernel_elements, r.in_pixels, r.out_pixels), r.fold) << r.name;
  // The cost model charges the folded path what it runs (docs/DESIGN.md, "Choosing a conv path"):
  // for ConvNeXt's 96 -> 192 2x2/2 at 16x16, batch 16, no projection of x, the core conv over
  // all 96 input channels, two core passes (weight gradient, forward for U_out), no r_1 traffic.
  flora::nn::Conv2d down(torch::nn::Conv2dOptions(96, 192, 2).stride(2));
  down->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}));
  const double p_out = 16.0 * 8 * 8, weight = 192.0 * 96 * 4;
  const double proj_out = p_out * 192 * 16, core = p_out * 16 * 96 * 4;
  const double build = 16.0 * 4 * 96 * 16 + weight * 16, moved = 2.0 * p_out * 16;
  const double want = 2 * proj_out + 2 * core + 2 * build + 8.0 * (2 * weight + 2 * moved);
  EXPECT_NEAR(down->path_costs({16, 96, 16, 16}, true, true).hybrid / want, 1.0, 1e-12);
}

// ---------------------------------------------------------------------------------------------
// Behaviour that is specific to one layer kind.

TEST(FloraConv, CostModelPicksMergedForDepthwiseAndFactorizedForWideConvs) {
  // Depthwise: merged over factorized (g * r_0 intermediate channels would exceed the layer's);
  // the separable path, cheaper still at this size, is left out to compare the other two.
  flora::nn::Conv2d depthwise(torch::nn::Conv2dOptions(256, 256, 7).groups(256).padding(3));
  depthwise->add_adapter("default", AdapterOptions().rank(16).clip_ranks(true));
  const auto dw = depthwise->path_costs({16, 256, 14, 14}, true, true);
  EXPECT_LT(dw.merged, dw.factorized);
  EXPECT_EQ(dw.choice, ConvPath::Merged);

  flora::nn::Conv2d wide(torch::nn::Conv2dOptions(512, 512, 3).padding(1));
  wide->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}));
  EXPECT_EQ(wide->path_costs({16, 512, 7, 7}, true, true).choice, ConvPath::Factorized);
  // Inference: dW is built once and cached, so the merged weight costs one conv per call.
  EXPECT_EQ(wide->path_costs({16, 512, 7, 7}, false, false).choice, ConvPath::Merged);
  {
    torch::NoGradGuard no_grad;
    wide->forward(torch::randn({1, 512, 7, 7}));
    EXPECT_EQ(wide->last_path(), ConvPath::Merged);
    EXPECT_TRUE(wide->adapter()->delta_cached());
    auto first = wide->adapter()->delta_weight();
    EXPECT_TRUE(wide->adapter()->delta_weight().is_same(first)) << "second no-grad call must reuse the cache";
    wide->adapter()->factors()[0].add_(1.0);  // an in-place update bumps the version: cache invalid
    EXPECT_FALSE(wide->adapter()->delta_cached());
    wide->forward(torch::randn({1, 512, 7, 7}));
    EXPECT_TRUE(wide->adapter()->delta_cached());
  }
  wide->train(true);  // training frees the weight-sized cache
  EXPECT_FALSE(wide->adapter()->delta_cached());
}

TEST(FloraConv, ForwardRecordsThePathTaken) {
  flora::nn::Conv2d wide(torch::nn::Conv2dOptions(64, 64, 3).padding(1));
  wide->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}).conv_path(ConvPath::Factorized));
  wide->forward(torch::randn({1, 64, 8, 8}));
  EXPECT_EQ(wide->last_path(), ConvPath::Factorized);
  wide->adapter()->set_conv_path(ConvPath::Merged);
  wide->forward(torch::randn({1, 64, 8, 8}));
  EXPECT_EQ(wide->last_path(), ConvPath::Merged);
}

TEST(FloraConv, DropoutActsOnAdapterInputOnlyInTraining) {
  torch::manual_seed(1);
  flora::nn::Conv2d conv(torch::nn::Conv2dOptions(8, 8, 3).padding(1));
  auto a = conv->add_adapter("default", AdapterOptions().ranks({4, 4, 2, 2}).dropout(0.5));
  randomize(a->parameters());
  auto x = torch::randn({2, 8, 6, 6});
  conv->eval();
  auto clean = conv->forward(x);
  conv->train();
  for (auto path : {ConvPath::Merged, ConvPath::Factorized}) {
    a->set_conv_path(path);
    auto y1 = conv->forward(x), y2 = conv->forward(x);
    EXPECT_GT(max_abs_diff(y1, y2), 1e-4) << "dropout inactive on " << flora::to_string(path);
    // The base path is untouched by dropout: disabling the adapter gives the same output twice.
  }
  conv->set_adapters_enabled(false);
  EXPECT_LT(max_abs_diff(conv->forward(x), conv->forward(x)), 1e-12);
  conv->set_adapters_enabled(true);
  conv->eval();
  EXPECT_LT(max_abs_diff(conv->forward(x), clean), 1e-6);
}

TEST(FloraLinear, ForwardRecomputeEqualsForwardInEveryState) {
  // Same output and gradients as forward(in.value()) with an adapter (FLoRA, LoRA), with none,
  // merged, disabled, with the switch off, and with active dropout (which keeps its input).
  namespace F = flora::functional;
  struct Row {
    std::string name;
    AdapterOptions options;
    std::function<void(flora::nn::LinearImpl&)> state;
    bool input_grad = true;  // h on the graph (x then is too)
  };
  struct SwitchOn {  // the switch back on however the row ends
    ~SwitchOn() { flora::nn::set_recompute_inputs(true); }
  };
  const std::vector<Row> rows{
      {"flora", AdapterOptions().ranks({3, 2}), [](auto&) {}},
      {"lora", AdapterOptions().method(Method::Lora).rank(3), [](auto&) {}},
      {"no adapter", AdapterOptions(), [](auto& l) { l.delete_adapter("default"); }},
      {"merged", AdapterOptions().ranks({3, 2}), [](auto& l) { l.merge(); }},
      {"disabled", AdapterOptions().ranks({3, 2}), [](auto& l) { l.set_adapters_enabled(false); }},
      {"switch off", AdapterOptions().ranks({3, 2}), [](auto&) { flora::nn::set_recompute_inputs(false); }},
      {"dropout", AdapterOptions().ranks({3, 2}).dropout(0.3), [](auto&) {}},
      {"base weight trains", AdapterOptions().ranks({3, 2}), [](auto& l) { l.weight.requires_grad_(true); }},
      {"input off the graph", AdapterOptions().ranks({3, 2}), [](auto&) {}, false},
      {"only U_out trains", AdapterOptions().ranks({3, 2}),
       [](auto& l) {
         for (auto& item : l.named_parameters())
           if (item.key().find("factor_0") == std::string::npos) item.value().requires_grad_(false);
       }},
  };
  for (const auto& row : rows) {
    SwitchOn switch_on;
    torch::manual_seed(3);
    flora::nn::Linear lin(6, 5);
    auto a = lin->add_adapter("default", row.options);
    randomize(a->parameters());
    row.state(*lin);
    auto h = torch::randn({2, 3, 6}).requires_grad_(row.input_grad);
    auto run = [&](bool recompute) {
      std::vector<Tensor> params;
      if (h.requires_grad()) params.push_back(h);
      for (auto& p : lin->parameters())
        if (p.requires_grad()) params.push_back(p);
      for (auto& p : params) p.mutable_grad() = Tensor();
      torch::manual_seed(7);  // the same dropout mask both times
      auto in = F::RecomputableInput::gelu(h);
      auto y = recompute ? lin->forward_recompute(in) : lin->forward(in.value());
      y.pow(2).sum().backward();
      std::vector<Tensor> out{y.detach()};
      for (auto& p : params) out.push_back(p.grad().defined() ? p.grad().clone() : torch::full_like(p, -7.0));
      return out;
    };
    auto r = run(true), p = run(false);
    ASSERT_EQ(r.size(), p.size()) << row.name;
    for (size_t i = 0; i < r.size(); ++i) EXPECT_LT(max_abs_diff(r[i], p[i]), 1e-5) << row.name << " tensor " << i;
  }
}

TEST(FloraConv, WrapsAnExistingTorchLinearSharingWeights) {
  torch::nn::Linear base(4, 3);
  flora::nn::Linear wrapped(*base);
  EXPECT_TRUE(wrapped->weight.is_same(base->weight));
  auto x = torch::randn({2, 4});
  EXPECT_LT(max_abs_diff(wrapped(x), base(x)), 1e-7);
}

TEST(FloraEmbedding, PaddingRowNeverMoves) {
  flora::nn::Embedding emb(torch::nn::EmbeddingOptions(6, 4).padding_idx(2));
  auto a = emb->add_adapter("default", AdapterOptions().ranks({3, 2}));
  torch::optim::AdamW opt(emb->parameters(), torch::optim::AdamWOptions(0.1));
  for (int i = 0; i < 3; ++i) {
    opt.zero_grad();
    emb(torch::tensor({0, 2, 5, 2})).pow(2).sum().backward();
    opt.step();
  }
  EXPECT_EQ(a->delta_weight()[2].abs().max().item<double>(), 0.0);
  emb->merge();
  EXPECT_EQ(emb->weight[2].abs().max().item<double>(), 0.0);
}

TEST(FloraLayers, SummaryUsesPeftFormat) {
  flora::nn::Conv2d conv(torch::nn::Conv2dOptions(256, 512, 3).bias(false));
  conv->add_adapter("default", AdapterOptions().ranks({32, 32, 2, 2}));
  EXPECT_EQ(flora::nn::format_summary(flora::nn::count_parameters(*conv)),
            "trainable params: 28,684 || all params: 1,208,332 || trainable%: 2.3739");
}

TEST(FloraLayers, BadInputNamesTheLayerAndValues) {
  const auto message = flora_test::error_message<flora::Error>;
  auto m = message([] { flora::nn::Conv2d(torch::nn::Conv2dOptions(6, 4, 3).groups(4)); });
  EXPECT_NE(m.find("groups 4"), std::string::npos) << m;
  flora::nn::Conv2d conv(torch::nn::Conv2dOptions(8, 16, 3));
  conv->set_layer_name("features.3");
  m = message([&] { conv->add_adapter("default", AdapterOptions().ranks({4, 4, 5, 2})); });
  EXPECT_NE(m.find("features.3"), std::string::npos) << m;
  EXPECT_NE(m.find("rank 5"), std::string::npos) << m;
  m = message([&] { conv->add_adapter("default", AdapterOptions().scale(std::nan(""))); });
  EXPECT_NE(m.find("not finite"), std::string::npos) << m;
  m = message([&] { conv->adapter("missing"); });
  EXPECT_NE(m.find("no adapter 'missing'"), std::string::npos) << m;
  m = message([&] { conv->add_adapter("a.b", AdapterOptions()); });
  EXPECT_NE(m.find("'a.b'"), std::string::npos) << m;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// GPU: runs where LibTorch has CUDA and a device is present; skipped otherwise.
namespace {

TEST(Device, ConvPathsAndMergeOnGpuMatchCpu_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(3);
  flora::nn::Conv2d conv(torch::nn::Conv2dOptions(8, 12, 3).padding(1).groups(2));
  conv->to(torch::kFloat64);
  auto a = conv->add_adapter("default", AdapterOptions().ranks({4, 2, 2, 2}));
  randomize(a->parameters());
  auto x = torch::randn({2, 8, 9, 9}, torch::kFloat64);
  auto cpu = conv->forward(x).detach();
  conv->to(torch::kCUDA);
  for (auto path : {ConvPath::Merged, ConvPath::Factorized}) {
    a->set_conv_path(path);
    EXPECT_LT(max_abs_diff(conv->forward(x.cuda()).cpu(), cpu), 1e-10) << flora::to_string(path);
  }
  conv->merge();
  EXPECT_LT(max_abs_diff(conv->forward(x.cuda()).cpu(), cpu), 1e-10);
}

TEST(Device, HybridAndFactorizedPathsInFloatWithRank16OnGpuMatchCpu_CUDA) {
  // float32, ranks 16 on a small map: on the CPU the hybrid and fused nodes run their products on
  // the narrow GEMMs (host code); on the GPU they must not, and must agree with the CPU.
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(4);
  // Full float32 on the GPU (TF32 convs and GEMMs would differ from the CPU by about 1e-3).
  auto& context = at::globalContext();
  const bool cudnn_tf32 = context.allowTF32CuDNN(), cublas_tf32 = context.allowTF32CuBLAS();
  context.setAllowTF32CuDNN(false);
  context.setAllowTF32CuBLAS(false);
  for (auto path : {ConvPath::Hybrid, ConvPath::Factorized}) {
    flora::nn::Conv2d conv(torch::nn::Conv2dOptions(32, 32, 3).padding(1).bias(false));
    auto a = conv->add_adapter("default", AdapterOptions().ranks({16, 16, 2, 2}).conv_path(path));
    randomize(a->parameters());
    const auto x = torch::randn({4, 32, 8, 8}).contiguous(torch::MemoryFormat::ChannelsLast);
    const auto probe = torch::randn({4, 32, 8, 8});
    auto run = [&](const torch::Device& device) {
      conv->to(device);
      conv->zero_grad();
      const auto y = conv->forward(x.to(device));
      (y * probe.to(device)).sum().backward();
      std::vector<Tensor> out{y.detach().cpu()};
      for (const auto& p : a->parameters()) out.push_back(p.grad().cpu());
      return out;
    };
    const auto cpu = run(torch::kCPU), gpu = run(torch::kCUDA);
    for (size_t i = 0; i < cpu.size(); ++i)
      EXPECT_LT(max_abs_diff(gpu[i], cpu[i]) / (1e-6 + cpu[i].abs().max().item<double>()), 1e-4)
          << flora::to_string(path) << " tensor " << i;
  }
  context.setAllowTF32CuDNN(cudnn_tf32);
  context.setAllowTF32CuBLAS(cublas_tf32);
}

}  // namespace

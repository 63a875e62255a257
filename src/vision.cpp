// torchvision 0.14's ResNet, ConvNeXt and VisionTransformer from flora::nn layers. Module and
// tensor names (and registration order) follow torchvision's, so state_dict keys are identical;
// layers without parameters (ReLU, pooling, Permute, dropout) appear where torchvision has them
// inside Sequentials, so that the indices of the ones with parameters match.
#include "flora/vision.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "flora/layers.h"

namespace flora {
namespace vision {
namespace {

using torch::Tensor;
using functional::RecomputableInput;
using torch::nn::Conv2dOptions;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// torch.nn.init.trunc_normal_(t, 0, std, a, b). With bounds 6 or more standard deviations out
/// (torchvision's: +-2 at std 0.02) the truncation is a clamp that never bites, and a normal
/// sample is the same distribution at a fraction of erfinv's cost (~5 s on convnext_base).
void trunc_normal_(Tensor t, double std, double a = -2.0, double b = 2.0) {
  torch::NoGradGuard no_grad;
  if (std::min(-a, b) >= 6 * std) {
    t.normal_(0.0, std).clamp_(a, b);
    return;
  }
  auto cdf = [](double x) { return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))); };
  const double l = cdf(a / std), u = cdf(b / std);
  t.uniform_(2 * l - 1, 2 * u - 1).erfinv_().mul_(std * std::sqrt(2.0)).clamp_(a, b);
}

/// torchvision.ops.stochastic_depth in "row" mode: each sample's residual branch is dropped with
/// probability p while training (survivors scaled by 1 / (1 - p)); the identity otherwise.
Tensor stochastic_depth(const Tensor& x, double p, bool training) {
  if (!training || p == 0.0) return x;
  std::vector<int64_t> size(x.dim(), 1);
  size[0] = x.size(0);
  auto noise = torch::empty(size, x.options()).bernoulli_(1.0 - p);
  if (p < 1.0) noise.div_(1.0 - p);
  return x * noise;
}

// ---------------------------------------------------------------------------------------------
// ResNet: conv1, bn1, maxpool, layer1..4 of blocks, global average pool, fc.

/// torchvision's BasicBlock (3x3, 3x3) or Bottleneck (1x1, 3x3 strided, 1x1 to 4x planes).
struct ResNetBlockImpl : torch::nn::Module {
  ResNetBlockImpl(int64_t in, int64_t planes, int64_t stride, bool bottleneck) : bottleneck_(bottleneck) {
    const int64_t out = bottleneck ? 4 * planes : planes;
    if (bottleneck) {
      conv1 = register_module("conv1", nn::Conv2d(Conv2dOptions(in, planes, 1).bias(false)));
      bn1 = register_module("bn1", torch::nn::BatchNorm2d(planes));
      conv2 = register_module("conv2", nn::Conv2d(Conv2dOptions(planes, planes, 3).stride(stride).padding(1).bias(false)));
      bn2 = register_module("bn2", torch::nn::BatchNorm2d(planes));
      conv3 = register_module("conv3", nn::Conv2d(Conv2dOptions(planes, out, 1).bias(false)));
      bn3 = register_module("bn3", torch::nn::BatchNorm2d(out));
    } else {
      conv1 = register_module("conv1", nn::Conv2d(Conv2dOptions(in, planes, 3).stride(stride).padding(1).bias(false)));
      bn1 = register_module("bn1", torch::nn::BatchNorm2d(planes));
      conv2 = register_module("conv2", nn::Conv2d(Conv2dOptions(planes, planes, 3).padding(1).bias(false)));
      bn2 = register_module("bn2", torch::nn::BatchNorm2d(planes));
    }
    if (stride != 1 || in != out)
      downsample = register_module(
          "downsample", torch::nn::Sequential(nn::Conv2d(Conv2dOptions(in, out, 1).stride(stride).bias(false)),
                                              torch::nn::BatchNorm2d(out)));
  }
  Tensor forward(const Tensor& x) {
    auto y = torch::relu(bn1(conv1(x)));
    y = bn2(conv2(y));
    if (bottleneck_) y = bn3(conv3(torch::relu(y)));
    return torch::relu(y + (downsample ? downsample->forward(x) : x));
  }
  bool bottleneck_;
  nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  torch::nn::Sequential downsample{nullptr};
};
TORCH_MODULE(ResNetBlock);

struct ResNetImpl : torch::nn::Module {
  ResNetImpl(const std::vector<int64_t>& depths, bool bottleneck, int64_t num_classes) {
    conv1 = register_module("conv1", nn::Conv2d(Conv2dOptions(3, 64, 7).stride(2).padding(3).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(64));
    int64_t in = 64;
    for (size_t i = 0; i < depths.size(); ++i) {
      const int64_t planes = int64_t{64} << i;
      torch::nn::Sequential stage;
      for (int64_t b = 0; b < depths[i]; ++b) {
        stage->push_back(ResNetBlock(in, planes, b == 0 && i > 0 ? 2 : 1, bottleneck));
        in = bottleneck ? 4 * planes : planes;
      }
      stages.push_back(register_module("layer" + std::to_string(i + 1), stage));
    }
    fc = register_module("fc", nn::Linear(in, num_classes));
    // torchvision: kaiming_normal_(fan_out, relu) convolutions; BatchNorm (1, 0); Linear default.
    for (auto& m : modules(/*include_self=*/false))
      if (auto* c = dynamic_cast<nn::Conv2dImpl*>(m.get()))
        torch::nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanOut, torch::kReLU);
  }
  Tensor forward(const Tensor& x) {
    auto y = torch::max_pool2d(torch::relu(bn1(conv1(x))), 3, 2, 1);
    for (auto& s : stages) y = s->forward(y);
    return fc(torch::adaptive_avg_pool2d(y, {1, 1}).flatten(1));
  }
  nn::Conv2d conv1{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
  std::vector<torch::nn::Sequential> stages;
  nn::Linear fc{nullptr};
};
TORCH_MODULE(ResNet);

// ---------------------------------------------------------------------------------------------
// ConvNeXt: features = [stem, stage, downsample, stage, ...], average pool, classifier.

/// LayerNorm over the channels of an NCHW tensor (torchvision's LayerNorm2d; eps 1e-6).
struct LayerNorm2dImpl : torch::nn::LayerNormImpl {
  explicit LayerNorm2dImpl(int64_t channels)
      : torch::nn::LayerNormImpl(torch::nn::LayerNormOptions({channels}).eps(1e-6)) {}
  Tensor forward(const Tensor& x) { return torch::nn::LayerNormImpl::forward(x.permute({0, 2, 3, 1})).permute({0, 3, 1, 2}); }
  void pretty_print(std::ostream& os) const override {
    os << "LayerNorm2d(" << options.normalized_shape()[0] << ", eps=" << options.eps() << ")";
  }
};
TORCH_MODULE(LayerNorm2d);

/// A Sequential that can sit inside another one (LibTorch's forward is a template, which
/// AnyModule cannot hold): ConvNeXt's features are Sequentials of Sequentials.
struct StageImpl : torch::nn::SequentialImpl {
  using torch::nn::SequentialImpl::SequentialImpl;
  Tensor forward(const Tensor& x) { return torch::nn::SequentialImpl::forward(x); }
};
TORCH_MODULE(Stage);

/// torchvision's Permute: a module only so that the Sequential indices match.
torch::nn::Functional permute(std::vector<int64_t> dims) {
  return torch::nn::Functional([dims](const Tensor& x) { return x.permute(dims); });
}

/// A LayerNorm module's forward as a RecomputableInput: adapters on the Linear it feeds keep
/// the norm's input (kept by its own backward anyway), not its output.
RecomputableInput norm_input(const torch::nn::LayerNormImpl& ln, const Tensor& x) {
  return RecomputableInput::layer_norm(x, ln.options.normalized_shape(), ln.weight, ln.bias, ln.options.eps());
}

/// torchvision's CNBlock: x + stochastic_depth(layer_scale * block(x)), block = depthwise 7x7,
/// channels-last LayerNorm, Linear 4x, GELU, Linear back (keys block.{0,2,3,5}, layer_scale).
struct CNBlockImpl : torch::nn::Module {
  CNBlockImpl(int64_t dim, double layer_scale_init, double drop_prob)
      : drop_prob_(drop_prob),
        dwconv(Conv2dOptions(dim, dim, 7).padding(3).groups(dim)),
        norm(torch::nn::LayerNormOptions({dim}).eps(1e-6)),
        pwconv1(dim, 4 * dim),
        pwconv2(4 * dim, dim) {
    block = register_module("block", torch::nn::Sequential(dwconv, permute({0, 2, 3, 1}), norm, pwconv1, torch::nn::GELU(),
                                                           pwconv2, permute({0, 3, 1, 2})));
    layer_scale = register_parameter("layer_scale", torch::full({dim, 1, 1}, layer_scale_init));
  }
  Tensor forward(const Tensor& x) {  // block->forward, with each Linear's input recomputable
    auto h = pwconv1->forward_recompute(norm_input(*norm, dwconv(x).permute({0, 2, 3, 1})));
    auto z = pwconv2->forward_recompute(RecomputableInput::gelu(h)).permute({0, 3, 1, 2});
    return stochastic_depth(layer_scale * z, drop_prob_, is_training()) + x;
  }
  double drop_prob_;
  nn::Conv2d dwconv;  // block's modules, also held here by type (the Sequential holds the same ones)
  torch::nn::LayerNorm norm;
  nn::Linear pwconv1, pwconv2;
  torch::nn::Sequential block{nullptr};
  Tensor layer_scale;
};
TORCH_MODULE(CNBlock);

struct ConvNeXtOptions {
  std::vector<int64_t> depths, dims;
  double stochastic_depth_prob;
};

struct ConvNeXtImpl : torch::nn::Module {
  ConvNeXtImpl(const ConvNeXtOptions& o, int64_t num_classes) {
    torch::nn::Sequential f;
    f->push_back(Stage(nn::Conv2d(Conv2dOptions(3, o.dims[0], 4).stride(4)), LayerNorm2d(o.dims[0])));
    int64_t total = 0, id = 0;
    for (auto d : o.depths) total += d;
    for (size_t i = 0; i < o.depths.size(); ++i) {
      Stage stage;
      for (int64_t b = 0; b < o.depths[i]; ++b, ++id)  // drop rate rises linearly from 0 to the maximum
        stage->push_back(CNBlock(o.dims[i], 1e-6, o.stochastic_depth_prob * id / (total - 1.0)));
      f->push_back(stage);
      if (i + 1 < o.depths.size())
        f->push_back(Stage(LayerNorm2d(o.dims[i]), nn::Conv2d(Conv2dOptions(o.dims[i], o.dims[i + 1], 2).stride(2))));
    }
    features = register_module("features", f);
    const int64_t last = o.dims.back();
    classifier = register_module("classifier", torch::nn::Sequential(LayerNorm2d(last), torch::nn::Flatten(),
                                                                     nn::Linear(last, num_classes)));
    // torchvision: trunc_normal_(std=0.02) weights and zero biases for every Conv2d and Linear.
    for (auto& m : modules(/*include_self=*/false))
      if (auto* l = dynamic_cast<nn::AdaptableLayer*>(m.get())) {
        trunc_normal_(l->weight, 0.02);
        if (l->bias.defined()) torch::nn::init::zeros_(l->bias);
      }
  }
  Tensor forward(const Tensor& x) {
    return classifier->forward(torch::adaptive_avg_pool2d(features->forward(x), {1, 1}));
  }
  torch::nn::Sequential features{nullptr}, classifier{nullptr};
};
TORCH_MODULE(ConvNeXt);

// ---------------------------------------------------------------------------------------------
// VisionTransformer: conv_proj patches, class_token, encoder (pos_embedding, encoder_layer_i,
// ln), heads.head on the class token.

/// torch.nn.MultiheadAttention (batch_first, self-attention, no dropout) with its fused input
/// projection held as an adaptable Linear `in_proj` [3D, D] instead of bare in_proj_weight /
/// in_proj_bias tensors: adapters then take the factorized Linear path. vit_public_name maps the
/// keys back to torch's names. Scaled dot-product attention over `heads` heads as torch computes
/// it (q scaled by 1/sqrt(head_dim) before q k^T); the merged heads feed out_proj as a
/// RecomputableInput, so its adapter keeps the attention weights and values, not the heads.
struct SelfAttentionImpl : torch::nn::Module {
  SelfAttentionImpl(int64_t dim, int64_t heads) : heads_(heads) {
    TORCH_CHECK(dim % heads == 0, "attention width ", dim, " is not divisible by ", heads, " heads");
    in_proj = register_module("in_proj", nn::Linear(dim, 3 * dim));
    out_proj = register_module("out_proj", nn::Linear(dim, dim));
    // torch's _reset_parameters: xavier_uniform_ in_proj_weight, zero in_proj_bias and out_proj.bias.
    torch::NoGradGuard no_grad;
    torch::nn::init::xavier_uniform_(in_proj->weight);
    in_proj->bias.zero_();
    out_proj->bias.zero_();
  }
  Tensor forward(const RecomputableInput& in) {
    const Tensor qkv = in_proj->forward_recompute(in);  // [N, L, 3D]
    const int64_t n = qkv.size(0), len = qkv.size(1), dim = qkv.size(2) / 3, hd = dim / heads_;
    auto split = qkv.view({n, len, 3, heads_, hd}).permute({2, 0, 3, 1, 4});  // [3, N, H, L, hd]
    auto q = split[0] / std::sqrt(static_cast<double>(hd)), k = split[1];
    auto attn = torch::softmax(torch::matmul(q, k.transpose(-2, -1)), -1);
    return out_proj->forward_recompute(RecomputableInput::attention_heads(attn, split[2]));
  }
  int64_t heads_;
  nn::Linear in_proj{nullptr}, out_proj{nullptr};
};
TORCH_MODULE(SelfAttention);

torch::nn::LayerNorm vit_norm(int64_t dim) { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(1e-6)); }

/// torchvision's EncoderBlock: x + attn(ln_1(x)), then + mlp(ln_2(.)); mlp = Linear, GELU,
/// Dropout, Linear, Dropout (keys mlp.0, mlp.3; dropout is 0 in torchvision's builders).
struct EncoderBlockImpl : torch::nn::Module {
  EncoderBlockImpl(int64_t dim, int64_t heads, int64_t mlp_dim) {
    ln_1 = register_module("ln_1", vit_norm(dim));
    self_attention = register_module("self_attention", SelfAttention(dim, heads));
    ln_2 = register_module("ln_2", vit_norm(dim));
    mlp = register_module("mlp", torch::nn::Sequential(nn::Linear(dim, mlp_dim), torch::nn::GELU(), torch::nn::Identity(),
                                                      nn::Linear(mlp_dim, dim), torch::nn::Identity()));
    torch::NoGradGuard no_grad;  // torchvision's MLPBlock init
    for (auto& m : mlp->modules(/*include_self=*/false))
      if (auto* l = dynamic_cast<nn::LinearImpl*>(m.get())) {
        torch::nn::init::xavier_uniform_(l->weight);
        l->bias.normal_(0.0, 1e-6);
      }
  }
  Tensor forward(const Tensor& x) {  // mlp->forward, with each Linear's input recomputable
    auto y = x + self_attention->forward(norm_input(*ln_1, x));
    auto h = mlp->ptr<nn::LinearImpl>(0)->forward_recompute(norm_input(*ln_2, y));
    return y + mlp->ptr<nn::LinearImpl>(3)->forward_recompute(RecomputableInput::gelu(h));
  }
  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  SelfAttention self_attention{nullptr};
  torch::nn::Sequential mlp{nullptr};
};
TORCH_MODULE(EncoderBlock);

struct ViTOptions {
  int64_t patch_size, num_layers, num_heads, hidden_dim, mlp_dim;
  int64_t image_size = 224;
};

struct ViTImpl : torch::nn::Module {
  ViTImpl(const ViTOptions& o, int64_t num_classes) {
    const int64_t d = o.hidden_dim, grid = o.image_size / o.patch_size;
    conv_proj = register_module("conv_proj", nn::Conv2d(Conv2dOptions(3, d, o.patch_size).stride(o.patch_size)));
    class_token = register_parameter("class_token", torch::zeros({1, 1, d}));
    auto encoder = register_module("encoder", std::make_shared<torch::nn::Module>());
    pos_embedding = encoder->register_parameter("pos_embedding", torch::empty({1, grid * grid + 1, d}).normal_(0.0, 0.02));
    auto layers = encoder->register_module("layers", std::make_shared<torch::nn::Module>());
    for (int64_t i = 0; i < o.num_layers; ++i)
      blocks.push_back(layers->register_module("encoder_layer_" + std::to_string(i), EncoderBlock(d, o.num_heads, o.mlp_dim)));
    ln = encoder->register_module("ln", vit_norm(d));
    auto heads = register_module("heads", std::make_shared<torch::nn::Module>());
    head = heads->register_module("head", nn::Linear(d, num_classes));
    torch::NoGradGuard no_grad;  // torchvision: conv_proj trunc_normal_(sqrt(1 / fan_in)), zero head
    trunc_normal_(conv_proj->weight, std::sqrt(1.0 / (3.0 * o.patch_size * o.patch_size)));
    conv_proj->bias.zero_();
    head->weight.zero_();
    head->bias.zero_();
  }
  Tensor forward(const Tensor& x) {
    auto p = conv_proj(x);  // [N, D, h, w]
    const int64_t n = p.size(0), h = p.size(2), w = p.size(3);
    auto y = torch::cat({class_token.expand({n, -1, -1}), p.flatten(2).transpose(1, 2)}, 1);  // [N, 1 + h*w, D]
    y = y + resize_position_embedding(pos_embedding, h, w);
    for (auto& b : blocks) y = b(y);
    return head(ln(y).select(1, 0));
  }
  nn::Conv2d conv_proj{nullptr};
  Tensor class_token, pos_embedding;
  std::vector<EncoderBlock> blocks;
  torch::nn::LayerNorm ln{nullptr};
  nn::Linear head{nullptr};
};
TORCH_MODULE(ViT);

/// The module keys of SelfAttention's adaptable `in_proj` under torch.nn.MultiheadAttention's
/// names: "...self_attention.in_proj.weight" -> "...self_attention.in_proj_weight" (and bias).
std::string vit_public_name(const std::string& key) {
  for (const char* t : {"weight", "bias"}) {
    const std::string from = std::string("self_attention.in_proj.") + t;
    if (ends_with(key, from)) return key.substr(0, key.size() - from.size()) + "self_attention.in_proj_" + t;
  }
  return key;
}

template <typename Holder>
std::unique_ptr<Model> wrap(Holder m, const std::string& name, KeyMap public_name = {}) {
  return make_native(m.ptr(), [m](const Tensor& x) mutable { return m->forward(x); }, name, std::move(public_name));
}

struct Architecture {
  const char* name;
  std::function<std::unique_ptr<Model>(const std::string& name, int64_t num_classes)> build;
};

auto resnet(std::vector<int64_t> depths, bool bottleneck) {
  return [=](const std::string& name, int64_t k) { return wrap(ResNet(depths, bottleneck, k), name); };
}
auto convnext(ConvNeXtOptions o) {
  return [=](const std::string& name, int64_t k) { return wrap(ConvNeXt(o, k), name); };
}
auto vit(ViTOptions o) {
  return [=](const std::string& name, int64_t k) { return wrap(ViT(o, k), name, vit_public_name); };
}

const std::vector<Architecture>& table() {
  static const std::vector<Architecture> t{
      {"resnet18", resnet({2, 2, 2, 2}, false)},
      {"resnet34", resnet({3, 4, 6, 3}, false)},
      {"resnet50", resnet({3, 4, 6, 3}, true)},
      {"convnext_tiny", convnext({{3, 3, 9, 3}, {96, 192, 384, 768}, 0.1})},
      {"convnext_small", convnext({{3, 3, 27, 3}, {96, 192, 384, 768}, 0.4})},
      {"convnext_base", convnext({{3, 3, 27, 3}, {128, 256, 512, 1024}, 0.5})},
      {"vit_b_16", vit({16, 12, 12, 768, 3072})},
      {"vit_s_16", vit({16, 12, 6, 384, 1536})},
  };
  return t;
}

}  // namespace

std::vector<std::string> architectures() {
  std::vector<std::string> out;
  for (const auto& a : table()) out.emplace_back(a.name);
  return out;
}

std::unique_ptr<Model> make_model(const std::string& arch, int64_t num_classes) {
  if (num_classes < 1) throw InvalidArgument("num_classes " + std::to_string(num_classes) + " is invalid (expected >= 1)");
  for (const auto& a : table())
    if (arch == a.name) return a.build(arch, num_classes);
  std::string known;
  for (const auto& a : table()) known += (known.empty() ? "" : ", ") + std::string(a.name);
  throw InvalidArgument("unknown vision architecture '" + arch + "' (known: " + known + ")");
}

Tensor resize_position_embedding(const Tensor& pos, int64_t grid_h, int64_t grid_w) {
  if (pos.dim() != 3 || pos.size(0) != 1)
    throw InvalidArgument("position embedding has shape " + format_shape(pos.sizes().vec()) + ", expected [1, 1 + g*g, D]");
  const int64_t cells = pos.size(1) - 1, dim = pos.size(2);
  const auto g = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(cells))));
  if (g * g != cells)
    throw InvalidArgument("position embedding has " + std::to_string(cells) + " patch positions, not a square grid (shape " +
                          format_shape(pos.sizes().vec()) + ")");
  if (g == grid_h && g == grid_w) return pos;
  namespace F = torch::nn::functional;
  auto grid = pos.slice(1, 1).permute({0, 2, 1}).reshape({1, dim, g, g});
  grid = F::interpolate(grid, F::InterpolateFuncOptions()
                                  .size(std::vector<int64_t>{grid_h, grid_w})
                                  .mode(torch::kBicubic)
                                  .align_corners(true));
  return torch::cat({pos.slice(1, 0, 1), grid.reshape({1, dim, grid_h * grid_w}).permute({0, 2, 1})}, 1);
}

}  // namespace vision
}  // namespace flora

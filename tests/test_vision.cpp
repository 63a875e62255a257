// Native torchvision models (flora/vision.h).
//
// VisionReference: every architecture against torchvision itself. tests/vision/run_vision.sh
// (ctest's `vision` entry) writes random-weight torchvision models with tests/vision/make_refs.py
// and runs these with FLORA_VISION_DIR set; without it (the plain unit run) they skip.
// The other tests need no Python: strict loading errors, adapters on every ConvNeXt convolution
// (depthwise included) training, and the ViT's fused attention projection as an adaptable Linear
// under torchvision's key names.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <set>

#include "flora/flora.h"
#include "flora/io/safetensors.h"
#include "flora/layers.h"
#include "flora/model.h"
#include "flora/vision.h"
#include "helpers.h"

namespace {

using flora_test::max_abs_diff;
using Tensors = std::vector<std::pair<std::string, torch::Tensor>>;

std::string vision_dir() {
  const char* d = std::getenv("FLORA_VISION_DIR");
  return d ? d : "";
}

std::set<std::string> keys(const Tensors& t) {
  std::set<std::string> out;
  for (const auto& [k, v] : t) out.insert(k);
  return out;
}

class VisionReference : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (vision_dir().empty()) GTEST_SKIP() << "FLORA_VISION_DIR unset (ctest's vision entry runs these)";
  }
};

TEST_P(VisionReference, MatchesTorchvision) {
  const std::string arch = GetParam();
  auto model = flora::open_model(arch);
  Tensors weights = flora::io::SafetensorsFile(vision_dir() + "/" + arch + ".safetensors").load_all();
  EXPECT_EQ(keys(model->state_dict()), keys(weights)) << "state_dict keys differ from torchvision's";
  model->load_state(weights, /*strict=*/true);
  weights.clear();
  model->train(false);
  flora::io::SafetensorsFile io(vision_dir() + "/" + arch + "_io.safetensors");
  const auto x = io.load("input"), want = io.load("output");
  torch::NoGradGuard no_grad;
  const auto got = model->forward(x);
  ASSERT_EQ(got.sizes(), want.sizes());
  const double diff = max_abs_diff(got, want);
  std::cout << "[          ] " << arch << " input " << flora::format_shape(x.sizes().vec()) << ": max |native - torchvision| = "
            << diff << "\n";
  EXPECT_LE(diff, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Vision, VisionReference, ::testing::ValuesIn(flora::vision::architectures()),
                         [](const auto& info) { return info.param; });

TEST(VisionModels, RegisteredWithTorchvisionHeads) {
  const auto names = flora::architectures();
  for (const auto& a : flora::vision::architectures())
    EXPECT_NE(std::find(names.begin(), names.end(), a), names.end()) << a << " is not in the model registry";
  EXPECT_EQ(flora::open_model("resnet18")->head_name(), "fc");
  EXPECT_EQ(flora::open_model("convnext_tiny")->head_name(), "classifier.2");
  EXPECT_EQ(flora::open_model("vit_s_16")->head_name(), "heads.head");
  EXPECT_THROW(flora::vision::make_model("resnet1"), flora::InvalidArgument);
}

TEST(VisionModels, TorchvisionKeysIncludingBuffers) {
  const auto r = keys(flora::open_model("resnet50")->state_dict());
  for (const char* k : {"conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked", "layer1.0.conv3.weight",
                        "layer1.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.2.bn3.bias", "fc.bias"})
    EXPECT_TRUE(r.count(k)) << k;
  EXPECT_FALSE(r.count("layer1.1.downsample.0.weight"));
  const auto c = keys(flora::open_model("convnext_tiny")->state_dict());
  for (const char* k : {"features.0.0.weight", "features.0.1.weight", "features.1.0.layer_scale", "features.1.0.block.0.weight",
                        "features.1.0.block.2.bias", "features.1.2.block.5.weight", "features.2.0.weight",
                        "features.2.1.weight", "features.5.8.block.3.weight", "features.7.2.layer_scale",
                        "classifier.0.weight", "classifier.2.weight"})
    EXPECT_TRUE(c.count(k)) << k;
}

TEST(VisionLoad, StrictLoadingListsEveryProblemAtOnce) {
  auto model = flora::open_model("resnet18");
  Tensors tampered;
  for (const auto& [k, v] : model->state_dict()) {
    if (k == "layer1.0.bn1.running_var") continue;                                             // missing
    if (k == "layer2.0.conv1.weight") tampered.emplace_back(k, torch::zeros({128, 64, 3, 1})); // mis-shaped
    else tampered.emplace_back(k, v.clone());
  }
  tampered.emplace_back("layer5.0.conv1.weight", torch::zeros({1}));                           // unexpected
  try {
    model->load_state(tampered, /*strict=*/true);
    FAIL() << "strict load accepted a tampered state dict";
  } catch (const flora::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("missing: layer1.0.bn1.running_var"), std::string::npos) << msg;
    EXPECT_NE(msg.find("unexpected: layer5.0.conv1.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("mis-shaped: layer2.0.conv1.weight (file [128, 64, 3, 1], model [128, 64, 3, 3])"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'resnet18'"), std::string::npos) << msg;
  }
}

TEST(VisionLoad, StateDictRoundTripReproducesTheModel) {
  torch::manual_seed(1);
  auto a = flora::open_model("resnet18"), b = flora::open_model("resnet18");
  {
    torch::NoGradGuard g;  // running statistics that matter
    for (auto& [k, v] : a->state_dict())
      if (k.find("running_var") != std::string::npos) v.uniform_(0.5, 2.0);
  }
  Tensors copied;
  for (const auto& [k, v] : a->state_dict()) copied.emplace_back(k, v.clone());
  b->load_state(copied, /*strict=*/true);
  a->train(false);
  b->train(false);
  const auto x = torch::randn({2, 3, 32, 32});
  torch::NoGradGuard g;
  EXPECT_TRUE(torch::equal(a->forward(x), b->forward(x)));
}

// A four-class task a small adapter can learn quickly: each class brightens one image quadrant.
std::pair<torch::Tensor, torch::Tensor> quadrant_task(int64_t n, int64_t size) {
  auto y = torch::arange(n) % 4;
  auto x = torch::randn({n, 3, size, size}) * 0.5;
  const int64_t h = size / 2;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = y[i].item<int64_t>();
    x[i].narrow(1, (c / 2) * h, h).narrow(2, (c % 2) * h, h) += 1.5;
  }
  return {x, y};
}

TEST(VisionAdapters, ConvNextAdaptsEveryConvIncludingDepthwiseAndTrains) {
  torch::manual_seed(0);
  auto model = flora::open_model("convnext_tiny");
  flora::InjectOptions o;
  o.targets.regex = ".*";
  o.targets.kinds = {flora::LayerKind::Conv};
  o.adapter = flora::AdapterOptions().ranks({16, 16, 2, 2}).scale(1.0).clip_ranks(true);
  const auto report = model->inject(o);
  EXPECT_EQ(report.adapted.size(), 22u) << report.format();  // stem, 18 depthwise, 3 downsampling
  int depthwise = 0;
  for (const auto& a : report.adapted)
    if (a.name.find(".block.0") != std::string::npos) {
      ++depthwise;
      EXPECT_EQ(a.shape[1], 1) << a.name;  // [dim, 1, 7, 7]: groups = dim
      EXPECT_EQ(a.ranks[1], 1) << a.name;  // clipped to in/groups
    }
  EXPECT_EQ(depthwise, 18) << report.format();
  EXPECT_NE(report.format().find("features.1.0.block.0"), std::string::npos);
  model->set_num_classes(4, /*seed=*/0);

  const auto [x, y] = quadrant_task(8, 32);
  auto eval_loss = [&] {
    model->train(false);
    torch::NoGradGuard g;
    return torch::cross_entropy_loss(model->forward(x), y).item<double>();
  };
  std::vector<torch::Tensor> params;
  for (auto& [k, v] : model->trainable_parameters()) params.push_back(v);
  const auto frozen = model->state_dict()[0].second.clone();
  Tensors depthwise_before;  // the adapter of one depthwise conv
  for (const auto& [k, v] : model->adapter_parameters())
    if (k.rfind("features.1.0.block.0.", 0) == 0) depthwise_before.emplace_back(k, v.clone());
  ASSERT_FALSE(depthwise_before.empty());
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(3e-3).weight_decay(0.0));
  const double before = eval_loss();
  model->train(true);
  for (int step = 0; step < 8; ++step) {
    opt.zero_grad();
    torch::cross_entropy_loss(model->forward(x), y).backward();
    opt.step();
  }
  const double after = eval_loss();
  std::cout << "[          ] convnext_tiny adapters, 8 AdamW steps: loss " << before << " -> " << after << "\n";
  EXPECT_LT(after, 0.7 * before) << "loss " << before << " -> " << after;
  EXPECT_TRUE(torch::equal(model->state_dict()[0].second, frozen)) << "a base tensor moved";
  for (const auto& [k, v] : model->adapter_parameters())
    for (const auto& [k0, v0] : depthwise_before)
      if (k == k0) EXPECT_FALSE(torch::equal(v, v0)) << k << " did not train";
}

TEST(VisionVit, InProjIsAnAdaptableLinearUnderTorchvisionNames) {
  torch::manual_seed(0);
  auto model = flora::open_model("vit_s_16");
  const std::string attn = "encoder.layers.encoder_layer_3.self_attention";
  const auto sd = keys(model->state_dict());
  for (const auto& k : {attn + ".in_proj_weight", attn + ".in_proj_bias", attn + ".out_proj.weight", attn + ".out_proj.bias",
                        std::string("class_token"), std::string("encoder.pos_embedding"), std::string("conv_proj.weight"),
                        std::string("encoder.layers.encoder_layer_0.mlp.3.bias"), std::string("encoder.ln.weight"),
                        std::string("heads.head.weight")})
    EXPECT_TRUE(sd.count(k)) << k;
  for (const auto& k : sd) EXPECT_EQ(k.find("in_proj."), std::string::npos) << k;
  EXPECT_EQ(model->state_dict().size(), sd.size());

  {  // the zero-initialized head of torchvision would make every output 0
    torch::NoGradGuard g;
    for (auto& [k, v] : model->named_parameters())
      if (k.rfind("heads.", 0) == 0 || k == "class_token") v.normal_(0.0, 0.05);
  }
  model->train(false);
  const auto x = torch::randn({2, 3, 32, 32});
  torch::Tensor base;
  {
    torch::NoGradGuard g;
    base = model->forward(x);
  }
  flora::InjectOptions o;
  o.targets.names = {"in_proj"};
  o.adapter = flora::AdapterOptions().ranks({8, 8}).scale(1.0);
  const auto report = model->inject(o);
  ASSERT_EQ(report.adapted.size(), 12u) << report.format();
  EXPECT_EQ(report.adapted[3].name, attn + ".in_proj");
  EXPECT_EQ(report.adapted[3].kind, "Linear");
  EXPECT_EQ(report.adapted[3].shape, (std::vector<int64_t>{1152, 384}));
  for (const auto& [k, v] : model->adapter_parameters())
    EXPECT_EQ(k.rfind("encoder.layers.encoder_layer_", 0), 0u) << k;
  EXPECT_EQ(keys(model->state_dict()), sd) << "adapters changed the public keys";

  torch::NoGradGuard g;
  EXPECT_LE(max_abs_diff(model->forward(x), base), 1e-6) << "a zero-initialized adapter changed the output";
  for (auto& [k, v] : model->adapter_parameters()) v.normal_(0.0, 0.1);
  const auto adapted = model->forward(x);
  EXPECT_GT(max_abs_diff(adapted, base), 1e-3) << "the adapter is not on the forward path";
  model->merge();
  EXPECT_LE(max_abs_diff(model->forward(x), adapted), 1e-4) << "merged in_proj differs from the factorized path";
  torch::Tensor merged_w;
  for (auto& [k, v] : model->state_dict())
    if (k == attn + ".in_proj_weight") merged_w = v;
  ASSERT_TRUE(merged_w.defined());
  auto layer = model->layers()[0].second;
  for (auto& [name, l] : model->layers())
    if (name == attn + ".in_proj") layer = l;
  EXPECT_TRUE(torch::equal(merged_w, layer->weight)) << "state_dict's in_proj_weight is not the merged layer weight";
}

TEST(VisionVit, PositionEmbeddingResize) {
  const auto pos = torch::randn({1, 1 + 14 * 14, 8});
  EXPECT_TRUE(flora::vision::resize_position_embedding(pos, 14, 14).is_same(pos));
  const auto r = flora::vision::resize_position_embedding(pos, 2, 3);
  EXPECT_EQ(r.sizes(), (std::vector<int64_t>{1, 7, 8}));
  EXPECT_TRUE(torch::equal(r.slice(1, 0, 1), pos.slice(1, 0, 1))) << "the class token's embedding moved";
  // align_corners=True keeps the grid's corners: position (0, 0) and (13, 13) of the 14x14 grid.
  EXPECT_LE(max_abs_diff(r[0][1], pos[0][1]), 1e-5);
  EXPECT_LE(max_abs_diff(r[0][6], pos[0][196]), 1e-5);
  EXPECT_THROW(flora::vision::resize_position_embedding(torch::randn({1, 6, 8}), 2, 2), flora::InvalidArgument);
}

}  // namespace

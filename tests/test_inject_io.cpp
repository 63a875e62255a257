// Whole-model behaviour: choosing targets in a native LibTorch model built from flora layers,
// freezing, the adapter on the forward path, and adapter directories (save -> load -> same
// outputs) for FLoRA and PEFT-format LoRA, plus load errors in their fixed order.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "flora/flora.h"
#include "flora/inject.h"
#include "flora/io/adapter_dir.h"
#include "flora/io/safetensors.h"
#include "helpers.h"

namespace {

using flora_test::max_abs_diff;
namespace fs = std::filesystem;

struct NetImpl : torch::nn::Module {
  NetImpl() {
    features = register_module("features", torch::nn::Sequential(
        flora::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1)), torch::nn::ReLU(),
        flora::nn::Conv2d(torch::nn::Conv2dOptions(8, 8, 3).padding(1).groups(8))));
    fc1 = register_module("fc1", flora::nn::Linear(8, 6));
    head = register_module("head", flora::nn::Linear(6, 4));
    tok = register_module("tok", flora::nn::Embedding(torch::nn::EmbeddingOptions(10, 4).padding_idx(0)));
    plain = register_module("plain", torch::nn::Linear(4, 4));
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& idx) {
    auto h = features->forward(x).mean({2, 3});
    return plain(head(torch::relu(fc1(h))) + tok(idx).mean(1));
  }
  torch::nn::Sequential features{nullptr};
  flora::nn::Linear fc1{nullptr}, head{nullptr};
  flora::nn::Embedding tok{nullptr};
  torch::nn::Linear plain{nullptr};
};
TORCH_MODULE(Net);

Net make_net() {
  torch::manual_seed(11);
  Net net;
  net->to(torch::kFloat64);
  return net;
}

struct Inputs {
  torch::Tensor x = torch::randn({2, 3, 6, 6}, torch::kFloat64);
  torch::Tensor idx = torch::tensor({{1, 0, 7}, {9, 3, 3}}, torch::kLong);
};

std::vector<std::string> adapted_names(const flora::InjectionReport& r) {
  std::vector<std::string> v;
  for (const auto& a : r.adapted) v.push_back(a.name);
  return v;
}

void randomize_adapters(torch::nn::Module& m) {
  torch::NoGradGuard g;
  for (auto& p : m.named_parameters())
    if (p.key().find(".adapters.") != std::string::npos) p.value().normal_(0, 0.5);
}

TEST(Inject, ListMatchesExactNamesAndDottedSuffixes) {
  auto net = make_net();
  flora::InjectOptions o;
  o.targets.names = {"0", "fc1", "tok"};
  o.adapter = flora::AdapterOptions().ranks({}).rank(2).clip_ranks(true);
  auto r = flora::inject_adapters(*net, o);
  EXPECT_EQ(adapted_names(r), (std::vector<std::string>{"features.0", "fc1", "tok"}));
  EXPECT_TRUE(flora::name_matches("layer1.0.conv1", {"conv1"}));
  EXPECT_FALSE(flora::name_matches("layer1.0.xconv1", {"conv1"}));
}

TEST(Inject, AllLinearSkipsTheOutputHeadAndReportsTorchLayers) {
  auto net = make_net();
  flora::InjectOptions o;
  o.targets.all_linear = true;
  o.targets.names = {"plain"};
  o.adapter = flora::AdapterOptions().ranks({2, 2});
  auto r = flora::inject_adapters(*net, o);
  // "plain" (a torch Linear) is both listed and the output head; it is reported, not adapted.
  EXPECT_EQ(adapted_names(r), (std::vector<std::string>{"fc1", "head"}));
  ASSERT_EQ(r.skipped.size(), 1u);
  EXPECT_EQ(r.skipped[0].name, "plain");
  EXPECT_NE(r.skipped[0].reason.find("flora::nn layers"), std::string::npos);
  // The output head is the last Linear in module order: here the last flora Linear.
  torch::nn::Sequential mlp(flora::nn::Linear(4, 4), torch::nn::ReLU(), flora::nn::Linear(4, 4), flora::nn::Linear(4, 2));
  flora::InjectOptions o2;
  o2.targets.all_linear = true;
  o2.adapter = flora::AdapterOptions().ranks({2, 2});
  EXPECT_EQ(adapted_names(flora::inject_adapters(*mlp, o2)), (std::vector<std::string>{"0", "2"}));
}

TEST(Inject, RegexKindFilterExcludeAndPatterns) {
  auto net = make_net();
  flora::InjectOptions o;
  o.targets.regex = "features\\.\\d+|fc1|tok";
  o.targets.kinds = {flora::LayerKind::Conv, flora::LayerKind::Embedding};
  o.targets.exclude = {"tok"};
  o.adapter = flora::AdapterOptions().ranks({4, 2, 2, 2}).scale(2.0).clip_ranks(true);
  o.rank_pattern = {{"features\\.2", {3, 1, 2, 2}}};
  o.scale_pattern = {{"features\\.0", 0.5}};
  auto r = flora::inject_adapters(*net, o);
  EXPECT_EQ(adapted_names(r), (std::vector<std::string>{"features.0", "features.2"}));
  EXPECT_EQ(r.adapted[1].ranks, (std::vector<int64_t>{3, 1, 2, 2}));
  auto conv0 = std::dynamic_pointer_cast<flora::nn::Conv2dImpl>(net->features[0]);
  EXPECT_EQ(conv0->adapter()->scale(), 0.5);
  bool fc1_skipped = false, tok_excluded = false;
  for (auto& s : r.skipped) {
    fc1_skipped |= s.name == "fc1" && s.reason.find("filtered") != std::string::npos;
    tok_excluded |= s.name == "tok" && s.reason == "excluded";
  }
  EXPECT_TRUE(fc1_skipped);
  EXPECT_TRUE(tok_excluded);
  EXPECT_NE(r.format().find("features.2"), std::string::npos);
}

TEST(Inject, NothingMatchedIsAnError) {
  auto net = make_net();
  flora::InjectOptions o;
  o.targets.names = {"nonexistent"};
  EXPECT_THROW(flora::inject_adapters(*net, o), flora::InvalidArgument);
  o.targets.names = {"plain"};  // matched, but a torch layer
  try {
    flora::inject_adapters(*net, o);
    FAIL() << "no error";
  } catch (const flora::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("plain"), std::string::npos) << e.what();
  }
}

TEST(Inject, AdapterIsOnTheModelsForwardPathAndOnlyAdaptersTrain) {
  auto net = make_net();
  Inputs in;
  auto base = net->forward(in.x, in.idx).detach();
  flora::InjectOptions o;
  o.targets.regex = "features\\.(0|2)|fc1|head|tok";
  o.adapter = flora::AdapterOptions().rank(2).clip_ranks(true);
  flora::inject_adapters(*net, o);
  EXPECT_LT(max_abs_diff(net->forward(in.x, in.idx), base), 1e-12) << "zero init must give the base model";
  randomize_adapters(*net);
  EXPECT_GT(max_abs_diff(net->forward(in.x, in.idx), base), 1e-3) << "a non-zero adapter must change the output";
  for (auto& p : net->named_parameters())
    EXPECT_EQ(p.value().requires_grad(), p.key().find(".adapters.") != std::string::npos) << p.key();
}

class AdapterDir : public ::testing::TestWithParam<flora::Method> {};

TEST_P(AdapterDir, SaveThenLoadGivesTheSameOutputs) {
  const auto dir = ::testing::TempDir() + "flora_adapter_" + flora::to_string(GetParam());
  fs::remove_all(dir);
  Inputs in;
  auto net = make_net();
  flora::InjectOptions o;
  o.targets.regex = "features\\.(0|2)|fc1|head|tok";
  o.adapter = GetParam() == flora::Method::Flora ? flora::AdapterOptions().rank(3).scale(1.5).clip_ranks(true)
                                                 : flora::AdapterOptions().method(flora::Method::Lora).rank(2).alpha(3).clip_ranks(true);
  o.rank_pattern = GetParam() == flora::Method::Flora ? decltype(o.rank_pattern){{"fc1", {2, 3}}} : decltype(o.rank_pattern){{"fc1", {1}}};
  o.scale_pattern = {{"head", 0.25}};
  flora::inject_adapters(*net, o);
  randomize_adapters(*net);
  auto expected = net->forward(in.x, in.idx).detach();
  EXPECT_EQ(flora::io::save_adapter(*net, dir), 5);

  auto fresh = make_net();  // same seed: same base weights
  auto loaded = flora::io::load_adapter(*fresh, dir);
  EXPECT_EQ(loaded.size(), 5u);
  EXPECT_LT(max_abs_diff(fresh->forward(in.x, in.idx), expected), 1e-12);

  std::ifstream cfg(dir + "/adapter_config.json");
  const std::string text((std::istreambuf_iterator<char>(cfg)), std::istreambuf_iterator<char>());
  flora::io::SafetensorsFile file(dir + "/adapter_model.safetensors");
  EXPECT_EQ(file.metadata().at("format"), "pt");
  if (GetParam() == flora::Method::Flora) {
    EXPECT_NE(text.find("\"peft_type\": \"FLORA\""), std::string::npos) << text;
    EXPECT_EQ(file.info("base_model.model.features.0.flora_core").shape, (std::vector<int64_t>{3, 3, 2, 2}));
    EXPECT_EQ(file.info("base_model.model.features.0.flora_factors.1").shape, (std::vector<int64_t>{3, 3}));
  } else {
    EXPECT_NE(text.find("\"peft_type\": \"LORA\""), std::string::npos) << text;
    EXPECT_NE(text.find("\"lora_alpha\": 3.0"), std::string::npos) << text;
    EXPECT_EQ(file.info("base_model.model.features.0.lora_A.weight").shape, (std::vector<int64_t>{2, 3, 3, 3}));
    EXPECT_EQ(file.info("base_model.model.features.0.lora_B.weight").shape, (std::vector<int64_t>{8, 2, 1, 1}));
    EXPECT_EQ(file.info("base_model.model.fc1.lora_A.weight").shape, (std::vector<int64_t>{1, 8}));
    EXPECT_EQ(file.info("base_model.model.tok.lora_embedding_A").shape, (std::vector<int64_t>{2, 10}));
    EXPECT_EQ(file.info("base_model.model.tok.lora_embedding_B").shape, (std::vector<int64_t>{4, 2}));
    // The depthwise conv (8 groups) is saved in PEFT's grouped layout, lora_A repeated per group
    // (rank 8 x 2), and loads back at the rank it was saved from, with the same tensors.
    EXPECT_EQ(file.info("base_model.model.features.2.lora_A.weight").shape, (std::vector<int64_t>{16, 1, 3, 3}));
    EXPECT_EQ(file.info("base_model.model.features.2.lora_B.weight").shape, (std::vector<int64_t>{8, 2, 1, 1}));
    auto depthwise = [](Net& n) { return n->features[2]->as<flora::nn::Conv2d>()->adapter(); };
    const auto saved_from = depthwise(net), reloaded = depthwise(fresh);
    EXPECT_EQ(reloaded->spec().ranks, saved_from->spec().ranks);
    EXPECT_EQ(reloaded->scale(), saved_from->scale());
    EXPECT_TRUE(torch::equal(reloaded->core(), saved_from->core()));
    EXPECT_TRUE(torch::equal(reloaded->factors()[0], saved_from->factors()[0]));

    // A PEFT-trained grouped adapter has its own lora_A block per group: it loads as the block
    // form (rank 16, lora_B block-diagonal), whose dW is group j's B_j A_j.
    auto tensors = file.load_all();
    torch::Tensor a, b;
    for (auto& [name, t] : tensors) {
      if (name == "base_model.model.features.2.lora_A.weight") a = t = t + torch::randn_like(t);
      if (name == "base_model.model.features.2.lora_B.weight") b = t;
    }
    flora::io::save_safetensors(dir + "/adapter_model.safetensors", tensors, {{"format", "pt"}});
    auto peft = make_net();
    flora::io::load_adapter(*peft, dir);
    const auto blocks = depthwise(peft);
    EXPECT_EQ(blocks->spec().ranks, (std::vector<int64_t>{16, 1, 3, 3}));
    const auto want = saved_from->scale() * torch::einsum("ok,okihw->oihw", {b.view({8, 2}), a.view({8, 2, 1, 3, 3})});
    EXPECT_LT(max_abs_diff(blocks->delta_weight(), want.to(torch::kFloat64)), 1e-12);
  }
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(BothMethods, AdapterDir, ::testing::Values(flora::Method::Flora, flora::Method::Lora),
                         [](const auto& info) { return flora::to_string(info.param); });

TEST(AdapterDirErrors, ValidateInOrderAndNameTheProblem) {
  const auto dir = ::testing::TempDir() + "flora_adapter_errors";
  fs::remove_all(dir);
  auto net = make_net();
  flora::InjectOptions o;
  o.targets.names = {"fc1", "head"};
  o.adapter = flora::AdapterOptions().ranks({2, 2});
  flora::inject_adapters(*net, o);
  flora::io::save_adapter(*net, dir);
  auto message = [&](const std::string& d) {
    auto fresh = make_net();
    try {
      flora::io::load_adapter(*fresh, d);
    } catch (const flora::Error& e) {
      for (auto& m : fresh->named_modules())
        if (auto* l = dynamic_cast<flora::nn::AdaptableLayer*>(m.value().get()))
          EXPECT_TRUE(l->adapter_names().empty()) << "a failed load must not change the model";
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message(dir), "no error");
  EXPECT_NE(message(dir + "/nope").find("not a directory"), std::string::npos);
  auto rewrite_config = [&](const std::string& text) {
    std::ofstream(dir + "/adapter_config.json") << text;
  };
  rewrite_config("{not json");
  EXPECT_NE(message(dir).find("not valid JSON"), std::string::npos);
  rewrite_config(R"({"peft_type": "LOHA"})");
  EXPECT_NE(message(dir).find("unsupported peft_type 'LOHA'"), std::string::npos);
  rewrite_config(R"({"peft_type": "FLORA", "scale": 1.0})");
  // Tensor names, complete sets, targets and shapes, each in its own file.
  auto write_weights = [&](std::vector<std::pair<std::string, torch::Tensor>> t) {
    flora::io::save_safetensors(dir + "/adapter_model.safetensors", t, {{"format", "pt"}});
  };
  auto d = torch::kFloat64;
  write_weights({{"fc1.flora_core", torch::zeros({2, 2}, d)}});
  EXPECT_NE(message(dir).find("does not start with 'base_model.model.'"), std::string::npos);
  write_weights({{"base_model.model.fc1.flora_factors.0", torch::zeros({6, 2}, d)}});
  EXPECT_NE(message(dir).find("no flora_core"), std::string::npos);
  write_weights({{"base_model.model.fc9.flora_core", torch::zeros({2, 2}, d)}});
  EXPECT_NE(message(dir).find("another base model"), std::string::npos);
  write_weights({{"base_model.model.fc1.flora_core", torch::zeros({2, 2}, d)},
                 {"base_model.model.fc1.flora_factors.0", torch::zeros({7, 2}, d)}});
  const auto m = message(dir);
  EXPECT_NE(m.find("'base_model.model.fc1.flora_factors.0' has shape [7, 2], expected [6, 2]"), std::string::npos) << m;
  fs::remove(dir + "/adapter_model.safetensors");
  EXPECT_NE(message(dir).find("missing adapter_model.safetensors"), std::string::npos);
  fs::remove_all(dir);
}

}  // namespace

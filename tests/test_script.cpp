// TorchScript models (flora::ScriptModel) and exports, on models written by PyTorch.
//
// tests/interop/run_interop.sh writes scripted and traced versions of one network with
// tests/interop/make_models.py, runs this file's ScriptInterop tests with FLORA_INTEROP_DIR set,
// merges and exports through the `flora` command line, and checks the results in PyTorch
// (tests/interop/check_merged.py). Without FLORA_INTEROP_DIR (the plain unit run) these tests
// skip; ctest's `interop` entry runs them.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <map>

#include "flora/flora.h"
#include "flora/io/adapter_dir.h"
#include "flora/io/export.h"
#include "flora/io/safetensors.h"
#include "flora/script.h"
#include "helpers.h"

namespace {

using flora_test::max_abs_diff;
namespace fs = std::filesystem;

std::string interop_dir() {
  const char* d = std::getenv("FLORA_INTEROP_DIR");
  return d ? d : "";
}

torch::Tensor io_tensor(const std::string& name) {
  flora::io::SafetensorsFile f(interop_dir() + "/io.safetensors");
  return f.load(name);
}

void randomize_adapters(flora::ScriptModel& m) {
  torch::NoGradGuard g;
  for (auto& p : m.trainable_parameters()) p.normal_(0.0, 0.3);
}

struct Variant {
  const char* model;  // scripted / traced
  const char* name;   // a: every layer kind; b: conv + linear + a free parameter; c: conv + linear
};

class ScriptInterop : public ::testing::TestWithParam<Variant> {
 protected:
  void SetUp() override {
    if (interop_dir().empty()) GTEST_SKIP() << "FLORA_INTEROP_DIR unset (ctest's interop entry runs these)";
  }
  std::string model_path() const { return interop_dir() + "/" + GetParam().model + ".pt"; }
  std::string out_dir() const { return interop_dir() + "/" + GetParam().model + "_" + GetParam().name; }
};

flora::InjectOptions options_for(const std::string& variant, flora::Method method) {
  flora::InjectOptions o;
  o.adapter = flora::AdapterOptions().method(method).rank(3).clip_ranks(true);
  if (method == flora::Method::Flora) o.adapter.spatial_rank(2).scale(0.5);
  if (variant == "a") {
    o.targets.names = {"conv1", "dw", "gconv", "seq", "fc", "emb"};
  } else if (variant == "b") {
    o.targets.regex = "conv1|gconv|fc";
    o.targets.parameters = {"pos"};
  } else {
    o.targets.names = {"conv1", "dw", "gconv", "seq", "fc"};
  }
  return o;
}

TEST_P(ScriptInterop, AdaptTrainSaveLoadMerge) {
  const auto x = io_tensor("input");
  auto model = flora::ScriptModel::load(model_path());
  model.train(false);
  // The base model's output equals PyTorch's before any adapter.
  EXPECT_LT(max_abs_diff(model.forward(x), io_tensor("base_output")), 1e-5);

  const std::string variant = GetParam().name;
  auto o = options_for(variant, flora::Method::Flora);
  auto report = model.inject(o);
  EXPECT_EQ(report.adapted.size(), variant == "a" ? 6u : variant == "b" ? 4u : 5u) << report.format();
  for (const auto& p : model.module().parameters()) EXPECT_FALSE(p.requires_grad());
  randomize_adapters(model);
  const auto adapted = model.forward(x).detach();
  EXPECT_GT(max_abs_diff(adapted, io_tensor("base_output")), 1e-3) << "the adapters are not on the forward path";

  // Gradients reach every factor through the script graph, and no base parameter. (Eval mode:
  // a scripted BatchNorm in training mode would update its running statistics.)
  model.forward(x).pow(2).sum().backward();
  for (const auto& p : model.trainable_parameters()) {
    ASSERT_TRUE(p.grad().defined());
    EXPECT_GT(p.grad().abs().sum().item<double>(), 0.0);
  }
  for (const auto& p : model.module().parameters()) EXPECT_FALSE(p.grad().defined());
  // After a call the module's slots hold the base tensors again (not W0 + dW).
  std::map<std::string, torch::Tensor> slots;
  for (const auto& p : model.module().named_parameters()) slots[p.name] = p.value;
  for (const auto& [name, layer] : model.layers()) {
    if (!layer->has_adapter("default")) continue;
    const std::string key = slots.count(name) ? name : name + ".weight";
    ASSERT_TRUE(slots.count(key)) << key;
    EXPECT_TRUE(slots[key].is_same(layer->weight)) << key;
  }

  // Save, load into a fresh copy: same outputs.
  const std::string dir = out_dir();
  fs::create_directories(dir);
  EXPECT_EQ(flora::io::save_adapter(model.layers(), dir + "/adapter"), static_cast<int>(report.adapted.size()));
  auto fresh = flora::ScriptModel::load(model_path());
  fresh.train(false);
  fresh.load_adapter(dir + "/adapter");
  EXPECT_LT(max_abs_diff(fresh.forward(x), adapted), 1e-6);

  // Merge gives the same output with no adapter on the path; unmerge restores W0 exactly.
  const auto before = model.state_dict();
  model.merge();
  EXPECT_LT(max_abs_diff(model.forward(x), adapted), 1e-5);
  model.unmerge();
  const auto after = model.state_dict();
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(torch::equal(before[i].second, after[i].second)) << before[i].first;
  flora::io::save_safetensors(dir + "/expected.safetensors", {{"adapted", adapted}});
}

TEST_P(ScriptInterop, LoraMatchesPeftLayout) {
  // LoRA through the same mechanism: a saved directory is PEFT's format, so the export is a
  // re-save, and a reload gives the same outputs.
  const auto x = io_tensor("input");
  auto model = flora::ScriptModel::load(model_path());
  model.train(false);
  auto o = options_for("a", flora::Method::Lora);
  model.inject(o);
  randomize_adapters(model);
  const auto adapted = model.forward(x).detach();
  const std::string dir = out_dir() + "_lora";
  flora::io::save_adapter(model.layers(), dir);
  auto fresh = flora::ScriptModel::load(model_path());
  fresh.train(false);
  fresh.load_adapter(dir);
  EXPECT_LT(max_abs_diff(fresh.forward(x), adapted), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Models, ScriptInterop,
                         ::testing::Values(Variant{"scripted", "a"}, Variant{"scripted", "b"}, Variant{"scripted", "c"},
                                           Variant{"traced", "a"}, Variant{"traced", "b"}, Variant{"traced", "c"}),
                         [](const auto& info) { return std::string(info.param.model) + "_" + info.param.name; });

}  // namespace

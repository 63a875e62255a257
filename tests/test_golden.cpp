// Golden tests: flora's layers against numbers computed by PyTorch itself.
//
// tests/data/golden.json is written by tests/golden/make_golden.py with Debian's PyTorch
// (/usr/bin/python3, python3-torch) and checked to regenerate bit for bit by
// tests/golden/check_golden.sh (ctest: golden.regenerates). For each case it holds W0, bias, core
// G, factors U_n, scale s and an input, and two results computed without flora:
//   "delta"  = s * G x_0 U_0 x_1 U_1 ... (torch.einsum),
//   "output" = the torch.nn.functional op (conv2d / linear / conv1d / embedding) with W0 + delta.
// Here the same values are loaded into flora layers in float64 and every path must agree to 1e-10.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "flora/flora.h"

namespace {

using nlohmann::json;
using Forward = std::function<torch::Tensor(const torch::Tensor&)>;

constexpr double kTolerance = 1e-10;

/// {"shape": [...], "data": [row-major values]} -> float64 tensor ("dtype": "int64" -> int64).
torch::Tensor tensor_of(const json& j) {
  const auto shape = j.at("shape").get<std::vector<int64_t>>();
  if (j.value("dtype", "float64") == "int64")
    return torch::tensor(j.at("data").get<std::vector<int64_t>>(), torch::dtype(torch::kInt64)).reshape(shape);
  return torch::tensor(j.at("data").get<std::vector<double>>(), torch::dtype(torch::kFloat64)).reshape(shape);
}

const json& golden_case(const std::string& name) {
  static const json doc = [] {
    const std::string path = std::string(FLORA_TEST_DATA_DIR) + "/golden.json";
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path);
    return json::parse(in);
  }();
  for (const auto& c : doc.at("cases"))
    if (c.at("name").get<std::string>() == name) return c;
  throw std::runtime_error("golden.json has no case '" + name + "'");
}

void expect_close(const torch::Tensor& got, const torch::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.sizes().vec(), want.sizes().vec()) << what;
  EXPECT_EQ(got.scalar_type(), torch::kFloat64) << what;
  const double diff = (got.detach() - want).abs().max().item<double>();
  EXPECT_LT(diff, kTolerance) << what << ": max |flora - PyTorch| = " << diff;
}

/// Puts the case's W0 and bias into `layer`, converts it to float64, adds adapter "default" with
/// the case's ranks and scale, and overwrites the adapter's core and factors with the case's.
flora::nn::TuckerAdapter load_case(flora::nn::AdaptableLayer& layer, const json& c) {
  layer.to(torch::kFloat64);  // before add_adapter: the adapter takes the weight's dtype
  {
    torch::NoGradGuard no_grad;
    layer.weight.copy_(tensor_of(c.at("weight")));
    if (c.contains("bias")) layer.bias.copy_(tensor_of(c.at("bias")));
  }
  auto a = layer.add_adapter("default", flora::AdapterOptions()
                                            .ranks(c.at("ranks").get<std::vector<int64_t>>())
                                            .scale(c.at("scale").get<double>()));
  EXPECT_EQ(a->core_parameter().scalar_type(), torch::kFloat64);
  const auto& factors = c.at("factors");
  EXPECT_EQ(a->factors().size(), factors.size());
  torch::NoGradGuard no_grad;
  a->core_parameter().copy_(tensor_of(c.at("core")));
  for (size_t n = 0; n < a->factors().size(); ++n) a->factors()[n].copy_(tensor_of(factors.at(n)));
  layer.train();
  return a;
}

/// dW from the adapter and from the pure function both equal PyTorch's einsum.
void check_delta(const flora::nn::TuckerAdapter& a, const json& c) {
  const auto delta = tensor_of(c.at("delta"));
  expect_close(a->delta_weight(), delta, "adapter delta_weight()");
  std::vector<torch::Tensor> factors;
  for (const auto& u : c.at("factors")) factors.push_back(tensor_of(u));
  expect_close(flora::functional::tucker_delta(tensor_of(c.at("core")), factors, c.at("scale").get<double>()), delta,
               "functional::tucker_delta");
}

/// Both conv paths (merged weight, factorized branch) give PyTorch's output.
template <typename Conv>
void check_conv_paths(Conv& conv, flora::nn::TuckerAdapter a, const json& c) {
  const auto x = tensor_of(c.at("input"));
  for (auto path : {flora::ConvPath::Merged, flora::ConvPath::Factorized}) {
    a->set_conv_path(path);
    expect_close(conv->forward(x), tensor_of(c.at("output")), "train-mode forward, " + flora::to_string(path) + " path");
    EXPECT_EQ(flora::to_string(conv->last_path()), flora::to_string(path));
  }
}

/// merge(): forward still equals PyTorch's output and weight = W0 + delta; unmerge(): W0 exactly.
void check_merge(flora::nn::AdaptableLayer& layer, const Forward& forward, const json& c) {
  const auto w0 = tensor_of(c.at("weight"));
  layer.merge();
  ASSERT_TRUE(layer.merged());
  expect_close(forward(tensor_of(c.at("input"))), tensor_of(c.at("output")), "forward after merge()");
  expect_close(layer.weight, w0 + tensor_of(c.at("delta")), "merged weight");
  EXPECT_TRUE(layer.unmerge());
  EXPECT_TRUE(torch::equal(layer.weight, w0)) << "unmerge() must restore W0 bit for bit";
}

}  // namespace

TEST(Golden, Conv2dGroupedMatchesPyTorch) {
  const auto& c = golden_case("conv2d");  // weight [8, 3, 3, 3], ranks [4, 2, 2, 2], s = 0.7
  flora::nn::Conv2d conv(torch::nn::Conv2dOptions(6, 8, 3).stride(2).padding(1).dilation(1).groups(2));
  auto a = load_case(*conv, c);
  check_delta(a, c);
  check_conv_paths(conv, a, c);
  check_merge(*conv, [&](const torch::Tensor& x) { return conv->forward(x); }, c);
}

TEST(Golden, LinearMatchesPyTorch) {
  const auto& c = golden_case("linear");  // weight [7, 10], ranks [3, 4], s = 1.5
  flora::nn::Linear fc(torch::nn::LinearOptions(10, 7));
  auto a = load_case(*fc, c);
  check_delta(a, c);
  expect_close(fc->forward(tensor_of(c.at("input"))), tensor_of(c.at("output")), "train-mode forward");
  check_merge(*fc, [&](const torch::Tensor& x) { return fc->forward(x); }, c);
}

TEST(Golden, Conv1dDepthwiseReflectMatchesPyTorch) {
  const auto& c = golden_case("conv1d_depthwise");  // weight [4, 1, 5], ranks [2, 1, 3], s = 2
  ASSERT_EQ(c.at("padding_mode").get<std::string>(), "reflect");
  flora::nn::Conv1d conv(torch::nn::Conv1dOptions(4, 4, 5).padding(2).groups(4).padding_mode(torch::kReflect));
  auto a = load_case(*conv, c);
  check_delta(a, c);
  check_conv_paths(conv, a, c);
  check_merge(*conv, [&](const torch::Tensor& x) { return conv->forward(x); }, c);
}

TEST(Golden, EmbeddingPaddingIdxMatchesPyTorch) {
  const auto& c = golden_case("embedding");  // weight [12, 5], ranks [3, 2], s = 0.5, padding_idx 0
  flora::nn::Embedding emb(torch::nn::EmbeddingOptions(12, 5).padding_idx(0));
  auto a = load_case(*emb, c);
  const auto padding_row = a->factors()[0][0];
  EXPECT_TRUE(torch::equal(padding_row, torch::zeros_like(padding_row)))
      << "the fixture keeps U_num[padding_idx] = 0, as flora does";
  check_delta(a, c);
  const auto idx = tensor_of(c.at("input"));
  ASSERT_EQ(idx.scalar_type(), torch::kInt64);
  expect_close(emb->forward(idx), tensor_of(c.at("output")), "train-mode forward");
  check_merge(*emb, [&](const torch::Tensor& x) { return emb->forward(x); }, c);
}

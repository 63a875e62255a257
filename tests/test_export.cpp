// Export algebra (flora/io/export.h): for every row, the PEFT LoRA and LyCORIS LoCon tensors,
// recombined by those formats' own formulas, equal the FLoRA dW computed by tucker_delta.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "flora/functional.h"
#include "flora/io/export.h"
#include "helpers.h"

namespace {

using flora_test::max_abs_diff;

struct Row {
  const char* name;
  const char* kind;
  std::vector<int64_t> shape;  // the weight's
  std::vector<int64_t> ranks;  // core shape (identity modes at full size)
  std::vector<bool> identity;
  int64_t groups;
};

flora::io::StoredModule make(const Row& r) {
  torch::manual_seed(3);
  flora::io::StoredModule m;
  m.name = r.name;
  m.kind = r.kind;
  m.weight_shape = r.shape;
  m.groups = r.groups;
  m.scale = 0.7;
  m.core = torch::randn(r.ranks, torch::kFloat64);
  for (size_t n = 0; n < r.shape.size(); ++n)
    if (!r.identity[n]) m.factors[n] = torch::randn({r.shape[n], r.ranks[n]}, torch::kFloat64);
  return m;
}

torch::Tensor delta(const flora::io::StoredModule& m) {
  std::vector<torch::Tensor> f(m.core.dim());
  for (const auto& [n, u] : m.factors) f[n] = u;
  return flora::functional::tucker_delta(m.core, f, m.scale);
}


const Row kRows[] = {
    {"linear", "Linear", {12, 9}, {4, 5}, {false, false}, 1},
    {"linear_small_in", "Linear", {12, 9}, {5, 3}, {false, false}, 1},
    {"linear_identity_out", "Linear", {6, 9}, {6, 4}, {true, false}, 1},
    {"embedding", "Embedding", {10, 7}, {3, 4}, {false, false}, 1},
    {"embedding_small_dim", "Embedding", {10, 7}, {4, 2}, {false, false}, 1},
    {"conv2d", "Conv", {8, 6, 3, 3}, {4, 3, 2, 2}, {false, false, false, false}, 1},
    {"conv2d_square_mid", "Conv", {8, 6, 3, 3}, {3, 5, 2, 3}, {false, false, false, false}, 1},
    {"conv2d_tucker2", "Conv", {8, 6, 3, 3}, {4, 3, 3, 3}, {false, false, true, true}, 1},
    {"conv2d_peft_layout", "Conv", {8, 6, 3, 3}, {4, 6, 3, 3}, {false, true, true, true}, 1},
    {"conv2d_grouped", "Conv", {8, 3, 3, 3}, {4, 2, 2, 2}, {false, false, false, false}, 2},
    {"conv2d_depthwise", "Conv", {8, 1, 3, 3}, {3, 1, 2, 2}, {false, true, false, false}, 8},
    {"conv1d", "Conv", {6, 4, 5}, {3, 2, 2}, {false, false, false}, 1},
    {"conv3d", "Conv", {6, 4, 3, 3, 3}, {3, 2, 2, 2, 2}, {false, false, false, false, false}, 1},
};

}  // namespace

class ExportAlgebra : public ::testing::TestWithParam<Row> {};

TEST_P(ExportAlgebra, PeftLoraIsExact) {
  const auto& row = GetParam();
  const auto m = make(row);
  const auto want = delta(m);
  const auto p = flora::io::to_peft_lora(m);
  ASSERT_EQ(p.a.size(0), p.rank);
  const double scaling = p.alpha / static_cast<double>(p.rank);
  torch::Tensor got;
  if (std::string(row.kind) == "Embedding") {
    got = p.b.mm(p.a).t() * scaling;
  } else {
    const int64_t g = row.groups, out = row.shape[0];
    ASSERT_EQ(p.b.size(1) * g, p.rank) << "lora_B must be [out, r/groups, 1...]";
    auto a2 = p.a.reshape({p.rank, -1});
    auto b2 = p.b.reshape({out, p.rank / g});
    std::vector<torch::Tensor> blocks;
    for (int64_t j = 0; j < g; ++j)
      blocks.push_back(b2.slice(0, j * out / g, (j + 1) * out / g).mm(a2.slice(0, j * p.rank / g, (j + 1) * p.rank / g)));
    got = torch::cat(blocks).reshape(row.shape) * scaling;
  }
  EXPECT_LT(max_abs_diff(got, want), 1e-10);
}

TEST_P(ExportAlgebra, LyCorisLoconIsExact) {
  const auto& row = GetParam();
  const auto m = make(row);
  if (std::string(row.kind) == "Embedding") {
    EXPECT_THROW(flora::io::to_locon(m), flora::Error);
    return;
  }
  const auto want = delta(m);
  const auto t = flora::io::to_locon(m);
  const int64_t r = t.rank;
  ASSERT_EQ(t.down.size(0), r);
  auto up = t.up.reshape({t.up.size(0), -1});
  torch::Tensor got;
  if (t.mid.defined()) {
    ASSERT_EQ(t.mid.size(0), r);
    ASSERT_EQ(t.mid.size(1), r);
    // LyCORIS's rebuild_tucker: einsum("i j ..., j r, i p -> p r ...", mid, down, up^T)
    auto down = t.down.reshape({r, -1});
    auto mid = t.mid.reshape({r, r, -1});
    got = torch::einsum("ijk,jr,ip->prk", {mid, down, up.t()}).reshape(row.shape);
  } else {
    got = up.mm(t.down.reshape({r, -1})).reshape(row.shape);
  }
  EXPECT_LT(max_abs_diff(got * (t.alpha / r), want), 1e-10);
}

INSTANTIATE_TEST_SUITE_P(Rows, ExportAlgebra, ::testing::ValuesIn(kRows), [](const auto& info) { return info.param.name; });

TEST(ExportAlgebra, ParametersAndUnknownKindsAreRejected) {
  auto m = make({"p", "Parameter", {4, 5}, {2, 2}, {false, false}, 1});
  EXPECT_THROW(flora::io::to_peft_lora(m), flora::Error);
  m.kind = "";
  try {
    flora::io::to_peft_lora(m);
    FAIL();
  } catch (const flora::Error& e) {
    EXPECT_NE(std::string(e.what()).find("module 'p'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(flora::io::parse_export_format("gguf"), flora::InvalidArgument);
}

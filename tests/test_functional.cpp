// The pure math against independent references: the mode-n product by its unfolding definition,
// dW by an explicit einsum, every special case of FLORA.md's table by its direct formula, and the
// factorized branches against torch's ops applied to the dense dW.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/autocast_mode.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "flora/detail/narrow_gemm.h"
#include "flora/flora.h"
#include "helpers.h"

namespace {

namespace F = flora::functional;
using flora_test::max_abs_diff;
using flora_test::relative_diff;
using torch::Tensor;

const auto kF64 = torch::TensorOptions().dtype(torch::kFloat64);

// dW by one einsum over all modes: "abcd,Aa,Bb,Cc,Dd->ABCD" (identity modes keep their letter).
Tensor einsum_delta(const Tensor& core, const std::vector<Tensor>& factors, double scale) {
  std::string lhs, rhs;
  std::vector<Tensor> ops{core};
  for (size_t n = 0; n < factors.size(); ++n) {
    const char small = static_cast<char>('a' + n), big = static_cast<char>('A' + n);
    lhs += small;
    if (factors[n].defined()) {
      rhs += big;
      ops.push_back(factors[n]);
    } else {
      rhs += small;
    }
  }
  std::string eq = lhs;
  for (size_t n = 0; n < factors.size(); ++n)
    if (factors[n].defined()) eq += std::string(",") + static_cast<char>('A' + n) + static_cast<char>('a' + n);
  eq += "->" + rhs;
  return torch::einsum(eq, ops) * scale;
}

TEST(ModeProduct, MatchesUnfoldingDefinition) {
  // (T x_n U)_(n) = U T_(n), with T_(n) the mode-n unfolding. The rank-1 shapes (size 1 in mode
  // n) take mode_product's broadcast branch, the others its GEMMs.
  for (const auto& t : {torch::randn({3, 4, 5}, kF64), torch::randn({1, 4, 1}, kF64), torch::randn({2, 1, 3}, kF64)})
  for (int64_t n = 0; n < 3; ++n) {
    for (int64_t rows : {int64_t{7}, int64_t{1}}) {
    auto u = torch::randn({rows, t.size(n)}, kF64);
    auto unfold = t.movedim(n, 0).reshape({t.size(n), -1});
    // Build the expected tensor by folding U T_(n) back.
    std::vector<int64_t> folded_shape{rows};
    for (int64_t m = 0; m < 3; ++m)
      if (m != n) folded_shape.push_back(t.size(m));
    auto expected = u.matmul(unfold).reshape(folded_shape).movedim(0, n);
    const auto got = F::mode_product(t, u, n);
    EXPECT_EQ(got.sizes(), expected.sizes()) << "mode " << n << " of " << t.sizes();
    EXPECT_LT(max_abs_diff(got, expected), 1e-12) << "mode " << n << " of " << t.sizes();
    }
  }
}

struct DeltaCase {
  std::vector<int64_t> shape, ranks;
  std::vector<bool> identity;
};

// Single modes, identity modes, rank-1 broadcasts and the fused Kronecker kernel modes (2 and 3
// of them; depthwise-like, 1x1, and a kernel too large to fuse). The [C, 1, kh, kw] rows with
// factors on modes 0, 2 and 3 take the depthwise loops (U_1 a 1x1 factor or identity; square
// and non-square kernels and ranks, so a transposed index shows). The other 4-d rows with factors
// on modes 2 and 3 take the kernel node (loops, then U_1 and U_0 as matmuls; each of modes 0 and 1
// a factor or identity).
std::vector<DeltaCase> delta_cases() {
  return {
      {{7}, {3}, {false}},
      {{6, 5}, {2, 3}, {false, false}},
      {{6, 5}, {2, 5}, {false, true}},
      {{8, 4, 3, 3}, {3, 2, 2, 2}, {false, false, false, false}},
      {{8, 4, 3, 3}, {3, 2, 3, 3}, {false, false, true, true}},
      {{8, 4, 3, 3}, {8, 4, 3, 3}, {true, true, true, true}},
      {{5, 2, 3, 2, 2}, {2, 2, 2, 1, 2}, {false, true, false, false, false}},
      {{6, 1, 7, 7}, {3, 1, 2, 2}, {false, true, false, false}},
      {{6, 1, 7, 7}, {3, 1, 2, 2}, {false, false, false, false}},
      {{5, 1, 5, 3}, {4, 1, 3, 2}, {false, false, false, false}},
      {{5, 1, 5, 3}, {4, 1, 2, 3}, {false, true, false, false}},
      {{5, 1, 5, 3}, {4, 1, 2, 3}, {false, false, false, false}},
      {{6, 4, 1, 1}, {2, 2, 1, 1}, {false, false, false, false}},
      {{4, 3, 3, 3, 3}, {2, 2, 2, 2, 2}, {false, false, false, false, false}},
      {{2, 2, 9, 9, 9}, {1, 1, 3, 3, 3}, {false, false, false, false, false}},
      {{3, 2, 3, 3}, {3, 2, 2, 3}, {true, false, false, false}},
      {{4, 3, 3, 3}, {4, 3, 2, 2}, {true, true, false, false}},
      {{3, 5, 5, 3}, {3, 5, 2, 3}, {true, true, false, false}},
      {{2, 3, 1, 1}, {2, 3, 1, 1}, {true, true, false, false}},
      {{5, 3, 3, 2}, {2, 3, 2, 1}, {false, true, false, false}},
      {{2, 7, 2, 3}, {2, 3, 2, 2}, {true, false, false, false}},
      {{9, 3, 4, 4}, {4, 3, 2, 2}, {false, false, false, false}},
      {{3, 6, 1, 1}, {3, 2, 1, 1}, {true, false, false, false}},
      {{2, 3, 17, 17}, {2, 2, 4, 4}, {false, false, false, false}},  // U_2 (x) U_3 over 4,096: generic node
  };
}

TEST(TuckerDelta, MatchesEinsumForOrdersOneToFiveWithIdentityModes) {
  const auto cases = delta_cases();
  for (const auto& c : cases) {
    auto core = torch::randn(c.ranks, kF64);
    std::vector<Tensor> factors(c.shape.size());
    for (size_t n = 0; n < c.shape.size(); ++n)
      if (!c.identity[n]) factors[n] = torch::randn({c.shape[n], c.ranks[n]}, kF64);
    auto dw = F::tucker_delta(core, factors, 0.37);
    EXPECT_EQ(dw.sizes().vec(), c.shape);
    EXPECT_LT(max_abs_diff(dw, einsum_delta(core, factors, 0.37)), 1e-10) << flora::format_shape(c.shape);
  }
}

TEST(TuckerDelta, GradientsMatchAutogradOfEinsumForEveryCase) {
  // tucker_delta is one autograd node with a hand-written backward; the reference is autograd
  // through at::einsum. Every third row freezes its last factor (the backward's skipped branch
  // must leave the other gradients right).
  const auto cases = delta_cases();
  for (size_t row = 0; row < cases.size(); ++row) {
    const auto& c = cases[row];
    const bool freeze_last = row % 3 == 2;
    auto core = torch::randn(c.ranks, kF64).requires_grad_(true);
    std::vector<Tensor> factors(c.shape.size());
    for (size_t n = 0; n < c.shape.size(); ++n)
      if (!c.identity[n]) factors[n] = torch::randn({c.shape[n], c.ranks[n]}, kF64).requires_grad_(true);
    int64_t frozen = -1;
    for (size_t n = 0; n < factors.size(); ++n)
      if (factors[n].defined()) frozen = static_cast<int64_t>(n);
    if (freeze_last && frozen >= 0) factors[static_cast<size_t>(frozen)].requires_grad_(false);
    const auto weights = torch::randn(c.shape, kF64);
    auto grads_of = [&](const Tensor& dw) {
      std::vector<Tensor> inputs{core};
      for (const auto& u : factors)
        if (u.defined() && u.requires_grad()) inputs.push_back(u);
      return torch::autograd::grad({(dw * weights).sum()}, inputs);
    };
    const auto got = grads_of(F::tucker_delta(core, factors, 0.37));
    const auto want = grads_of(einsum_delta(core, factors, 0.37));
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_LT(max_abs_diff(got[i], want[i]), 1e-10) << flora::format_shape(c.shape) << " input " << i;
  }
}

TEST(TuckerDelta, RefusesDoubleBackwardWithAClearError) {
  // The generic node, the depthwise loops and the kernel node (without factors on modes 0 and 1,
  // and with both).
  struct Row { std::vector<int64_t> core; bool u0, u1; };
  const std::vector<Row> rows{
      {{2, 3}, true, false}, {{3, 1, 2, 2}, true, false}, {{3, 2, 2, 2}, false, false}, {{3, 2, 2, 2}, true, true}};
  for (const auto& row : rows) {
    const auto& shape = row.core;
    auto core = torch::randn(shape, kF64).requires_grad_(true);
    std::vector<Tensor> factors{row.u0 ? torch::randn({4, shape[0]}, kF64).requires_grad_(true) : Tensor(),
                                row.u1 ? torch::randn({6, shape[1]}, kF64).requires_grad_(true) : Tensor()};
    if (shape.size() == 4) factors.push_back(torch::randn({5, 2}, kF64)), factors.push_back(torch::randn({5, 2}, kF64));
    auto dw = F::tucker_delta(core, factors, 1.0);
    try {
      torch::autograd::grad({dw.sum()}, {core}, {}, /*retain_graph=*/true, /*create_graph=*/true);
      FAIL() << "double backward did not throw for core " << flora::format_shape(shape);
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("double backward"), std::string::npos) << e.what();
    }
  }
}

TEST(TuckerDelta, LoopsInFloatMatchTheDoubleReference) {
  // The depthwise and kernel nodes are templated on the dtype; float32 is what training runs.
  // Reference: einsum in double on the same values, with a non-contiguous incoming gradient; the
  // error is measured against the largest sum of term magnitudes (rounding's own scale).
  // Rows freeze nothing, the core, U_0 or U_1 (backward skips their passes), or the core and
  // both kernel factors (only U_0 / U_1 train: the kernel rows' gradient is never formed).
  struct Setup { const char* name; std::vector<int64_t> core; std::vector<std::vector<int64_t>> factors, weight; };
  const std::vector<Setup> setups{
      {"depthwise", {16, 1, 2, 2}, {{96, 16}, {1, 1}, {7, 2}, {7, 2}}, {{96, 1, 7, 7}}},
      {"kernel", {16, 12, 2, 2}, {{}, {}, {3, 2}, {3, 2}}, {{16, 12, 3, 3}}},
      {"folded input", {16, 12, 2, 2}, {{}, {40, 12}, {2, 2}, {2, 2}}, {{16, 40, 2, 2}}},
      {"merged", {16, 3, 2, 2}, {{48, 16}, {3, 3}, {7, 2}, {5, 2}}, {{48, 3, 5, 7}}},
      {"identity input mode", {16, 5, 2, 2}, {{24, 16}, {}, {3, 2}, {3, 2}}, {{24, 5, 3, 3}}},
  };
  // Each also built channels-last (the layout a channels-last model's conv takes), against an
  // incoming gradient that is strided or channels-last (a conv's weight gradient is).
  const int kCore = -1;  // index of the core in a frozen set; 0..3 are the factors' modes
  const std::vector<std::vector<int>> frozen_sets{{}, {kCore}, {0}, {1}, {kCore, 2, 3}};
  using Delta = std::function<Tensor(const Tensor&, const std::vector<Tensor>&, double)>;
  for (const auto& setup : setups)
  for (const auto format : {at::MemoryFormat::Preserve, at::MemoryFormat::ChannelsLast})
  for (const bool nhwc_gradient : {false, true}) {
    auto core = torch::randn(setup.core, kF64);
    std::vector<Tensor> factors;
    for (const auto& f : setup.factors) factors.push_back(f.empty() ? Tensor() : torch::randn(f, kF64));
    auto weights = torch::randn(setup.weight[0], kF64).transpose(2, 3);  // dW's shape, strided
    if (nhwc_gradient) weights = weights.contiguous(at::MemoryFormat::ChannelsLast);
    if (!nhwc_gradient) ASSERT_FALSE(weights.is_contiguous());  // [96, 1, 7, 7] is both layouts at once
    const Delta built = [format](const Tensor& c, const std::vector<Tensor>& us, double s) {
      return F::tucker_delta(c, us, s, format);
    };
    for (const auto& frozen : frozen_sets) {
      auto is_frozen = [&](int i) { return std::find(frozen.begin(), frozen.end(), i) != frozen.end(); };
      bool skip = false, trains = !is_frozen(kCore);
      for (int n = 0; n < 4; ++n) {
        if (is_frozen(n) && !factors[static_cast<size_t>(n)].defined()) skip = true;
        if (!is_frozen(n) && factors[static_cast<size_t>(n)].defined()) trains = true;
      }
      if (skip || !trains) continue;
      std::string row = std::string(setup.name) + (format == at::MemoryFormat::ChannelsLast ? " channels-last" : "") +
                        (nhwc_gradient ? ", NHWC gradient" : "") + ", frozen {";
      for (int i : frozen) row += (i == kCore ? "core" : "U_" + std::to_string(i)) + " ";
      row += "}";
      // With `magnitude`, every value enters as |x|: each output is then the sum of its terms'
      // magnitudes, which bounds float's rounding error where the signed sum cancels (u_1's
      // gradient is one scalar over all 96 x 49 entries, and can land near zero).
      auto grads_of = [&](Delta delta, torch::Dtype dtype, bool magnitude) {
        auto take = [&](const Tensor& t) { return magnitude ? t.abs().to(dtype) : t.to(dtype); };
        auto c = take(core).detach().requires_grad_(!is_frozen(kCore));
        std::vector<Tensor> us;
        for (size_t n = 0; n < factors.size(); ++n)
          us.push_back(factors[n].defined() ? take(factors[n]).detach().requires_grad_(!is_frozen(static_cast<int>(n)))
                                            : Tensor());
        auto dw = delta(c, us, 0.5);
        std::vector<Tensor> inputs;
        if (c.requires_grad()) inputs.push_back(c);
        for (const auto& t : us)
          if (t.defined() && t.requires_grad()) inputs.push_back(t);
        auto g = torch::autograd::grad({(dw * take(weights)).sum()}, inputs);
        g.insert(g.begin(), dw);
        return g;
      };
      const auto got = grads_of(built, torch::kFloat32, false);
      const auto want = grads_of(&einsum_delta, torch::kFloat64, false);
      const auto bound = grads_of(&einsum_delta, torch::kFloat64, true);
      ASSERT_EQ(got.size(), want.size()) << row;
      if (format == at::MemoryFormat::ChannelsLast)
        EXPECT_TRUE(got[0].is_contiguous(at::MemoryFormat::ChannelsLast)) << row << ": dW's strides " << got[0].strides();
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_EQ(got[i].scalar_type(), torch::kFloat32) << row << " output " << i;
        const double scale = bound[i].max().item<double>();
        EXPECT_LT(max_abs_diff(got[i].to(torch::kFloat64), want[i]) / scale, 1e-5) << row << " output " << i;
      }
    }
  }
}

TEST(TuckerDelta, RejectsMismatchedFactors) {
  auto core = torch::randn({2, 3});
  EXPECT_THROW(F::tucker_delta(core, {torch::randn({4, 2})}, 1.0), flora::Error);
  EXPECT_THROW(F::tucker_delta(core, {torch::randn({4, 2}), torch::randn({5, 2})}, 1.0), flora::Error);
  // A channels-last layout for a weight that has none: named, with the order it needs.
  const auto e = flora_test::error_message<flora::InvalidArgument>([&] {
    F::tucker_delta(core, {torch::randn({4, 2}), torch::randn({5, 3})}, 1.0, at::MemoryFormat::ChannelsLast);
  });
  EXPECT_NE(e.find("order-4"), std::string::npos) << e;
  EXPECT_NE(e.find("got order 2"), std::string::npos) << e;
}

// --- Special cases of FLORA.md's table, through the library's options, against direct formulas.

flora::nn::TuckerAdapter make_adapter(const flora::AdapterOptions& o, flora::LayerKind kind, std::vector<int64_t> shape) {
  auto spec = flora::resolve_spec(o, {"t", kind, shape, 1});
  flora::nn::TuckerAdapter a(spec, kF64);
  flora_test::randomize(a->parameters(), 1.0);
  return a;
}

TEST(SpecialCases, IdentityCoreIsLoRA) {
  auto a = make_adapter(flora::AdapterOptions().ranks({3, 3}).core(flora::CoreKind::Identity).scale(2.0),
                        flora::LayerKind::Linear, {6, 5});
  EXPECT_EQ(flora::nn::count_parameters(*a).trainable, 3 * 6 + 3 * 5);
  auto& u = a->factors();
  EXPECT_LT(max_abs_diff(a->delta_weight(), 2.0 * u[0].matmul(u[1].t())), 1e-12);
}

TEST(SpecialCases, DiagonalCoreIsSvdStyle) {
  auto a = make_adapter(flora::AdapterOptions().ranks({3, 3}).core(flora::CoreKind::Diagonal), flora::LayerKind::Linear,
                        {6, 5});
  auto& u = a->factors();
  auto l = a->core_parameter();
  EXPECT_LT(max_abs_diff(a->delta_weight(), u[0].matmul(torch::diag(l)).matmul(u[1].t())), 1e-12);
}

TEST(SpecialCases, FullCoreIsThreeMatrixLoRA) {
  auto a = make_adapter(flora::AdapterOptions().ranks({3, 2}).scale(0.5), flora::LayerKind::Linear, {6, 5});
  auto& u = a->factors();
  EXPECT_LT(max_abs_diff(a->delta_weight(), 0.5 * u[0].matmul(a->core()).matmul(u[1].t())), 1e-12);
}

TEST(SpecialCases, SuperDiagonalCoreIsCP) {
  auto a = make_adapter(flora::AdapterOptions().ranks({4, 4, 4, 4}).core(flora::CoreKind::Diagonal),
                        flora::LayerKind::Conv, {6, 5, 4, 4});
  auto& u = a->factors();
  auto l = a->core_parameter();
  auto expected = torch::zeros({6, 5, 4, 4}, kF64);
  for (int64_t r = 0; r < 4; ++r)
    expected += l[r] * torch::einsum("a,b,c,d->abcd", {u[0].select(1, r), u[1].select(1, r), u[2].select(1, r), u[3].select(1, r)});
  EXPECT_LT(max_abs_diff(a->delta_weight(), expected), 1e-12);
  EXPECT_EQ(flora::parameter_count(a->spec()), 4 + 4 * (6 + 5 + 4 + 4));
}

TEST(SpecialCases, IdentitySpatialModesIsTucker2LoCon) {
  auto a = make_adapter(flora::AdapterOptions().ranks({3, 2, 0, 0}).identity_modes({false, false, true, true}),
                        flora::LayerKind::Conv, {6, 5, 3, 3});
  auto& u = a->factors();
  // LoCon with use_tucker: up [out, r] . mid [r, r, k, k] . down [r, in].
  auto expected = torch::einsum("abhw,oa,cb->ochw", {a->core(), u[0], u[1]});
  EXPECT_LT(max_abs_diff(a->delta_weight(), expected), 1e-12);
  EXPECT_EQ(a->spec().ranks, (std::vector<int64_t>{3, 2, 3, 3}));
}

TEST(SpecialCases, LoRAMethodIsPeftConvLoRA) {
  auto a = make_adapter(flora::AdapterOptions().method(flora::Method::Lora).rank(3).alpha(6), flora::LayerKind::Conv,
                        {6, 5, 3, 3});
  auto lora_a = a->core();        // [r, in, k, k]  = PEFT lora_A.weight
  auto lora_b = a->factors()[0];  // [out, r]       = PEFT lora_B.weight[..., 0, 0]
  EXPECT_EQ(lora_a.sizes().vec(), (std::vector<int64_t>{3, 5, 3, 3}));
  auto expected = (lora_b.matmul(lora_a.reshape({3, -1}))).reshape({6, 5, 3, 3}) * (6.0 / 3.0);
  EXPECT_LT(max_abs_diff(a->delta_weight(), expected), 1e-12);
  // In-mode and spatial modes identity in FLoRA's terms give the same update.
  auto spec = flora::resolve_spec(flora::AdapterOptions().identity_modes({false, true, true, true}).ranks({3, 0, 0, 0}).scale(2.0),
                                  {"t", flora::LayerKind::Conv, {6, 5, 3, 3}, 1});
  EXPECT_EQ(flora::parameter_count(spec), flora::parameter_count(a->spec()));
}

TEST(SpecialCases, RsLoRAScalesBySqrtRank) {
  auto spec = flora::resolve_spec(flora::AdapterOptions().method(flora::Method::Lora).rank(16).alpha(8).use_rslora(true),
                                  {"t", flora::LayerKind::Linear, {64, 64}, 1});
  EXPECT_DOUBLE_EQ(spec.scale, 2.0);
  spec = flora::resolve_spec(flora::AdapterOptions().method(flora::Method::Lora).rank(16).alpha(8),
                             {"t", flora::LayerKind::Linear, {64, 64}, 1});
  EXPECT_DOUBLE_EQ(spec.scale, 0.5);
}

// --- Initialization.

TEST(Init, AuthorsDefaultIsZeroCoreAndKaimingNormalFactors) {
  auto spec = flora::resolve_spec(flora::AdapterOptions().ranks({64, 64}), {"t", flora::LayerKind::Linear, {4096, 2048}, 1});
  flora::nn::TuckerAdapter a(spec);
  EXPECT_EQ(a->core().abs().max().item<double>(), 0.0);
  // N(0, 1 / (2 r)): std = sqrt(1/128) ~ 0.0884.
  for (int n = 0; n < 2; ++n) {
    const double std = a->factors()[n].std().item<double>();
    EXPECT_NEAR(std, std::sqrt(1.0 / 128.0), 0.003) << "factor " << n;
    EXPECT_NEAR(a->factors()[n].mean().item<double>(), 0.0, 0.003);
  }
}

TEST(Init, LoraStyleZeroesModeZeroAndKaimingUniformsTheRest) {
  auto spec = flora::resolve_spec(flora::AdapterOptions().method(flora::Method::Lora).rank(8),
                                  {"t", flora::LayerKind::Linear, {64, 4096}, 1});
  flora::nn::TuckerAdapter a(spec);
  EXPECT_EQ(a->factors()[0].abs().max().item<double>(), 0.0);  // B = 0
  // A ~ U(-b, b), b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5)): b = 1 / sqrt(fan_in).
  const double bound = 1.0 / std::sqrt(4096.0);
  EXPECT_LE(a->core().abs().max().item<double>(), bound);
  EXPECT_NEAR(a->core().std().item<double>(), bound / std::sqrt(3.0), 0.05 * bound);
}

TEST(Init, EmbeddingLoraIsPeftLayoutAZeroBNormal) {
  auto spec = flora::resolve_spec(flora::AdapterOptions().method(flora::Method::Lora).rank(8),
                                  {"t", flora::LayerKind::Embedding, {1000, 512}, 1});
  flora::nn::TuckerAdapter a(spec);
  EXPECT_EQ(a->factors()[0].sizes().vec(), (std::vector<int64_t>{1000, 8}));  // lora_embedding_A^T
  EXPECT_EQ(a->factors()[0].abs().max().item<double>(), 0.0);
  EXPECT_NEAR(a->core().std().item<double>(), 1.0, 0.05);  // lora_embedding_B^T ~ N(0, 1)
}

TEST(Init, OrthogonalFactorsHaveOrthonormalColumns) {
  auto spec = flora::resolve_spec(flora::AdapterOptions().ranks({4, 3}).init(flora::Init::Orthogonal),
                                  {"t", flora::LayerKind::Linear, {10, 8}, 1});
  flora::nn::TuckerAdapter a(spec, kF64);
  for (int n = 0; n < 2; ++n) {
    auto u = a->factors()[n];
    EXPECT_LT(max_abs_diff(u.t().matmul(u), torch::eye(u.size(1), kF64)), 1e-6);  // torch's QR runs in float
  }
  EXPECT_EQ(a->core().abs().max().item<double>(), 0.0);
}

// --- Factorized branches against torch's ops with the dense dW.

struct ConvCase {
  std::string name;
  std::vector<int64_t> x_shape, w_shape, ranks;
  std::vector<bool> identity;
  F::ConvGeometry geo;
};

TEST(ConvBranch, EqualsConvolutionWithDenseDelta) {
  using PM = F::PaddingMode;
  const std::vector<ConvCase> cases = {
      {"plain", {2, 5, 7, 7}, {6, 5, 3, 3}, {3, 2, 2, 2}, {}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Zeros}},
      {"stride-dilation", {2, 5, 9, 8}, {6, 5, 3, 3}, {3, 2, 2, 3}, {}, {{2, 1}, {2, 1}, {2, 1}, 1, PM::Zeros}},
      {"grouped", {2, 6, 6, 6}, {9, 2, 3, 3}, {4, 2, 2, 2}, {}, {{1, 1}, {1, 1}, {1, 1}, 3, PM::Zeros}},
      {"depthwise", {2, 4, 6, 6}, {4, 1, 5, 5}, {3, 1, 2, 2}, {}, {{1, 1}, {2, 2}, {1, 1}, 4, PM::Zeros}},
      {"depthwise-multiplier", {1, 3, 5, 5}, {6, 1, 3, 3}, {2, 1, 3, 3}, {}, {{1, 1}, {1, 1}, {1, 1}, 3, PM::Zeros}},
      {"reflect", {1, 3, 6, 6}, {4, 3, 3, 3}, {2, 2, 2, 2}, {}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Reflect}},
      {"circular", {1, 3, 6, 6}, {4, 3, 3, 3}, {2, 2, 2, 2}, {}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Circular}},
      {"replicate-grouped", {1, 4, 6, 6}, {4, 2, 3, 3}, {2, 2, 2, 2}, {}, {{1, 1}, {1, 1}, {1, 1}, 2, PM::Replicate}},
      {"tucker2", {2, 5, 6, 6}, {6, 5, 3, 3}, {3, 2, 3, 3}, {false, false, true, true}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Zeros}},
      {"lora-layout-grouped", {2, 4, 6, 6}, {6, 2, 3, 3}, {3, 2, 3, 3}, {false, true, true, true}, {{1, 1}, {1, 1}, {1, 1}, 2, PM::Zeros}},
      {"identity-out-grouped", {2, 4, 6, 6}, {6, 2, 3, 3}, {6, 1, 2, 2}, {true, false, false, false}, {{1, 1}, {0, 0}, {1, 1}, 2, PM::Zeros}},
      {"pointwise", {2, 6, 5, 5}, {7, 6, 1, 1}, {3, 4, 1, 1}, {}, {{1, 1}, {0, 0}, {1, 1}, 1, PM::Zeros}},
      {"pointwise-stride-grouped", {2, 6, 7, 6}, {4, 3, 1, 1}, {3, 2, 1, 1}, {}, {{2, 2}, {0, 0}, {1, 1}, 2, PM::Zeros}},
      {"pointwise-padded-identity-out", {1, 4, 4, 4}, {5, 4, 1, 1}, {5, 3, 1, 1}, {true, false, false, false}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Reflect}},
      {"pointwise-conv1d", {2, 5, 9}, {3, 5, 1}, {2, 3, 1}, {}, {{2}, {0}, {1}, 1, PM::Zeros}},
      {"conv1d", {2, 3, 11}, {5, 3, 4}, {2, 2, 2}, {}, {{3}, {2}, {2}, 1, PM::Zeros}},
      {"conv3d", {1, 2, 5, 4, 6}, {3, 2, 3, 2, 3}, {2, 2, 2, 1, 2}, {}, {{1, 2, 1}, {1, 0, 1}, {1, 1, 2}, 1, PM::Zeros}},
      // kernel no larger than its stride: U_in folded into the core conv (flora::fold_input_factor)
      {"patchify-folded", {2, 6, 8, 8}, {8, 6, 2, 2}, {3, 3, 2, 2}, {}, {{2, 2}, {0, 0}, {1, 1}, 1, PM::Zeros}},
      {"patchify-folded-grouped", {2, 6, 8, 8}, {6, 3, 2, 2}, {2, 2, 2, 2}, {}, {{2, 2}, {0, 0}, {1, 1}, 2, PM::Zeros}},
      {"stem-folded-identity-out", {1, 3, 8, 8}, {5, 3, 4, 4}, {5, 3, 2, 2}, {true, false, false, false}, {{4, 4}, {0, 0}, {1, 1}, 1, PM::Zeros}},
  };
  // The rows above that must take the folded branch, and one that must not (guards the rows' intent).
  EXPECT_TRUE(flora::fold_input_factor(6, 1, 3, 3, 4, 64, 16));
  EXPECT_TRUE(flora::fold_input_factor(6, 2, 2, 2, 4, 64, 16));
  EXPECT_FALSE(flora::fold_input_factor(5, 1, 2, 3, 9, 49, 49));
  for (const auto& c : cases) {
    std::vector<bool> identity = c.identity.empty() ? std::vector<bool>(c.w_shape.size(), false) : c.identity;
    auto core = torch::randn(c.ranks, kF64);
    std::vector<Tensor> factors(c.w_shape.size());
    for (size_t n = 0; n < c.w_shape.size(); ++n)
      if (!identity[n]) factors[n] = torch::randn({c.w_shape[n], c.ranks[n]}, kF64);
    auto x = torch::randn(c.x_shape, kF64);
    auto dense = F::conv_nd(x, einsum_delta(core, factors, 0.6), {}, c.geo);
    auto branch = F::conv_branch(x, core, factors, 0.6, c.geo);
    EXPECT_EQ(branch.sizes(), dense.sizes()) << c.name;
    EXPECT_LT(max_abs_diff(branch, dense), 1e-10) << c.name;
  }
}

// functional::fused_factorized_conv (the factorized path as one node: GEMMs on the pixels' channel
// rows) against the op chain it replaces, conv_nd(x, W0, b) + conv_branch(x, ...), and against
// the dense update conv_nd(x, W0 + dW, b): output, and the gradients of x, the core, every
// factor, and W0 and the bias where a row trains them. Rows marked fd also check every adapter
// gradient by finite differences.
struct FusedCase {
  std::string name;
  std::vector<int64_t> x_shape, w_shape, ranks;
  std::vector<bool> identity;
  F::ConvGeometry geo;
  bool channels_last = false, bias = true, train_base = false, x_grad = true, fd = false;
  bool mixed_layout = false;   ///< the weight in the other layout than x
  bool strided_input = false;  ///< x a transposed view: neither NCHW- nor NHWC-contiguous
};

std::vector<FusedCase> fused_cases() {
  using PM = F::PaddingMode;
  const F::ConvGeometry same{{1, 1}, {1, 1}, {1, 1}, 1, PM::Zeros};
  return {
      {"resnet_3x3", {2, 6, 7, 6}, {5, 6, 3, 3}, {3, 3, 2, 2}, {}, same, false, false, false, true, true},
      {"resnet_3x3_channels_last", {2, 6, 7, 6}, {5, 6, 3, 3}, {3, 3, 2, 2}, {}, same, true},
      {"stride2_downsampling_3x3", {2, 4, 9, 8}, {6, 4, 3, 3}, {2, 3, 2, 2}, {}, {{2, 2}, {1, 1}, {1, 1}, 1, PM::Zeros}, true},
      {"stride_dilation_padding_beyond_kernel", {2, 4, 9, 8}, {6, 4, 3, 3}, {2, 3, 2, 1}, {},
       {{2, 1}, {3, 2}, {2, 1}, 1, PM::Zeros}, false, true, false, true, true},
      {"asymmetric_kernel_channels_last", {2, 5, 6, 9}, {4, 5, 3, 5}, {2, 3, 2, 3}, {}, {{1, 2}, {1, 2}, {1, 1}, 1, PM::Zeros}, true},
      {"pointwise_stride2_folded", {2, 6, 7, 7}, {8, 6, 1, 1}, {3, 2, 1, 1}, {}, {{2, 2}, {0, 0}, {1, 1}, 1, PM::Zeros}, true,
       false, false, true, true},
      {"patchify_folded", {2, 6, 8, 8}, {8, 6, 2, 2}, {3, 3, 2, 2}, {}, {{2, 2}, {0, 0}, {1, 1}, 1, PM::Zeros}, true},
      {"reflect_padding", {2, 4, 5, 6}, {4, 4, 3, 3}, {2, 2, 2, 2}, {}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Reflect}, false, true,
       false, true, true},
      {"circular_padding_channels_last", {2, 4, 5, 6}, {4, 4, 3, 3}, {2, 2, 2, 2}, {}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Circular}, true},
      {"tucker2_identity_spatial_modes", {2, 5, 6, 6}, {4, 5, 3, 3}, {2, 3, 3, 3}, {false, false, true, true}, same},
      {"identity_output_mode", {2, 5, 6, 6}, {4, 5, 3, 3}, {4, 2, 2, 2}, {true, false, false, false}, same, true},
      {"identity_input_mode", {2, 5, 6, 6}, {4, 5, 3, 3}, {2, 5, 2, 2}, {false, true, false, false}, same, false, true, false,
       true, true},
      {"lora_layout", {2, 5, 6, 6}, {4, 5, 3, 3}, {2, 5, 3, 3}, {false, true, true, true}, same, true},
      {"weight_and_bias_trainable", {2, 4, 5, 5}, {5, 4, 3, 3}, {2, 2, 2, 2}, {}, same, false, true, true},
      {"weight_and_bias_trainable_channels_last", {2, 4, 5, 5}, {5, 4, 3, 3}, {2, 2, 2, 2}, {}, same, true, true, true},
      {"input_needs_no_gradient", {2, 4, 5, 5}, {5, 4, 3, 3}, {2, 2, 2, 2}, {}, same, true, true, false, false},
      {"unbatched_input", {6, 7, 6}, {5, 6, 3, 3}, {3, 3, 2, 2}, {}, same, false, true, false, true, true},
      {"nchw_input_channels_last_weight", {2, 5, 6, 7}, {4, 5, 3, 3}, {2, 2, 2, 2}, {}, same, false, true, false, true,
       false, true},
      {"channels_last_input_nchw_weight", {2, 5, 6, 7}, {4, 5, 3, 3}, {2, 2, 2, 2}, {}, same, true, true, false, true,
       false, true},
      {"transposed_view_input", {2, 5, 6, 7}, {4, 5, 3, 3}, {2, 2, 2, 2}, {}, {{2, 1}, {1, 1}, {1, 1}, 1, PM::Zeros},
       false, true, true, true, false, false, true},
  };
}

class FusedFactorizedBattery : public ::testing::TestWithParam<FusedCase> {};

TEST_P(FusedFactorizedBattery, EqualsTheOpChainAndTheDenseUpdateInOutputAndEveryGradient) {
  const auto& c = GetParam();
  const auto fmt = c.channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
  std::vector<bool> identity = c.identity.empty() ? std::vector<bool>(4, false) : c.identity;
  auto core = torch::randn(c.ranks, kF64).requires_grad_(true);
  std::vector<Tensor> factors(4), adapter{core};
  for (size_t n = 0; n < 4; ++n)
    if (!identity[n]) adapter.push_back(factors[n] = torch::randn({c.w_shape[n], c.ranks[n]}, kF64).requires_grad_(true));
  const auto other = c.channels_last ? torch::MemoryFormat::Contiguous : torch::MemoryFormat::ChannelsLast;
  auto w = torch::randn(c.w_shape, kF64).contiguous(c.mixed_layout ? other : fmt).requires_grad_(c.train_base);
  auto b = c.bias ? torch::randn({c.w_shape[0]}, kF64).requires_grad_(c.train_base) : Tensor();
  auto x = torch::randn(c.x_shape, kF64);
  if (x.dim() == 4) x = x.contiguous(fmt);
  if (c.strided_input) {  // a leaf whose memory is [N, C, W, H]
    x = torch::randn({c.x_shape[0], c.x_shape[1], c.x_shape[3], c.x_shape[2]}, kF64).transpose(2, 3);
    ASSERT_FALSE(x.is_contiguous() || x.is_contiguous(torch::MemoryFormat::ChannelsLast));
  }
  x.requires_grad_(c.x_grad);
  ASSERT_TRUE(F::fused_factorized_applies(x, w, core, c.geo)) << c.name;
  std::vector<Tensor> wrt = adapter;
  if (c.x_grad) wrt.push_back(x);
  if (c.train_base) wrt.push_back(w);
  if (c.train_base && c.bias) wrt.push_back(b);

  const Tensor fused = F::fused_factorized_conv(x, w, b, core, factors, 0.6, c.geo);
  const Tensor chain = F::conv_nd(x, w, b, c.geo) + F::conv_branch(x, core, factors, 0.6, c.geo);
  const Tensor dense = F::conv_nd(x, w + einsum_delta(core, factors, 0.6), b, c.geo);
  ASSERT_EQ(fused.sizes(), chain.sizes()) << c.name;
  EXPECT_LT(max_abs_diff(fused, chain), 1e-10) << c.name;
  EXPECT_LT(max_abs_diff(fused, dense), 1e-10) << c.name;
  if (x.dim() == 4 && !c.mixed_layout && !c.strided_input)
    EXPECT_EQ(fused.is_contiguous(fmt), true) << c.name << ": the output keeps the input's layout";
  const Tensor probe = torch::randn_like(chain);
  const auto got = torch::autograd::grad({fused}, wrt, {probe});
  const auto want = torch::autograd::grad({chain}, wrt, {probe});
  const auto dense_grads = torch::autograd::grad({dense}, wrt, {probe});
  for (size_t i = 0; i < wrt.size(); ++i) {
    ASSERT_TRUE(got[i].defined()) << c.name << " gradient " << i;
    EXPECT_EQ(got[i].sizes(), wrt[i].sizes()) << c.name << " gradient " << i;
    EXPECT_LT(max_abs_diff(got[i], want[i]), 1e-10) << c.name << " gradient " << i;
    EXPECT_LT(max_abs_diff(got[i], dense_grads[i]), 1e-10) << c.name << " gradient " << i;
  }
  if (c.fd) {
    const Tensor xd = x.detach();
    EXPECT_LT(flora_test::finite_difference_error(
                  [&] { return (F::fused_factorized_conv(xd, w.detach(), b.defined() ? b.detach() : b, core, factors, 0.6, c.geo) *
                                probe).sum(); },
                  adapter),
              1e-6)
        << c.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Conv2d, FusedFactorizedBattery, ::testing::ValuesIn(fused_cases()),
                         [](const ::testing::TestParamInfo<FusedCase>& info) { return info.param.name; });

TEST(FusedFactorizedConv, FloatMatchesTheDoubleOpChainAtResNetLayer4Size) {
  // ResNet-18's layer4 conv at 64-px images, as the cost rule fuses it: float against float64.
  const F::ConvGeometry geo{{1, 1}, {1, 1}, {1, 1}, 1, F::PaddingMode::Zeros};
  auto x = torch::randn({16, 64, 2, 2}).contiguous(torch::MemoryFormat::ChannelsLast).requires_grad_(true);
  auto w = (torch::randn({64, 64, 3, 3}) * 0.05).contiguous(torch::MemoryFormat::ChannelsLast);
  auto core = torch::randn({16, 16, 2, 2}).requires_grad_(true);
  std::vector<Tensor> factors{torch::randn({64, 16}) * 0.2, torch::randn({64, 16}) * 0.2, torch::randn({3, 2}), torch::randn({3, 2})};
  for (auto& f : factors) f.requires_grad_(true);
  EXPECT_TRUE(flora::fuse_factorized_conv(16.0 * 2 * 2 * 9 * 16)) << "the rule fuses this layer";
  const Tensor y = F::fused_factorized_conv(x, w, {}, core, factors, 0.5, geo);
  auto d = [](const Tensor& t) { return t.detach().to(torch::kFloat64).requires_grad_(t.requires_grad()); };
  std::vector<Tensor> fd{d(factors[0]), d(factors[1]), d(factors[2]), d(factors[3])};
  const Tensor xd = d(x), cd = d(core);
  const Tensor ref = F::conv_nd(xd, w.to(torch::kFloat64), {}, geo) + F::conv_branch(xd, cd, fd, 0.5, geo);
  EXPECT_LT(relative_diff(y, ref), 1e-5);
  const Tensor probe = torch::randn_like(ref);
  const auto got = torch::autograd::grad({y}, {x, core, factors[0], factors[1]}, {probe.to(torch::kFloat32)});
  const auto want = torch::autograd::grad({ref}, {xd, cd, fd[0], fd[1]}, {probe});
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_LT(relative_diff(got[i], want[i]), 1e-4) << i;
}

TEST(NarrowGemm, FusedAndHybridConvInFloatMatchTheDoubleOpChain) {
  // Ranks 8 to 32 wide in float32: the fused node's products and the hybrid node's 1x1 steps run
  // on the narrow kernels (on an AVX2 machine; LibTorch's GEMM and convs under FLORA_NO_AVX2)
  // and must equal the float64 op chain.
  struct Row {
    std::string name;
    std::vector<int64_t> x_shape, w_shape, ranks;
    std::vector<bool> identity;
    F::ConvGeometry geo;
    bool channels_last;
  };
  using PM = F::PaddingMode;
  const std::vector<Row> rows{
      {"ranks_16_8_channels_last", {4, 24, 6, 6}, {32, 24, 3, 3}, {16, 8, 2, 2}, {}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Zeros}, true},
      {"ranks_24_32_stride2_nchw", {3, 40, 7, 5}, {36, 40, 3, 3}, {24, 32, 3, 2}, {}, {{2, 2}, {1, 1}, {1, 1}, 1, PM::Zeros}, false},
      {"identity_output_16_wide", {2, 12, 5, 5}, {16, 12, 3, 3}, {16, 8, 2, 2}, {true, false, false, false},
       {{1, 1}, {1, 1}, {1, 1}, 1, PM::Zeros}, true},
      {"patchify_folded_rank_8", {2, 12, 8, 8}, {20, 12, 2, 2}, {8, 16, 2, 2}, {}, {{2, 2}, {0, 0}, {1, 1}, 1, PM::Zeros}, true},
  };
  for (const auto& c : rows) {
    const auto fmt = c.channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
    auto x = torch::randn(c.x_shape).contiguous(fmt).requires_grad_(true);
    const auto w = (torch::randn(c.w_shape) * 0.1).contiguous(fmt);
    auto core = torch::randn(c.ranks).requires_grad_(true);
    std::vector<Tensor> factors(4), wrt{x, core};
    for (size_t n = 0; n < 4; ++n)
      if (c.identity.empty() || !c.identity[n]) wrt.push_back(factors[n] = (torch::randn({c.w_shape[n], c.ranks[n]}) * 0.3).requires_grad_(true));
    ASSERT_TRUE(F::fused_factorized_applies(x, w, core, c.geo)) << c.name;
    std::vector<Tensor> wrt64;
    for (const auto& t : wrt) wrt64.push_back(t.detach().to(torch::kFloat64).requires_grad_(true));
    std::vector<Tensor> f64(4);
    for (size_t n = 0, i = 2; n < 4; ++n)
      if (factors[n].defined()) f64[n] = wrt64[i++];
    const Tensor ref = F::conv_nd(wrt64[0], w.to(torch::kFloat64), {}, c.geo) + F::conv_branch(wrt64[0], wrt64[1], f64, 0.7, c.geo);
    const Tensor probe = torch::randn_like(ref);
    const auto want = torch::autograd::grad({ref}, wrt64, {probe}, true);
    for (const bool hybrid : {false, true}) {
      const std::string name = c.name + (hybrid ? " (hybrid)" : " (fused)");
      const auto before = flora::detail::narrow_calls();
      const Tensor y = hybrid ? F::hybrid_conv(x, w, {}, core, factors, 0.7, c.geo)
                              : F::fused_factorized_conv(x, w, {}, core, factors, 0.7, c.geo);
      ASSERT_EQ(y.sizes(), ref.sizes()) << name;
      EXPECT_LT(relative_diff(y, ref), 1e-5) << name;
      const auto got = torch::autograd::grad({y}, wrt, {probe.to(torch::kFloat32)});
      for (size_t i = 0; i < got.size(); ++i)
        EXPECT_LT(relative_diff(got[i], want[i]), 1e-5)
            << name << " gradient " << i;
      // The figures above came from the kernels (every product kind entered), or, without AVX2,
      // from LibTorch alone.
      const auto after = flora::detail::narrow_calls();
      const bool kernels = flora::detail::avx2_fma_enabled();
      EXPECT_EQ(after.mm > before.mm, kernels) << name << ": x U_in or gy U_out";
      EXPECT_EQ(after.tmm > before.tmm, kernels) << name << ": a factor's gradient";
      EXPECT_EQ(after.add > before.add, kernels) << name << (hybrid ? ": the merged weight" : ": the update added");
      EXPECT_EQ(after.pair, before.pair) << name << ": below 2^18 elements of x its two products run apart";
    }
  }
}

TEST(NarrowGemm, TheHybridNodeGivesGysStepsToOneDnnAbove2To20ElementsAndKeepsXsOnePass) {
  // flora::narrow_hybrid_steps: at larger maps the hybrid node's steps on gy (gy U_out and
  // U_out's gradient) run as oneDNN 1x1 convs (faster there, docs/PERFORMANCE.md session 20); x's
  // two products stay on the kernels in one pass (session 21), as does the merged weight. Both
  // sides of the line must equal the float64 op chain.
  const F::ConvGeometry geo{{1, 1}, {1, 1}, {1, 1}, 1, F::PaddingMode::Zeros};
  const auto cl = torch::MemoryFormat::ChannelsLast;
  for (const int64_t width : {64, 130}) {  // 4 x 16 x 128 x width elements: 524,288 and 1,064,960
    const auto x = torch::randn({4, 16, 128, width}).contiguous(cl).requires_grad_(true);
    const auto w = (torch::randn({16, 16, 3, 3}) * 0.1).contiguous(cl);
    auto core = torch::randn({16, 16, 2, 2}).requires_grad_(true);
    std::vector<Tensor> factors, wrt{x, core};
    for (const int64_t n : {16, 16, 3, 3}) {
      factors.push_back((torch::randn({n, n == 3 ? 2 : 16}) * 0.3).requires_grad_(true));
      wrt.push_back(factors.back());
    }
    const bool small = x.numel() <= (int64_t{1} << 20);
    ASSERT_EQ(flora::narrow_hybrid_steps(static_cast<double>(x.numel())), small);
    std::vector<Tensor> wrt64, f64;
    for (const auto& t : wrt) wrt64.push_back(t.detach().to(torch::kFloat64).requires_grad_(true));
    f64.assign(wrt64.begin() + 2, wrt64.end());
    const Tensor ref = F::conv_nd(wrt64[0], w.to(torch::kFloat64), {}, geo) + F::conv_branch(wrt64[0], wrt64[1], f64, 0.7, geo);
    const Tensor probe = torch::randn_like(ref).contiguous(cl);
    const auto want = torch::autograd::grad({ref}, wrt64, {probe});
    const std::string name = "width " + std::to_string(width);
    const auto before = flora::detail::narrow_calls();
    const Tensor y = F::hybrid_conv(x, w, {}, core, factors, 0.7, geo);
    const auto got = torch::autograd::grad({y}, wrt, {probe.to(torch::kFloat32)});
    const auto after = flora::detail::narrow_calls();
    EXPECT_LT(relative_diff(y, ref), 1e-5) << name;
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_LT(relative_diff(got[i], want[i]), 1e-5)
          << name << " gradient " << i;
    const bool kernels = flora::detail::avx2_fma_enabled();
    EXPECT_EQ(after.mm > before.mm, kernels && small) << name << ": gy U_out";
    EXPECT_EQ(after.tmm > before.tmm, kernels && small) << name << ": U_out's gradient";
    EXPECT_EQ(after.pair > before.pair, kernels) << name << ": x U_in and U_in's gradient";
    EXPECT_EQ(after.add > before.add, kernels) << name << ": the merged weight";
  }
}

TEST(NarrowGemm, TheHybridNodeReadsNchwMapsAsPlanes) {
  // NCHW x and gy: the hybrid node's 1x1 steps run on the kernels with the roles swapped (each
  // image's [C, H W] block as the operand: no copy to channels-last, no oneDNN reorder), at every
  // size, x's two products in one pass. Rows cover one image split into pixel ranges over the
  // threads and each range into two chunks of the one pass (256 channels: chunks of 512
  // pixels), an odd batch with stride 2 (gy smaller than x), an identity output mode (gy's
  // steps absent) and ResNet-18's layer1 conv; on three threads, whatever the machine's count.
  // A rank of 40 (not a narrow width) keeps the node off the planes: oneDNN's 1x1 steps then.
  // Conv1d (NCL) and Conv3d (NCDHW) maps are planes too.
  const flora_test::ScopedThreads three(3);
  struct Row {
    std::string name;
    std::vector<int64_t> x_shape, w_shape, ranks;
    bool identity_out;
    F::ConvGeometry geo;
    bool planes = true;
    bool separable = false;  ///< the core conv as separable filters (stride-1 "same" 2-d, factored kernel modes)
  };
  using PM = F::PaddingMode;
  const F::ConvGeometry same{{1, 1}, {1, 1}, {1, 1}, 1, PM::Zeros};
  const std::vector<Row> rows{
      {"one_image_ranges_and_chunks", {1, 256, 40, 40}, {32, 256, 3, 3}, {16, 24, 2, 2}, false, same, true, true},
      {"three_images_stride2", {3, 24, 9, 11}, {40, 24, 3, 3}, {8, 16, 3, 2}, false, {{2, 2}, {1, 1}, {1, 1}, 1, PM::Zeros}},
      {"identity_output", {2, 16, 12, 12}, {16, 16, 3, 3}, {16, 8, 2, 2}, true, same},
      {"resnet18_layer1", {2, 64, 56, 56}, {64, 64, 3, 3}, {16, 16, 2, 2}, false, same, true, true},
      {"output_rank_40_not_planes", {2, 16, 12, 12}, {48, 16, 3, 3}, {40, 16, 2, 2}, false, same, false},
      {"conv1d_ncl_stride2", {3, 24, 50}, {32, 24, 3}, {16, 8, 2}, false, {{2}, {1}, {1}, 1, PM::Zeros}},
      {"conv3d_ncdhw", {2, 16, 4, 6, 5}, {24, 16, 3, 3, 3}, {8, 16, 2, 2, 2}, false,
       {{1, 1, 1}, {1, 1, 1}, {1, 1, 1}, 1, PM::Zeros}},
  };
  for (const auto& c : rows) {
    auto x = torch::randn(c.x_shape).requires_grad_(true);
    const auto w = torch::randn(c.w_shape) * 0.05;
    auto core = torch::randn(c.ranks).requires_grad_(true);
    const size_t modes = c.ranks.size();
    std::vector<Tensor> factors(modes), wrt{x, core};
    for (size_t n = 0; n < modes; ++n)
      if (n != 0 || !c.identity_out) wrt.push_back(factors[n] = (torch::randn({c.w_shape[n], c.ranks[n]}) * 0.3).requires_grad_(true));
    std::vector<Tensor> wrt64, f64(modes);
    for (const auto& t : wrt) wrt64.push_back(t.detach().to(torch::kFloat64).requires_grad_(true));
    for (size_t n = 0, i = 2; n < modes; ++n)
      if (factors[n].defined()) f64[n] = wrt64[i++];
    const Tensor ref = F::conv_nd(wrt64[0], w.to(torch::kFloat64), {}, c.geo) + F::conv_branch(wrt64[0], wrt64[1], f64, 0.7, c.geo);
    const Tensor probe = torch::randn_like(ref);  // contiguous NCHW, as a real loss's gradient
    const auto want = torch::autograd::grad({ref}, wrt64, {probe});
    const auto before = flora::detail::narrow_calls();
    const Tensor y = F::hybrid_conv(x, w, {}, core, factors, 0.7, c.geo);
    const auto got = torch::autograd::grad({y}, wrt, {probe.to(torch::kFloat32)});
    const auto after = flora::detail::narrow_calls();
    EXPECT_LT(relative_diff(y, ref), 1e-5) << c.name;
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_LT(relative_diff(got[i], want[i]), 1e-5)
          << c.name << " gradient " << i;
    const bool kernels = flora::detail::avx2_fma_enabled();
    EXPECT_EQ(after.tmm > before.tmm, kernels && c.planes) << c.name << ": x U_in (and gy U_out) as planes";
    EXPECT_EQ(after.mm > before.mm, kernels && c.planes) << c.name << ": the factors' gradients as planes";
    EXPECT_EQ(after.pair, before.pair) << c.name << ": planes make their one pass without narrow_mm_tmm";
    EXPECT_EQ(after.separable > before.separable, kernels && c.separable) << c.name << ": the core conv as separable filters";
  }
}

TEST(NarrowGemm, TheHybridCoreConvRunsAsSeparableFilters) {
  // A stride-1 "same" 2-d conv with both kernel modes factored: the hybrid node's core conv (for
  // U_out's gradient) and its input gradient run as separable filters and a channel mix
  // (detail::separable_conv) where that takes at most 3/4 of the multiply-adds; equal to the
  // float64 composition in output and every gradient, channels-last and NCHW, on three threads.
  // Rows where it must not run: spatial ranks as large as the kernel (no saving), a reflect-
  // padded conv (x arrives padded, so the core conv is not "same"), dilation 2.
  const flora_test::ScopedThreads three(3);
  using PM = F::PaddingMode;
  struct Row {
    std::string name;
    std::vector<int64_t> x_shape, w_shape, ranks;
    F::ConvGeometry geo;
    bool separable;
  };
  const std::vector<Row> rows{
      {"3x3_ranks_16_8", {2, 16, 12, 12}, {24, 16, 3, 3}, {16, 8, 2, 2}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Zeros}, true},
      {"5x3_ranks_32_24_odd_map", {3, 32, 7, 5}, {40, 32, 5, 3}, {24, 32, 3, 1}, {{1, 1}, {2, 1}, {1, 1}, 1, PM::Zeros}, true},
      {"1x1_map", {2, 16, 1, 1}, {16, 16, 3, 3}, {8, 16, 2, 2}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Zeros}, true},
      {"spatial_ranks_3x3", {2, 16, 9, 9}, {16, 16, 3, 3}, {16, 16, 3, 3}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Zeros}, false},
      {"reflect_padding", {2, 16, 9, 9}, {16, 16, 3, 3}, {16, 16, 2, 2}, {{1, 1}, {1, 1}, {1, 1}, 1, PM::Reflect}, false},
      {"dilation_2", {2, 16, 9, 9}, {16, 16, 3, 3}, {16, 16, 2, 2}, {{1, 1}, {2, 2}, {2, 2}, 1, PM::Zeros}, false},
  };
  for (const auto& c : rows)
    for (bool channels_last : {true, false}) {
      const std::string name = c.name + (channels_last ? " channels-last" : " NCHW");
      auto x = torch::randn(c.x_shape);
      if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
      x.requires_grad_(true);
      const auto w = torch::randn(c.w_shape) * 0.05;
      auto core = torch::randn(c.ranks).requires_grad_(true);
      std::vector<Tensor> factors(4), wrt{x, core};
      for (size_t n = 0; n < 4; ++n) wrt.push_back(factors[n] = (torch::randn({c.w_shape[n], c.ranks[n]}) * 0.3).requires_grad_(true));
      std::vector<Tensor> wrt64;
      for (const auto& t : wrt) wrt64.push_back(t.detach().to(torch::kFloat64).requires_grad_(true));
      const std::vector<Tensor> f64(wrt64.begin() + 2, wrt64.end());
      const Tensor ref = F::conv_nd(wrt64[0], w.to(torch::kFloat64), {}, c.geo) + F::conv_branch(wrt64[0], wrt64[1], f64, 0.7, c.geo);
      const Tensor probe = torch::randn_like(ref);
      const auto want = torch::autograd::grad({ref}, wrt64, {probe});
      const auto before = flora::detail::narrow_calls();
      const Tensor y = F::hybrid_conv(x, w, {}, core, factors, 0.7, c.geo);
      const auto got = torch::autograd::grad({y}, wrt, {probe.to(torch::kFloat32)});
      const auto after = flora::detail::narrow_calls();
      EXPECT_LT(relative_diff(y, ref), 1e-5) << name;
      for (size_t i = 0; i < got.size(); ++i) EXPECT_LT(relative_diff(got[i], want[i]), 1e-5) << name << " gradient " << i;
      // Two core convs (U_out's gradient, U_in's), each entering the kernel once per thread's rows.
      EXPECT_EQ(after.separable > before.separable, flora::detail::avx2_fma_enabled() && c.separable) << name;
    }
}

// flora/detail/narrow_gemm.h's kernels on raw memory against float64 products: every width,
// row counts that leave each register block's tail (AVX2's blocks and AVX-512's; CTest runs the
// battery again with FLORA_NO_AVX512 and with FLORA_NO_AVX2), strided rows, a partial range of
// output rows (the others untouched), and the wide product overwriting, accumulating or adding
// a separate base.
struct NarrowCase {
  std::string name;
  char op;  ///< 'm': a b; 't': a^T b over rows [i0, i1); 'w': a b into c; 'a': c += a b; 'b': c = base + a b;
            ///< 'p': a b and acc += a^T g in one pass
  int64_t rows, k, n, pad = 0, i0 = 0, i1 = -1;
};

class NarrowGemmBattery : public ::testing::TestWithParam<NarrowCase> {};

TEST_P(NarrowGemmBattery, EqualsTheDoubleProduct) {
  namespace D = flora::detail;
  const auto& c = GetParam();
  const double tol = 1e-5;
  const float sentinel = -12345.0f;
  auto largest = [](const Tensor& t) { return t.numel() ? t.abs().max().item<double>() : 0.0; };
  if (c.op == 'm') {  // a [rows, k] with row stride k + pad, b [k, n]
    const Tensor a = torch::randn({c.rows, c.k + c.pad}).narrow(1, 0, c.k), b = torch::randn({c.k, c.n});
    Tensor out = torch::full({c.rows, c.n}, sentinel);
    D::narrow_mm(a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(), out.data_ptr<float>(), c.rows, c.k, c.n);
    const Tensor ref = a.to(torch::kFloat64).mm(b.to(torch::kFloat64));
    if (c.rows == 0) return;  // nothing to write, and nothing read
    EXPECT_LE(max_abs_diff(out.to(torch::kFloat64), ref), tol * (1 + largest(ref))) << c.name;
  } else if (c.op == 't') {  // a [rows, k] with row stride k + pad, b [rows, n]: rows i0..i1 of a^T b
    const int64_t i1 = c.i1 < 0 ? c.k : c.i1;
    const Tensor a = torch::randn({c.rows, c.k + c.pad}).narrow(1, 0, c.k), b = torch::randn({c.rows, c.n});
    Tensor out = torch::full({c.k, c.n}, sentinel);
    D::narrow_tmm(a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(), out.data_ptr<float>(), c.rows, c.i0, i1, c.n);
    const Tensor ref = a.to(torch::kFloat64).t().mm(b.to(torch::kFloat64)).narrow(0, c.i0, i1 - c.i0);
    EXPECT_LE(max_abs_diff(out.narrow(0, c.i0, i1 - c.i0).to(torch::kFloat64), ref), tol * (1 + largest(ref))) << c.name;
    const int64_t untouched = out.numel() - (i1 - c.i0) * c.n;
    EXPECT_EQ(out.eq(sentinel).sum().item<int64_t>(), untouched) << c.name << ": rows outside [i0, i1) are left alone";
  } else if (c.op == 'p') {  // a [rows, k] with row stride k + pad, u [k, n], g [rows, n]: c = a u, acc += a^T g
    const Tensor a = torch::randn({c.rows, c.k + c.pad}).narrow(1, 0, c.k), u = torch::randn({c.k, c.n});
    const Tensor g = torch::randn({c.rows, c.n}), acc_before = torch::randn({c.k, c.n});
    Tensor out = torch::full({c.rows, c.n}, sentinel), acc = acc_before.clone();
    std::vector<float> scratch(static_cast<size_t>(c.k * c.n), sentinel);
    D::narrow_mm_tmm(a.data_ptr<float>(), a.stride(0), u.data_ptr<float>(), g.data_ptr<float>(), out.data_ptr<float>(),
                     acc.data_ptr<float>(), scratch.data(), c.rows, c.k, c.n);
    const Tensor a64 = a.to(torch::kFloat64);
    const Tensor ref = a64.mm(u.to(torch::kFloat64)), ref_acc = acc_before.to(torch::kFloat64) + a64.t().mm(g.to(torch::kFloat64));
    if (c.rows) EXPECT_LE(max_abs_diff(out.to(torch::kFloat64), ref), tol * (1 + largest(ref))) << c.name << ": a u";
    EXPECT_LE(max_abs_diff(acc.to(torch::kFloat64), ref_acc), tol * (1 + largest(ref_acc))) << c.name << ": acc + a^T g";
  } else if (c.op == 'b') {  // c [rows, n] = base + a b, base with row stride n + pad, left untouched
    const Tensor a = torch::randn({c.rows, c.k}), b = torch::randn({c.k, c.n});
    const Tensor base = torch::randn({c.rows, c.n + c.pad}), before = base.clone();
    Tensor out = torch::full({c.rows, c.n}, sentinel);
    D::narrow_add_mm(base.data_ptr<float>(), base.stride(0), a.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>(),
                     c.n, c.rows, c.k, c.n);
    const Tensor ref = a.to(torch::kFloat64).mm(b.to(torch::kFloat64)) + base.narrow(1, 0, c.n).to(torch::kFloat64);
    EXPECT_LE(max_abs_diff(out.to(torch::kFloat64), ref), tol * (1 + largest(ref))) << c.name;
    EXPECT_TRUE(torch::equal(base, before)) << c.name << ": base untouched";
  } else {  // a [rows, k], b [k, n], c [rows, n] with row stride n + pad
    const bool accumulate = c.op == 'a';
    const Tensor a = torch::randn({c.rows, c.k}), b = torch::randn({c.k, c.n});
    Tensor base = torch::randn({c.rows, c.n + c.pad});
    const Tensor before = base.clone();
    Tensor out = base.narrow(1, 0, c.n);
    D::narrow_wide_mm(a.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>(), base.stride(0), c.rows, c.k, c.n,
                      accumulate);
    Tensor ref = a.to(torch::kFloat64).mm(b.to(torch::kFloat64));
    if (accumulate) ref += before.narrow(1, 0, c.n).to(torch::kFloat64);
    EXPECT_LE(max_abs_diff(out.to(torch::kFloat64), ref), tol * (1 + largest(ref))) << c.name;
    if (c.pad) EXPECT_TRUE(torch::equal(base.narrow(1, c.n, c.pad), before.narrow(1, c.n, c.pad))) << c.name << ": padding untouched";
  }
}

std::vector<NarrowCase> narrow_cases() {
  return {
      // a b: 8 rows a block at width 8, 6 at 16, 4 at 24, 3 at 32; each row count leaves a tail
      {"mm_width8_tail5", 'm', 13, 5, 8},
      {"mm_width16_tail2_strided", 'm', 20, 17, 16, 3},
      {"mm_width24_tail3", 'm', 7, 3, 24},
      {"mm_width32_tail2_im2col_length", 'm', 11, 144, 32, 1},
      {"mm_one_row_one_column", 'm', 1, 1, 16},
      {"mm_no_rows", 'm', 0, 4, 16},
      {"mm_resnet_layer2_projection", 'm', 1024, 128, 16},
      // AVX-512: 16 rows a block at width 16, 12 at width 32
      {"mm_width16_two_zmm_blocks_tail3", 'm', 35, 9, 16, 2},
      {"mm_width32_two_zmm_blocks_tail5", 'm', 29, 6, 32},
      // a^T b over output rows [i0, i1)
      {"tmm_width8_partial_rows", 't', 50, 13, 8, 2, 2, 11},
      {"tmm_width16_all_rows", 't', 100, 7, 16},
      {"tmm_width24_strided", 't', 33, 5, 24, 4},
      {"tmm_width32_tail1", 't', 9, 4, 32},
      {"tmm_no_rows_gives_zeros", 't', 0, 6, 16},
      {"tmm_resnet_layer3_core_gradient", 't', 256, 144, 16},
      {"tmm_width16_zmm_block_tail7_partial", 't', 40, 30, 16, 1, 3, 26},
      {"tmm_width32_two_zmm_blocks_tail5", 't', 21, 29, 32},
      // a b into c (k the narrow side, any width m): 16- and 8-column blocks, then single columns
      {"wide_overwrite_m130_strided", 'w', 9, 16, 130, 5},
      {"wide_accumulate_m130_strided", 'a', 9, 16, 130, 5},
      {"wide_accumulate_k1_m7", 'a', 5, 1, 7},
      {"wide_accumulate_k32_m24", 'a', 4, 32, 24},
      {"wide_overwrite_m8", 'w', 3, 8, 8},
      {"wide_accumulate_resnet_layer4_update", 'a', 64, 16, 512},
      // one 16-column block, one 8-column block, three single columns; 6-row blocks + a tail
      {"wide_accumulate_m27_rows7", 'a', 7, 16, 27, 2},
      // c = base + a b with a strided base (the merged weight W0 + U_out T)
      {"add_base_m27_rows13_strided", 'b', 13, 16, 27, 3},
      {"add_base_merged_weight_128", 'b', 128, 16, 1152},
      {"add_base_k24_m40", 'b', 5, 24, 40, 1},
      // a u and acc += a^T g in one pass, by chunks of 256 rows: a tail chunk, chunk edges
      {"pair_width16_three_chunks_strided", 'p', 600, 64, 16, 3},
      {"pair_width8_one_short_chunk", 'p', 255, 13, 8},
      {"pair_width32_chunk_edge_plus_one", 'p', 257, 40, 32},
      {"pair_width24_exactly_one_chunk", 'p', 256, 7, 24, 1},
      {"pair_no_rows_leaves_acc", 'p', 0, 9, 16},
      {"pair_resnet_layer1_x_pass", 'p', 3136, 64, 16},
  };
}

INSTANTIATE_TEST_SUITE_P(Kernels, NarrowGemmBattery, ::testing::ValuesIn(narrow_cases()),
                         [](const ::testing::TestParamInfo<NarrowCase>& info) { return info.param.name; });

TEST(FusedFactorizedConv, RefusesWhatItCannotRunAndDoubleBackward) {
  const auto message = flora_test::error_message<flora::InvalidArgument>;
  const F::ConvGeometry grouped{{1, 1}, {1, 1}, {1, 1}, 2, F::PaddingMode::Zeros};
  std::vector<Tensor> factors{torch::randn({4, 2}), torch::randn({2, 2}), torch::randn({3, 2}), torch::randn({3, 2})};
  std::string m = message([&] {
    F::fused_factorized_conv(torch::randn({1, 4, 5, 5}), torch::randn({4, 2, 3, 3}), {}, torch::randn({2, 2, 2, 2}), factors,
                             1.0, grouped);
  });
  EXPECT_NE(m.find("groups 2"), std::string::npos) << m;
  EXPECT_NE(m.find("hint:"), std::string::npos) << m;
  EXPECT_FALSE(F::fused_factorized_applies(torch::randn({1, 4, 5, 5}, kF64), torch::randn({4, 4, 3, 3}),
                                           torch::randn({2, 2, 2, 2}), {{1, 1}, {1, 1}, {1, 1}, 1, F::PaddingMode::Zeros}))
      << "an input of another dtype than the weight's goes to the op chain";
  {
    at::autocast::set_cpu_enabled(true);
    EXPECT_FALSE(F::fused_factorized_applies(torch::randn({1, 4, 5, 5}), torch::randn({4, 4, 3, 3}), torch::randn({2, 2, 2, 2}),
                                             {{1, 1}, {1, 1}, {1, 1}, 1, F::PaddingMode::Zeros}));
    at::autocast::set_cpu_enabled(false);
  }
  // Double backward: the node's saved tensors carry no history, so it is refused, not wrong;
  // also with respect to x alone with a frozen adapter, where the op chain would allow it.
  const F::ConvGeometry same{{1, 1}, {1, 1}, {1, 1}, 1, F::PaddingMode::Zeros};
  factors[1] = torch::randn({4, 2});
  const auto x = torch::randn({1, 4, 5, 5}).requires_grad_(true);
  const auto core = torch::randn({2, 2, 2, 2});
  auto y = F::fused_factorized_conv(x, torch::randn({4, 4, 3, 3}), {}, core, factors, 1.0, same);
  m = message([&] { torch::autograd::grad({y.pow(2).sum()}, {x}, {}, true, true); });
  EXPECT_NE(m.find("factorized_conv: double backward"), std::string::npos) << m;
  EXPECT_NE(m.find("hint:"), std::string::npos) << m;
}

TEST(FusedFactorizedConv, BackwardInsideAnAutocastScopeKeepsTheTensorsDtype) {
  // backward() called while CPU autocast is on: the node's GEMMs must not run in bfloat16.
  const F::ConvGeometry same{{1, 1}, {1, 1}, {1, 1}, 1, F::PaddingMode::Zeros};
  const auto x = torch::randn({2, 4, 5, 5}).contiguous(torch::MemoryFormat::ChannelsLast).requires_grad_(true);
  const auto w = torch::randn({6, 4, 3, 3});
  const auto core = torch::randn({2, 2, 2, 2}).requires_grad_(true);
  std::vector<Tensor> factors{torch::randn({6, 2}), torch::randn({4, 2}), torch::randn({3, 2}), torch::randn({3, 2})};
  for (auto& f : factors) f.requires_grad_(true);
  const Tensor probe = torch::randn({2, 6, 5, 5});
  auto grads = [&](bool autocast) {
    const Tensor y = F::fused_factorized_conv(x, w, {}, core, factors, 0.5, same);
    at::autocast::set_cpu_enabled(autocast);
    auto g = torch::autograd::grad({y}, {x, core, factors[0], factors[1]}, {probe});
    at::autocast::set_cpu_enabled(false);
    at::autocast::clear_cache();
    return g;
  };
  const auto plain = grads(false), scoped = grads(true);
  for (size_t i = 0; i < plain.size(); ++i) {
    EXPECT_EQ(scoped[i].scalar_type(), torch::kFloat32) << i;
    EXPECT_TRUE(torch::equal(scoped[i], plain[i])) << i;
  }
}

TEST(FusedFactorizedConv, TheFactorizedPathFusesResNetSmallMapsAndNotTheLargerOnes) {
  // ResNet-18's and ConvNeXt-tiny's convs at 64-px images, batch 16, forced onto the factorized
  // path: fused (one node) where the im2col matrix has at most 2^17 elements, or 2^18 where the
  // node's products run on the narrow kernels (float32, ranks 16, an AVX2 CPU); the op chain
  // (its last op the add of base and branch) elsewhere.
  struct Row {
    const char* name;
    torch::nn::Conv2dOptions conv;
    int64_t pixels;
    bool fused, fused_on_narrow_kernels;
  };
  using O = torch::nn::Conv2dOptions;
  const std::vector<Row> rows = {
      {"layer4 3x3, 2x2 maps", O(512, 512, 3).padding(1).bias(false), 2, true, true},
      {"layer3 3x3, 4x4 maps", O(256, 256, 3).padding(1).bias(false), 4, true, true},
      {"layer3 1x1/2 downsampling, U_in folded", O(128, 256, 1).stride(2).bias(false), 8, true, true},
      {"layer2 3x3, 8x8 maps (147,456)", O(128, 128, 3).padding(1).bias(false), 8, false, true},
      {"layer1 3x3, 16x16 maps (589,824)", O(64, 64, 3).padding(1).bias(false), 16, false, false},
      {"ConvNeXt 2x2/2 downsampling at 4x4, U_in folded", O(384, 768, 2).stride(2), 4, true, true},
      {"ConvNeXt 2x2/2 downsampling at 8x8, U_in folded (196,608)", O(192, 384, 2).stride(2), 8, false, true},
      {"ConvNeXt 2x2/2 downsampling at 16x16, U_in folded (393,216)", O(96, 192, 2).stride(2), 16, false, false},
  };
  const bool narrow = flora::detail::avx2_fma_enabled();
  for (const auto& r : rows) {
    flora::nn::Conv2d conv(r.conv);
    conv->add_adapter("default", flora::AdapterOptions().ranks({16, 16, 2, 2}).clip_ranks(true).conv_path(flora::ConvPath::Factorized));
    const auto x = torch::randn({16, r.conv.in_channels(), r.pixels, r.pixels}).contiguous(torch::MemoryFormat::ChannelsLast);
    const auto y = conv->forward(x);
    ASSERT_TRUE(y.grad_fn()) << r.name;
    const std::string node = y.grad_fn()->name();
    EXPECT_EQ(node.find("FusedFactorizedConv") != std::string::npos, narrow ? r.fused_on_narrow_kernels : r.fused)
        << r.name << ": " << node;
  }
}

// conv_nd's depthwise path (weight gradient as a batch-folded forward conv) against torch's own
// convolution autograd, in float64 and float32, for every geometry it accepts.
struct DepthwiseCase {
  std::string name;
  std::vector<int64_t> x_shape, w_shape;
  F::ConvGeometry geo;
  bool bias, input_grad;
  torch::Dtype dtype;
  bool channels_last = false;  ///< x and the output gradient in NHWC memory, as ConvNeXt's permutes leave them
};

TEST(ConvNd, DepthwiseWeightGradientMatchesTorchAutograd) {
  using PM = F::PaddingMode;
  const std::vector<DepthwiseCase> cases = {
      {"convnext-7x7", {2, 6, 16, 16}, {6, 1, 7, 7}, {{1, 1}, {3, 3}, {1, 1}, 6, PM::Zeros}, true, true, torch::kFloat64},
      {"convnext-7x7-f32", {3, 6, 16, 16}, {6, 1, 7, 7}, {{1, 1}, {3, 3}, {1, 1}, 6, PM::Zeros}, true, true, torch::kFloat32},
      {"padding-past-input", {2, 8, 2, 2}, {8, 1, 7, 7}, {{1, 1}, {3, 3}, {1, 1}, 8, PM::Zeros}, false, true, torch::kFloat64},
      {"padding-past-input-f32", {2, 8, 2, 3}, {8, 1, 7, 7}, {{1, 1}, {3, 3}, {1, 1}, 8, PM::Zeros}, true, false, torch::kFloat32},
      {"stride-dilation", {2, 4, 9, 8}, {4, 1, 3, 3}, {{2, 1}, {1, 2}, {2, 1}, 4, PM::Zeros}, true, true, torch::kFloat64},
      {"stride-3-uneven", {1, 3, 10, 11}, {3, 1, 4, 2}, {{3, 2}, {1, 0}, {1, 3}, 3, PM::Zeros}, false, true, torch::kFloat64},
      {"multiplier-2", {2, 3, 6, 6}, {6, 1, 3, 3}, {{1, 1}, {1, 1}, {1, 1}, 3, PM::Zeros}, true, true, torch::kFloat64},
      {"rectangular-kernel", {2, 4, 7, 9}, {4, 1, 3, 5}, {{1, 1}, {1, 2}, {1, 1}, 4, PM::Zeros}, false, false, torch::kFloat64},
      {"reflect", {1, 4, 6, 6}, {4, 1, 3, 3}, {{1, 1}, {1, 1}, {1, 1}, 4, PM::Reflect}, true, true, torch::kFloat64},
      {"circular-stride", {2, 4, 7, 7}, {8, 1, 3, 3}, {{2, 2}, {1, 1}, {1, 1}, 4, PM::Circular}, false, true, torch::kFloat64},
      {"channels-last", {2, 6, 9, 9}, {6, 1, 7, 7}, {{1, 1}, {3, 3}, {1, 1}, 6, PM::Zeros}, true, true, torch::kFloat64, true},
      {"channels-last-past-input", {2, 8, 2, 2}, {8, 1, 7, 7}, {{1, 1}, {3, 3}, {1, 1}, 8, PM::Zeros}, false, true, torch::kFloat32, true},
  };
  for (const auto& c : cases) {
    const auto opt = torch::TensorOptions().dtype(c.dtype);
    const auto format = c.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    const auto x = torch::randn(c.x_shape, opt).contiguous(format).requires_grad_(c.input_grad);
    const auto w = torch::randn(c.w_shape, opt).requires_grad_(true);
    const auto b = c.bias ? torch::randn({c.w_shape[0]}, opt).requires_grad_(true) : Tensor();
    auto y = F::conv_nd(x, w, b, c.geo);
    ASSERT_NE(y.grad_fn(), nullptr) << c.name;
    EXPECT_NE(y.grad_fn()->name().find("DepthwiseConv2d"), std::string::npos)
        << c.name << ": conv_nd took " << y.grad_fn()->name();
    // Reference: torch's convolution on explicitly padded input, its own autograd.
    Tensor xr = x.detach().clone().requires_grad_(c.input_grad), wr = w.detach().clone().requires_grad_(true);
    Tensor br = c.bias ? b.detach().clone().requires_grad_(true) : Tensor();
    const auto& p = c.geo.padding;
    Tensor in = xr;
    std::vector<int64_t> pad = p;
    if (c.geo.padding_mode != PM::Zeros) {
      in = at::pad(xr, {p[1], p[1], p[0], p[0]}, c.geo.padding_mode == PM::Reflect ? "reflect" : "circular");
      pad = {0, 0};
    }
    const auto yr = at::convolution(in, wr, br.defined() ? c10::optional<Tensor>(br) : c10::nullopt, c.geo.stride, pad,
                                    c.geo.dilation, false, {0, 0}, c.geo.groups);
    ASSERT_EQ(y.sizes(), yr.sizes()) << c.name;
    const auto gy = torch::randn(y.sizes(), opt).contiguous(format);
    y.backward(gy);
    yr.backward(gy);
    const double tol = c.dtype == torch::kFloat64 ? 1e-10 : 2e-4;
    EXPECT_LT(max_abs_diff(y.detach(), yr.detach()), tol) << c.name;
    EXPECT_LT(max_abs_diff(w.grad(), wr.grad()) / (1.0 + wr.grad().abs().max().item<double>()), tol) << c.name;
    if (c.bias) EXPECT_LT(max_abs_diff(b.grad(), br.grad()), tol * 10) << c.name;
    if (c.input_grad) EXPECT_LT(max_abs_diff(x.grad(), xr.grad()), tol) << c.name;
  }
}

TEST(ConvNd, DepthwiseWithFrozenWeightOrNonDepthwiseUsesTorchConv) {
  const F::ConvGeometry dw{{1, 1}, {1, 1}, {1, 1}, 4, F::PaddingMode::Zeros};
  const auto x = torch::randn({1, 4, 5, 5}).requires_grad_(true);
  const auto frozen = F::conv_nd(x, torch::randn({4, 1, 3, 3}), {}, dw);
  EXPECT_EQ(frozen.grad_fn()->name().find("DepthwiseConv2d"), std::string::npos) << frozen.grad_fn()->name();
  const F::ConvGeometry grouped{{1, 1}, {1, 1}, {1, 1}, 2, F::PaddingMode::Zeros};
  const auto g = F::conv_nd(x, torch::randn({4, 2, 3, 3}).requires_grad_(true), {}, grouped);
  EXPECT_EQ(g.grad_fn()->name().find("DepthwiseConv2d"), std::string::npos) << g.grad_fn()->name();
}

TEST(LinearBranch, EqualsDenseMatmulAndLoRA) {
  auto x = torch::randn({3, 4, 7}, kF64);
  auto core = torch::randn({3, 2}, kF64);
  std::vector<Tensor> f{torch::randn({5, 3}, kF64), torch::randn({7, 2}, kF64)};
  EXPECT_LT(max_abs_diff(F::linear_branch(x, core, f, 1.3), x.matmul(einsum_delta(core, f, 1.3).t())), 1e-12);
  // LoRA: in-mode identity, core = A [r, in], U_out = B [out, r]: x A^T B^T * s.
  auto a = torch::randn({3, 7}, kF64), b = torch::randn({5, 3}, kF64);
  EXPECT_LT(max_abs_diff(F::linear_branch(x, a, {b, Tensor()}, 0.5), x.matmul(a.t()).matmul(b.t()) * 0.5), 1e-12);
}

// F::adapted_linear in float32 against the float64 composition torch::linear + linear_branch:
// output and every gradient, with the node (the branch's products on the narrow kernels, added
// in place) where adapted_linear_fuses says, and the composition itself elsewhere. Rows leave
// every register block's tail (111 and 33 rows), cover ranks 8 to 32, LoRA's identity input
// mode, an unbatched input, a trainable weight and bias, and the refusals: a rank of 40, an
// identity output mode, a transposed (non-contiguous) input.
struct AdaptedLinearCase {
  std::string name;
  std::vector<int64_t> x_shape;
  int64_t out;
  std::vector<int64_t> ranks;  ///< core [r_out, r_in]; r_in == in where U_in is absent
  bool u_in, u_out, bias, train_weight, fuses, transposed_x;
};

void PrintTo(const AdaptedLinearCase& c, std::ostream* os) { *os << c.name; }

class AdaptedLinearBattery : public ::testing::TestWithParam<AdaptedLinearCase> {};

TEST_P(AdaptedLinearBattery, EqualsTheDoubleCompositionInOutputAndEveryGradient) {
  const auto& c = GetParam();
  const int64_t in = c.x_shape.back();
  Tensor x = c.transposed_x ? torch::randn({in, 10}).t() : torch::randn(c.x_shape);
  x.requires_grad_(true);
  auto w = (torch::randn({c.out, in}) * 0.1).requires_grad_(c.train_weight);
  auto b = c.bias ? (torch::randn({c.out}) * 0.1).requires_grad_(c.train_weight) : Tensor();
  auto core = torch::randn(c.ranks).requires_grad_(true);
  std::vector<Tensor> f(2), wrt{x, core};
  if (c.u_out) wrt.push_back(f[0] = (torch::randn({c.out, c.ranks[0]}) * 0.3).requires_grad_(true));
  if (c.u_in) wrt.push_back(f[1] = (torch::randn({in, c.ranks[1]}) * 0.3).requires_grad_(true));
  if (c.train_weight) {
    wrt.push_back(w);
    if (b.defined()) wrt.push_back(b);
  }
  const bool kernels = flora::detail::avx2_fma_enabled();
  ASSERT_EQ(F::adapted_linear_fuses(x, w, core, f), c.fuses && kernels);
  auto d = [](const Tensor& t) { return t.defined() ? t.detach().to(torch::kFloat64).requires_grad_(t.requires_grad()) : t; };
  const Tensor x64 = d(x), w64 = d(w), b64 = d(b), core64 = d(core);
  const std::vector<Tensor> f64{d(f[0]), d(f[1])};
  std::vector<Tensor> wrt64{x64, core64};
  for (const auto& u : f64)
    if (u.defined()) wrt64.push_back(u);
  if (c.train_weight) {
    wrt64.push_back(w64);
    if (b64.defined()) wrt64.push_back(b64);
  }
  const Tensor ref = torch::linear(x64, w64, b64) + F::linear_branch(x64, core64, f64, 0.7);
  const Tensor probe = torch::randn_like(ref);
  const auto want = torch::autograd::grad({ref}, wrt64, {probe});
  const auto before = flora::detail::narrow_calls();
  const Tensor y = F::adapted_linear(x, w, b, core, f, 0.7);
  ASSERT_EQ(y.sizes(), ref.sizes());
  EXPECT_LT(relative_diff(y, ref), 1e-5);
  const auto got = torch::autograd::grad({y}, wrt, {probe.to(torch::kFloat32)});
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_LT(relative_diff(got[i], want[i]), 1e-5) << "gradient " << i;
  const auto after = flora::detail::narrow_calls();
  const bool node = c.fuses && kernels;
  EXPECT_EQ(after.mm > before.mm, node) << "x A^T and gy U_out";
  EXPECT_EQ(after.tmm > before.tmm, node) << "U_out's and A's gradients";
  EXPECT_EQ(after.add > before.add, node) << "the branch added into the output and the input gradient";
}

INSTANTIATE_TEST_SUITE_P(
    Rows, AdaptedLinearBattery,
    ::testing::Values(
        //                name                           x            out  ranks     u_in   u_out  bias   train  fuses  x^T
        AdaptedLinearCase{"flora_3d_tails_bias", {3, 37, 48}, 40, {16, 8}, true, true, true, false, true, false},
        AdaptedLinearCase{"flora_2d_ranks_24_32_no_bias", {70, 64}, 56, {24, 32}, true, true, false, false, true, false},
        AdaptedLinearCase{"lora_identity_input_rank_8", {5, 9, 48}, 40, {8, 48}, false, true, true, false, true, false},
        AdaptedLinearCase{"unbatched_rank_32", {48}, 24, {32, 16}, true, true, true, false, true, false},
        AdaptedLinearCase{"trainable_weight_and_bias", {33, 20}, 12, {8, 8}, true, true, true, true, true, false},
        AdaptedLinearCase{"rank_40_composition", {6, 48}, 50, {40, 8}, true, true, true, false, false, false},
        AdaptedLinearCase{"identity_output_composition", {6, 48}, 16, {16, 8}, true, false, true, false, false, false},
        AdaptedLinearCase{"transposed_x_composition", {10, 48}, 40, {16, 8}, true, true, true, false, false, true}),
    [](const ::testing::TestParamInfo<AdaptedLinearCase>& info) { return info.param.name; });

TEST(AdaptedLinear, ItsOutputTakesInPlaceOps) {
  // A residual add or an in-place ReLU right after the layer, as models do: allowed, and the
  // gradients are the composition's (float64 reference).
  auto x = torch::randn({2, 9, 32}).requires_grad_(true);
  const auto w = torch::randn({24, 32}) * 0.1, b = torch::randn({24});
  auto core = torch::randn({16, 8}).requires_grad_(true);
  std::vector<Tensor> f{(torch::randn({24, 16}) * 0.3).requires_grad_(true), (torch::randn({32, 8}) * 0.3).requires_grad_(true)};
  const Tensor skip = torch::randn({2, 9, 24});
  Tensor y = F::adapted_linear(x, w, b, core, f, 0.7);
  y.add_(skip).relu_();
  auto d = [](const Tensor& t) { return t.detach().to(torch::kFloat64).requires_grad_(t.requires_grad()); };
  const Tensor x64 = d(x), core64 = d(core);
  const std::vector<Tensor> f64{d(f[0]), d(f[1])};
  const Tensor ref = torch::relu(torch::linear(x64, w.to(torch::kFloat64), b.to(torch::kFloat64)) +
                                 F::linear_branch(x64, core64, f64, 0.7) + skip.to(torch::kFloat64));
  EXPECT_LT(relative_diff(y, ref), 1e-5);
  const Tensor probe = torch::randn_like(ref);
  const auto want = torch::autograd::grad({ref}, {x64, core64, f64[0], f64[1]}, {probe});
  const auto got = torch::autograd::grad({y}, {x, core, f[0], f[1]}, {probe.to(torch::kFloat32)});
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_LT(relative_diff(got[i], want[i]), 1e-5) << "gradient " << i;
}

TEST(AdaptedLinear, DoubleBackwardEqualsTheComposition) {
  // A gradient penalty through the node: create_graph makes its backward run differentiable ATen
  // ops, so the second derivatives are the composition's (float64 reference).
  auto x = torch::randn({4, 11, 32}).requires_grad_(true);
  const auto w = torch::randn({24, 32}) * 0.1, b = torch::randn({24});
  auto core = torch::randn({16, 8}).requires_grad_(true);
  std::vector<Tensor> f{(torch::randn({24, 16}) * 0.3).requires_grad_(true), (torch::randn({32, 8}) * 0.3).requires_grad_(true)};
  ASSERT_EQ(F::adapted_linear_fuses(x, w, core, f), flora::detail::avx2_fma_enabled());
  // The penalty takes every first-order gradient (x's and the three adapter tensors'), so each
  // of the node's create_graph products is differentiated.
  auto penalty_grads = [](const Tensor& y, const std::vector<Tensor>& params) {
    const Tensor probe = torch::linspace(-1.0, 1.0, y.numel(), y.options()).view(y.sizes());
    Tensor penalty = y.pow(2).sum();
    for (const auto& g : torch::autograd::grad({(y * probe).sum()}, params, {}, true, true)) penalty = penalty + g.pow(2).sum();
    return torch::autograd::grad({penalty}, params);
  };
  const auto got = penalty_grads(F::adapted_linear(x, w, b, core, f, 0.7), {x, core, f[0], f[1]});
  auto d = [](const Tensor& t) { return t.detach().to(torch::kFloat64).requires_grad_(t.requires_grad()); };
  const Tensor x64 = d(x), core64 = d(core);
  const std::vector<Tensor> f64{d(f[0]), d(f[1])};
  const Tensor ref = torch::linear(x64, w.to(torch::kFloat64), b.to(torch::kFloat64)) + F::linear_branch(x64, core64, f64, 0.7);
  const auto want = penalty_grads(ref, {x64, core64, f64[0], f64[1]});
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_LT(relative_diff(got[i], want[i]), 1e-5) << "gradient " << i;
}

TEST(AdaptedLinear, OnARecomputableInputKeepsTheSourcesNotTheInput) {
  // The node given GELU(h): equal to the float64 composition in output and every gradient, x not
  // kept alive by the graph, and double backward refused with the RecomputableInput hint.
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  auto h = torch::randn({3, 13, 48}).requires_grad_(true);
  const auto w = torch::randn({40, 48}) * 0.1, b = torch::randn({40});
  auto core = torch::randn({16, 8}).requires_grad_(true);
  std::vector<Tensor> f{(torch::randn({40, 16}) * 0.3).requires_grad_(true), (torch::randn({48, 8}) * 0.3).requires_grad_(true)};
  Tensor y;
  Weak x = [&] {
    const auto in = F::RecomputableInput::gelu(h);
    EXPECT_EQ(F::adapted_linear_fuses(in.value(), w, core, f), flora::detail::avx2_fma_enabled());
    y = F::adapted_linear(in, w, b, core, f, 0.7);
    return Weak(in.value().getIntrusivePtr());
  }();
  EXPECT_TRUE(x.expired()) << "the graph keeps x";
  auto d = [](const Tensor& t) { return t.detach().to(torch::kFloat64).requires_grad_(t.requires_grad()); };
  const Tensor h64 = d(h), core64 = d(core);
  const std::vector<Tensor> f64{d(f[0]), d(f[1])};
  const Tensor ref = torch::linear(torch::gelu(h64), w.to(torch::kFloat64), b.to(torch::kFloat64)) +
                     F::linear_branch(torch::gelu(h64), core64, f64, 0.7);
  EXPECT_LT(relative_diff(y, ref), 1e-5);
  const Tensor probe = torch::randn_like(ref);
  const auto want = torch::autograd::grad({ref}, {h64, core64, f64[0], f64[1]}, {probe});
  const auto got = torch::autograd::grad({y}, {h, core, f[0], f[1]}, {probe.to(torch::kFloat32)}, true);
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_LT(relative_diff(got[i], want[i]), 1e-5) << "gradient " << i;
  if (flora::detail::avx2_fma_enabled()) {
    const std::string m = flora_test::error_message([&] {
      torch::autograd::grad({y}, {core}, {probe.to(torch::kFloat32)}, true, true);
    });
    EXPECT_NE(m.find("adapted_linear: double backward (create_graph) through a RecomputableInput"), std::string::npos) << m;
  }
}

// One row per way of computing a Linear's input: the sources (double, requiring gradients), the
// recipe, and x computed directly with torch's ops as the reference.
struct RecomputeCase {
  std::string name;
  std::function<std::vector<Tensor>()> sources;
  std::function<F::RecomputableInput(const std::vector<Tensor>&)> make;
  std::function<Tensor(const std::vector<Tensor>&)> direct;
};

std::vector<RecomputeCase> recompute_cases() {
  auto grad = [](Tensor t) { return t.requires_grad_(true); };
  return {
      {"gelu", [=] { return std::vector<Tensor>{grad(torch::randn({2, 3, 6}, kF64))}; },
       [](const std::vector<Tensor>& s) { return F::RecomputableInput::gelu(s[0]); },
       [](const std::vector<Tensor>& s) { return 0.5 * s[0] * (1 + torch::erf(s[0] / std::sqrt(2.0))); }},
      {"gelu_unbatched", [=] { return std::vector<Tensor>{grad(torch::randn({6}, kF64))}; },
       [](const std::vector<Tensor>& s) { return F::RecomputableInput::gelu(s[0]); },
       [](const std::vector<Tensor>& s) { return 0.5 * s[0] * (1 + torch::erf(s[0] / std::sqrt(2.0))); }},
      {"gelu_tanh", [=] { return std::vector<Tensor>{grad(torch::randn({5, 6}, kF64))}; },
       [](const std::vector<Tensor>& s) { return F::RecomputableInput::gelu(s[0], "tanh"); },
       [](const std::vector<Tensor>& s) {
         return 0.5 * s[0] * (1 + torch::tanh(std::sqrt(2.0 / M_PI) * (s[0] + 0.044715 * s[0].pow(3))));
       }},
      {"layer_norm_affine",
       [=] {
         return std::vector<Tensor>{grad(torch::randn({2, 3, 6}, kF64)), grad(torch::randn({6}, kF64)),
                                    grad(torch::randn({6}, kF64))};
       },
       [](const std::vector<Tensor>& s) { return F::RecomputableInput::layer_norm(s[0], {6}, s[1], s[2], 1e-5); },
       [](const std::vector<Tensor>& s) {
         auto mean = s[0].mean(-1, true), var = s[0].var(-1, false, true);
         return (s[0] - mean) / torch::sqrt(var + 1e-5) * s[1] + s[2];
       }},
      {"layer_norm_plain_channels_last_view",  // ConvNeXt's: a permuted NCHW tensor, no affine
       [=] { return std::vector<Tensor>{grad(torch::randn({2, 6, 3, 2}, kF64))}; },
       [](const std::vector<Tensor>& s) {
         return F::RecomputableInput::layer_norm(s[0].permute({0, 2, 3, 1}), {6}, Tensor(), Tensor(), 1e-6);
       },
       [](const std::vector<Tensor>& s) {
         auto t = s[0].permute({0, 2, 3, 1});
         return (t - t.mean(-1, true)) / torch::sqrt(t.var(-1, false, true) + 1e-6);
       }},
      {"attention_heads",  // attn [N, H, L, S] from a softmax, v a strided view as in the ViT
       [=] { return std::vector<Tensor>{grad(torch::randn({2, 2, 4, 5}, kF64)), grad(torch::randn({2, 5, 2, 3}, kF64))}; },
       [](const std::vector<Tensor>& s) {
         return F::RecomputableInput::attention_heads(torch::softmax(s[0], -1), s[1].transpose(1, 2));
       },
       [](const std::vector<Tensor>& s) {
         return torch::einsum("nhls,nshd->nlhd", {torch::softmax(s[0], -1), s[1]}).reshape({2, 4, 6});
       }},
  };
}

// FLoRA (U_out, G, U_in) and LoRA (identity in-mode: the core is A) on x [..., 6] -> [..., 5].
std::vector<std::pair<Tensor, std::vector<Tensor>>> recompute_adapters() {
  auto g = [](Tensor t) { return t.requires_grad_(true); };
  return {{g(torch::randn({3, 2}, kF64)), {g(torch::randn({5, 3}, kF64)), g(torch::randn({6, 2}, kF64))}},
          {g(torch::randn({3, 6}, kF64)), {g(torch::randn({5, 3}, kF64)), Tensor()}}};
}

TEST(RecomputableInput, ValueEqualsTheDirectFormula) {
  for (const auto& c : recompute_cases()) {
    auto s = c.sources();
    EXPECT_LT(max_abs_diff(c.make(s).value(), c.direct(s)), 1e-12) << c.name;
  }
}

TEST(RecomputableInput, BranchEqualsThePlainBranchInOutputAndEveryGradient) {
  for (const auto& c : recompute_cases())
    for (auto [core, f] : recompute_adapters()) {
      auto s = c.sources();
      std::vector<Tensor> params = s;
      params.push_back(core);
      for (auto& u : f)
        if (u.defined()) params.push_back(u);
      auto run = [&](bool recompute) {
        for (auto& p : params) p.mutable_grad() = Tensor();
        auto in = c.make(s);
        auto y = recompute ? F::linear_branch(in, core, f, 0.7) : F::linear_branch(in.value(), core, f, 0.7);
        // A weight per output entry, so no gradient is a plain sum; x^2 so x's gradient matters.
        (y.pow(2) * torch::linspace(0.5, 1.5, y.numel(), kF64).view(y.sizes())).sum().backward();
        std::vector<Tensor> grads{y.detach()};
        for (auto& p : params) grads.push_back(p.grad().clone());
        return grads;
      };
      auto a = run(true), b = run(false);
      for (size_t i = 0; i < a.size(); ++i)
        EXPECT_LT(max_abs_diff(a[i], b[i]), 1e-12) << c.name << (i ? " gradient " + std::to_string(i - 1) : " output");
    }
}

TEST(RecomputableInput, GradientsMatchFiniteDifferences) {
  for (const auto& c : recompute_cases()) {
    auto s = c.sources();
    auto [core, f] = recompute_adapters()[0];
    std::vector<Tensor> params = s;
    params.insert(params.end(), {core, f[0], f[1]});
    auto loss = [&] { return F::linear_branch(c.make(s), core, f, 0.7).pow(2).sum(); };
    EXPECT_LT(flora_test::finite_difference_error(loss, params), 1e-6) << c.name;
  }
}

TEST(RecomputableInput, DoesNotKeepTheInputAliveWhereThePlainBranchDoes) {
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  for (const auto& c : recompute_cases())
    for (bool recompute : {true, false}) {
      auto s = c.sources();
      auto [core, f] = recompute_adapters()[0];
      Tensor y;
      Weak x = [&] {
        auto in = c.make(s);
        y = recompute ? F::linear_branch(in, core, f, 0.7) : F::linear_branch(in.value(), core, f, 0.7);
        return Weak(in.value().getIntrusivePtr());
      }();
      // The graph behind y is alive; x is kept only if some node saved it.
      EXPECT_EQ(x.expired(), recompute) << c.name << (recompute ? " recomputed" : " plain");
      y.sum().backward();  // and backward still works with x gone
      EXPECT_TRUE(f[1].grad().defined()) << c.name;
    }
}

TEST(RecomputableInput, UnderBf16AutocastMatchesThePlainBranchAndLeavesAutocastAsItWas) {
  struct AutocastOff {  // however the test ends
    ~AutocastOff() {
      at::autocast::clear_cache();
      at::autocast::set_cpu_enabled(false);
    }
  };
  for (const auto& c : recompute_cases()) {
    std::vector<Tensor> s;
    for (auto& t : c.sources()) s.push_back(t.detach().to(torch::kFloat32).requires_grad_(true));
    auto core = torch::randn({3, 2}).requires_grad_(true);
    std::vector<Tensor> f{torch::randn({5, 3}).requires_grad_(true), torch::randn({6, 2}).requires_grad_(true)};
    std::vector<Tensor> params{core, f[0], f[1]};
    params.insert(params.end(), s.begin(), s.end());
    auto run = [&](bool recompute) {
      for (auto& p : params) p.mutable_grad() = Tensor();
      Tensor y;
      {
        AutocastOff off;
        at::autocast::set_cpu_enabled(true);
        at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
        auto in = c.make(s);
        y = recompute ? F::linear_branch(in, core, f, 0.7) : F::linear_branch(in.value(), core, f, 0.7);
      }
      y.to(torch::kFloat32).pow(2).sum().backward();
      // backward put forward's autocast state in place for the recomputation, and took it away
      EXPECT_FALSE(at::autocast::is_cpu_enabled()) << c.name;
      EXPECT_TRUE(at::autocast::is_autocast_cache_enabled()) << c.name;
      std::vector<Tensor> out{y.detach()};
      for (auto& p : params) out.push_back(p.grad().clone());
      return out;
    };
    auto a = run(true), b = run(false);
    EXPECT_EQ(a[0].scalar_type(), b[0].scalar_type()) << c.name;
    for (size_t i = 0; i < a.size(); ++i) {
      const double scale = std::max(1.0, b[i].to(torch::kFloat64).abs().max().item<double>());
      EXPECT_LT(max_abs_diff(a[i], b[i]) / scale, 2e-2) << c.name << " tensor " << i;
    }
  }
}

TEST(RecomputableInput, RefusesDoubleBackwardWithAClearError) {
  auto h = torch::randn({3, 6}, kF64).requires_grad_(true);
  auto [core, f] = recompute_adapters()[0];
  auto y = F::linear_branch(F::RecomputableInput::gelu(h), core, f, 1.0);
  const auto m = flora_test::error_message(
      [&] { torch::autograd::grad({y.pow(2).sum()}, {f[1]}, {}, /*retain_graph=*/true, /*create_graph=*/true); });
  EXPECT_NE(m.find("double backward (create_graph) through a RecomputableInput"), std::string::npos) << m;
}

TEST(RecomputableInput, RejectsBadRecipes) {
  EXPECT_NE(flora_test::error_message([] { F::RecomputableInput::gelu(torch::randn({2}), "fast"); })
                .find("approximate 'fast', expected 'none' or 'tanh'"),
            std::string::npos);
  EXPECT_NE(flora_test::error_message([] {
              F::RecomputableInput::attention_heads(torch::randn({1, 2, 3, 4}), torch::randn({1, 2, 5, 8}));
            }).find("attn [1, 2, 3, 4] and v [1, 2, 5, 8], expected [N, H, L, S] and [N, H, S, hd]"),
            std::string::npos);
}

TEST(EmbeddingBranch, EqualsRowsOfDenseDelta) {
  auto idx = torch::tensor({{0, 4, 2}, {4, 1, 0}}, torch::kLong);
  auto core = torch::randn({3, 2}, kF64);
  std::vector<Tensor> f{torch::randn({5, 3}, kF64), torch::randn({6, 2}, kF64)};
  auto dense = einsum_delta(core, f, 0.9);
  EXPECT_LT(max_abs_diff(F::embedding_branch(idx, core, f, 0.9, c10::nullopt), torch::embedding(dense, idx)), 1e-12);
  // Identity num mode: the core itself holds one row per embedding.
  auto core_rows = torch::randn({5, 2}, kF64);
  EXPECT_LT(max_abs_diff(F::embedding_branch(idx, core_rows, {Tensor(), f[1]}, 1.0, 1),
                         torch::embedding(core_rows.matmul(f[1].t()), idx)), 1e-12);
}

TEST(Superdiagonal, PlacesValuesOnTheDiagonal) {
  auto v = torch::tensor({1.0, 2.0, 3.0}, kF64);
  auto t = F::superdiagonal(v, 3);
  EXPECT_EQ(t.sum().item<double>(), 6.0);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(t[i][i][i].item<double>(), v[i].item<double>());
  EXPECT_LT(max_abs_diff(F::superdiagonal(v, 2), torch::diag(v)), 0.0 + 1e-15);
}

}  // namespace

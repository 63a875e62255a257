// Shape algebra without tensors: the seed's worked parameter counts, validation messages,
// rank defaults and clipping, the contraction planner against brute force, the cost model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "flora/spec.h"

namespace {

using flora::AdapterOptions;
using flora::LayerKind;
using flora::TargetInfo;

TargetInfo conv(std::vector<int64_t> shape, int64_t groups = 1) { return {"conv", LayerKind::Conv, shape, groups}; }
TargetInfo linear(int64_t out, int64_t in) { return {"fc", LayerKind::Linear, {out, in}, 1}; }

int64_t count(const AdapterOptions& o, const TargetInfo& t) { return flora::parameter_count(flora::resolve_spec(o, t)); }

TEST(ParameterCount, SeedWorkedExamples) {
  // FLORA.md: 3x3 conv 256 -> 512, ranks [32, 32, 2, 2]: 4,096 + 16,384 + 8,192 + 12.
  EXPECT_EQ(count(AdapterOptions().ranks({32, 32, 2, 2}), conv({512, 256, 3, 3})), 28684);
  // PEFT conv LoRA r(out + in k^2).
  EXPECT_EQ(count(AdapterOptions().method(flora::Method::Lora).rank(32), conv({512, 256, 3, 3})), 90112);
  EXPECT_EQ(flora::lora_parameter_count({512, 256, 3, 3}, 32), 90112);
  // "FLoRA at r = 70 matches LoRA's [out k, in k] reshape count": 73,372 vs 73,728.
  EXPECT_EQ(count(AdapterOptions().ranks({70, 70, 2, 2}), conv({512, 256, 3, 3})), 73372);
  // Linear 512 x 256 at r = 32: LoRA 24,576, FLoRA 25,600, +4.17 % = r / (in + out).
  const int64_t lora = count(AdapterOptions().method(flora::Method::Lora).rank(32), linear(512, 256));
  const int64_t fl = count(AdapterOptions().ranks({32, 32}), linear(512, 256));
  EXPECT_EQ(lora, 24576);
  EXPECT_EQ(fl, 25600);
  EXPECT_NEAR(100.0 * (fl - lora) / lora, 100.0 * 32 / (512 + 256), 1e-9);
}

TEST(ParameterCount, SpecialCores) {
  EXPECT_EQ(count(AdapterOptions().ranks({8, 8, 8, 8}).core(flora::CoreKind::Diagonal), conv({64, 32, 8, 8})),
            8 + 8 * (64 + 32 + 8 + 8));
  EXPECT_EQ(count(AdapterOptions().ranks({8, 8}).core(flora::CoreKind::Identity), linear(64, 32)), 8 * (64 + 32));
  // Tucker-2: spatial identity, core [r, r, k, k].
  EXPECT_EQ(count(AdapterOptions().ranks({16, 16, 0, 0}).identity_modes({false, false, true, true}), conv({64, 32, 3, 3})),
            16 * 16 * 9 + 16 * 64 + 16 * 32);
}

TEST(Resolve, DefaultRanksUseRankForChannelsAndSpatialRankForKernels) {
  auto s = flora::resolve_spec(AdapterOptions().rank(16), conv({64, 32, 3, 3}));
  EXPECT_EQ(s.ranks, (std::vector<int64_t>{16, 16, 2, 2}));
  EXPECT_TRUE(s.notes.empty());
  // Depthwise: in/groups = 1, so the default channel rank is clipped there, with a note.
  s = flora::resolve_spec(AdapterOptions().rank(16), conv({96, 1, 7, 7}, 96));
  EXPECT_EQ(s.ranks, (std::vector<int64_t>{16, 1, 2, 2}));
  ASSERT_EQ(s.notes.size(), 1u);
  EXPECT_NE(s.notes[0].find("16->1"), std::string::npos) << s.notes[0];
}

TEST(Resolve, ExplicitRanksClipOnlyWhenAsked) {
  EXPECT_THROW(flora::resolve_spec(AdapterOptions().ranks({16, 16, 2, 2}), conv({96, 1, 7, 7}, 96)), flora::InvalidArgument);
  auto s = flora::resolve_spec(AdapterOptions().ranks({16, 16, 2, 2}).clip_ranks(true), conv({96, 1, 7, 7}, 96));
  EXPECT_EQ(s.ranks, (std::vector<int64_t>{16, 1, 2, 2}));
  EXPECT_FALSE(s.notes.empty());
}

TEST(Resolve, DefaultInitAndScale) {
  auto s = flora::resolve_spec(AdapterOptions().ranks({4, 4}).scale(4.0), linear(8, 8));
  EXPECT_EQ(s.init, flora::Init::Authors);
  EXPECT_EQ(s.scale, 4.0);
  s = flora::resolve_spec(AdapterOptions().method(flora::Method::Lora).rank(4).alpha(16), linear(8, 8));
  EXPECT_EQ(s.init, flora::Init::LoraStyle);
  EXPECT_EQ(s.scale, 4.0);
  EXPECT_EQ(s.ranks, (std::vector<int64_t>{4, 8}));
  EXPECT_EQ(s.identity, (std::vector<bool>{false, true}));
}

struct BadCase {
  std::string name;
  AdapterOptions options;
  TargetInfo target;
  std::vector<std::string> must_mention;
};

TEST(Resolve, BadInputNamesLayerValueAndExpectation) {
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<BadCase> cases = {
      {"rank zero", AdapterOptions().ranks({0, 4}), linear(8, 8), {"'fc'", "rank 0", ">= 1"}},
      {"rank too big", AdapterOptions().ranks({4, 9}), linear(8, 8), {"rank 9", "mode 1 (in)", "size 8"}},
      {"rank count", AdapterOptions().ranks({4, 4, 2}), conv({8, 8, 3, 3}), {"3 ranks", "expected 4"}},
      {"groups", AdapterOptions(), conv({10, 2, 3, 3}, 4), {"groups 4", "out_channels 10"}},
      {"scale", AdapterOptions().scale(inf), linear(8, 8), {"not finite"}},
      {"scale nan", AdapterOptions().scale(std::nan("")), linear(8, 8), {"not finite"}},
      {"lora alpha", AdapterOptions().method(flora::Method::Lora).alpha(inf), linear(8, 8), {"not finite"}},
      {"lora rank", AdapterOptions().method(flora::Method::Lora).rank(0), linear(8, 8), {"LoRA rank 0"}},
      {"lora too big", AdapterOptions().method(flora::Method::Lora).rank(9), linear(8, 4), {"LoRA rank 9", "4"}},
      {"lora ranks", AdapterOptions().method(flora::Method::Lora).ranks({2, 2}), linear(8, 8), {"per-mode ranks"}},
      {"diag unequal", AdapterOptions().ranks({2, 3}).core(flora::CoreKind::Diagonal), linear(8, 8), {"equal ranks", "[2, 3]"}},
      {"identity size", AdapterOptions().identity_modes({true}), linear(8, 8), {"identity_modes has 1"}},
      {"dropout", AdapterOptions().dropout(1.0), linear(8, 8), {"dropout"}},
      {"empty mode", AdapterOptions(), linear(0, 8), {"size 0"}},
      {"conv order", AdapterOptions(), conv({8, 8}), {"order 2"}},
  };
  for (const auto& c : cases) {
    try {
      flora::resolve_spec(c.options, c.target);
      ADD_FAILURE() << c.name << ": no error";
    } catch (const flora::InvalidArgument& e) {
      const std::string m = e.what();
      for (const auto& word : c.must_mention) EXPECT_NE(m.find(word), std::string::npos) << c.name << ": " << m;
    }
  }
}

TEST(ContractionPlan, MatchesBruteForceOverAllOrders) {
  struct Case {
    std::vector<int64_t> shape, ranks;
  };
  const std::vector<Case> cases = {{{512, 256, 3, 3}, {32, 32, 2, 2}},
                                   {{64, 1, 7, 7}, {16, 1, 2, 2}},
                                   {{4096, 1024}, {8, 64}},
                                   {{10, 20, 30, 40, 5}, {2, 9, 3, 20, 5}}};
  for (const auto& c : cases) {
    std::vector<bool> identity(c.shape.size(), false);
    auto plan = flora::plan_contraction(c.shape, c.ranks, identity);
    std::vector<int64_t> order(c.shape.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
    double best = std::numeric_limits<double>::infinity();
    do {
      std::vector<double> cur(c.ranks.begin(), c.ranks.end());
      double cost = 0;
      for (int64_t n : order) {  // the documented step cost: written * (r_n + 16 (+4 middle))
        const double r = cur[n];
        cur[n] = static_cast<double>(c.shape[n]);
        double written = 1;
        for (double d : cur) written *= d;
        const bool middle = n != 0 && n != static_cast<int64_t>(c.shape.size()) - 1;
        cost += written * (r + 16.0 + (middle ? 4.0 : 0.0));
      }
      best = std::min(best, cost);
    } while (std::next_permutation(order.begin(), order.end()));
    EXPECT_DOUBLE_EQ(plan.macs, best) << flora::format_shape(c.shape);
    EXPECT_EQ(plan.order.size(), c.shape.size());
  }
}

TEST(Formatting, CountsAndShapes) {
  EXPECT_EQ(flora::format_count(0), "0");
  EXPECT_EQ(flora::format_count(999), "999");
  EXPECT_EQ(flora::format_count(28684), "28,684");
  EXPECT_EQ(flora::format_count(3089625088), "3,089,625,088");
  EXPECT_EQ(flora::format_shape({512, 256, 3, 3}), "[512, 256, 3, 3]");
}

TEST(Parse, NamesRoundTripAndUnknownNamesFail) {
  for (auto m : {flora::Method::Flora, flora::Method::Lora}) EXPECT_EQ(flora::parse_method(flora::to_string(m)), m);
  for (auto p : {flora::ConvPath::Auto, flora::ConvPath::Merged, flora::ConvPath::Factorized})
    EXPECT_EQ(flora::parse_conv_path(flora::to_string(p)), p);
  EXPECT_THROW(flora::parse_method("dora"), flora::InvalidArgument);
  EXPECT_EQ(flora::parse_core_kind("cp"), flora::CoreKind::Diagonal);
}

}  // namespace

namespace {

TEST(Resolve, EmbeddingDropoutIsNotAppliedAndSaysSo) {
  auto s = flora::resolve_spec(AdapterOptions().ranks({2, 2}).dropout(0.1), {"emb", LayerKind::Embedding, {10, 4}, 1});
  EXPECT_EQ(s.dropout, 0.0);
  ASSERT_EQ(s.notes.size(), 1u);
  EXPECT_NE(s.notes[0].find("dropout not applied"), std::string::npos) << s.notes[0];
}

}  // namespace

// Trainer pieces as pure functions, each against an independent reference: AdamW against
// LibTorch's torch::optim::AdamW, the schedules against their closed forms, the data order and
// augmentation as functions of (seed, epoch, index), the config parser's errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include "flora/data.h"
#include "flora/io/safetensors.h"
#include "flora/model.h"
#include "flora/procedural.h"
#include "flora/runtime.h"
#include "flora/spec.h"
#include "flora/train.h"
#include "helpers.h"

using flora_test::max_abs_diff;

namespace {
long minor_page_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}
// Minor page faults of three training-step-like rounds (two 48 MB activations allocated and
// written, their sum, all freed), after one warm-up round. 48 MB is above glibc's largest adaptive
// mmap threshold (32 MB), so without the cache each round maps fresh pages and faults on each.
long faults_of_three_rounds() {
  auto round = [] {
    auto a = torch::empty({12 << 20}).fill_(1.0f), b = torch::empty({12 << 20}).fill_(2.0f);
    return (a + b).sum().item<float>();
  };
  round();
  const long before = minor_page_faults();
  for (int i = 0; i < 3; ++i) round();
  return minor_page_faults() - before;
}
}  // namespace

// The CPU block cache, against the page faults it exists to remove and its own counters. Once
// installed it stays LibTorch's CPU allocator for the rest of this process: every later test
// runs on it.
TEST(Runtime, ThreadCountReachesOpenBlasPool) {
  // OpenBLAS (Debian's libopenblas0-pthread, which .ci installs) sizes its own pool to the
  // cores; configure_threads must set it too, or --threads 1 still runs GEMMs on two threads.
  const int before = at::get_num_threads();
  if (flora::blas_threads() < 0) GTEST_SKIP() << "the BLAS in use is not OpenBLAS";
  if (flora::blas_threading() == "sequential") GTEST_SKIP() << "OpenBLAS's serial build has no pool to size";
  for (int n : {1, 2, 1}) {
    EXPECT_EQ(flora::configure_threads(n), n);
    EXPECT_EQ(at::get_num_threads(), n);
    EXPECT_EQ(flora::blas_threads(), n);
  }
  flora::configure_threads(before);
}

TEST(Runtime, CpuBlockCacheReusesFreedBlocksAndTrimsToItsLimit) {
  setenv("FLORA_CPU_CACHE_MB", "x", 1);
  EXPECT_THROW(flora::configure_allocator(), flora::InvalidArgument);
  unsetenv("FLORA_CPU_CACHE_MB");
  const long pages = 3 * 3 * (48 << 20) / 4096;  // 3 rounds of a, b and a + b
  const bool was_installed = flora::cpu_cache_stats().limit_bytes > 0;
  if (!was_installed) {
    EXPECT_FALSE(flora::configure_allocator(0)) << "a limit of 0 does not install it";
    // (With transparent huge pages always on, a 48 MB block faults a few dozen times, not per page.)
    std::ifstream thp("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string modes((std::istreambuf_iterator<char>(thp)), std::istreambuf_iterator<char>());
    if (modes.find("[always]") == std::string::npos)
      EXPECT_GT(faults_of_three_rounds(), pages / 2) << "the premise: without the cache, every round faults";
  }
  ASSERT_TRUE(flora::configure_allocator(1024));
  EXPECT_LT(faults_of_three_rounds(), pages / 20) << "freed blocks should be reused without faulting again";

  // A block is handed out again for the same rounded size; a small tensor never enters the cache.
  const auto s0 = flora::cpu_cache_stats();
  { auto t = torch::ones({3 << 18}); EXPECT_EQ(t.sum().item<float>(), float(3 << 18)); }  // 3 MiB
  const auto s1 = flora::cpu_cache_stats();
  { auto t = torch::zeros({(3 << 18) - 100}); EXPECT_EQ(t.sum().item<float>(), 0.0f); }  // the same 3 MiB block, zeroed
  const auto s2 = flora::cpu_cache_stats();
  EXPECT_EQ(s2.hits, s1.hits + 1);
  EXPECT_EQ(s2.misses, s1.misses);
  EXPECT_EQ(s2.cached_bytes, s1.cached_bytes);
  EXPECT_EQ(s1.live_bytes, s0.live_bytes);
  { auto t = torch::ones({1000}); }
  EXPECT_EQ(flora::cpu_cache_stats().hits, s2.hits);
  // From 128 KiB on, rounded to 64 KiB below 1 MiB: 196 KB (3 granules) reuses the 256 KiB block
  // of 200 KB (4 granules; best fit up to twice the size), and 120 KB stays out of the cache.
  { auto t = torch::ones({50000}); }
  const auto mid = flora::cpu_cache_stats();
  { auto t = torch::ones({49000}); EXPECT_EQ(t.sum().item<float>(), 49000.0f); }
  EXPECT_EQ(flora::cpu_cache_stats().hits, mid.hits + 1);
  { auto t = torch::ones({30000}); }
  EXPECT_EQ(flora::cpu_cache_stats().hits, mid.hits + 1);
  EXPECT_EQ(flora::cpu_cache_stats().misses, mid.misses);

  // Shapes that never come back are unmapped once the cache is over its limit.
  ASSERT_TRUE(flora::configure_allocator(8));
  EXPECT_LE(flora::cpu_cache_stats().cached_bytes, std::size_t(8) << 20);
  for (int mb = 2; mb < 12; ++mb) {
    auto t = torch::empty({mb << 18});
    t.fill_(1.0f);
  }
  const auto s3 = flora::cpu_cache_stats();
  EXPECT_LE(s3.cached_bytes, std::size_t(8) << 20) << "never more than the limit";
  EXPECT_GT(s3.released, s2.released);
  ASSERT_TRUE(flora::configure_allocator(1024));
}

TEST(Train, AdamwMatchesLibTorch) {
  torch::manual_seed(0);
  auto ref = torch::randn({5, 3}, torch::kFloat64).requires_grad_(true);
  auto mine = ref.detach().clone();
  auto m = torch::zeros_like(mine), v = torch::zeros_like(mine);
  torch::optim::AdamW opt({ref}, torch::optim::AdamWOptions(0.01).weight_decay(0.1).betas({0.9, 0.999}).eps(1e-8));
  for (int step = 1; step <= 7; ++step) {
    auto g = torch::randn({5, 3}, torch::kFloat64);
    ref.mutable_grad() = g.clone();
    opt.step();
    flora::train::adamw_step(mine, g, m, v, step, 0.01, 0.9, 0.999, 1e-8, 0.1);
  }
  EXPECT_LT(max_abs_diff(ref.detach(), mine), 1e-12);
}

TEST(Train, FlatAdamwEqualsPerTensorStepsAndUpdatesTheModulesOwnParameters) {
  torch::manual_seed(0);
  torch::nn::Linear lin(4, 3);
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(2, 5, 3));
  std::vector<torch::Tensor> params{lin->weight, lin->bias, conv->weight, conv->bias};
  std::vector<torch::Tensor> ref, m, v;
  for (auto& p : params) ref.push_back(p.detach().clone()), m.push_back(torch::zeros_like(p)), v.push_back(torch::zeros_like(p));
  flora::train::FlatAdamW adam(params);
  // LibTorch's own AdamW on copies: an independent reference for the arithmetic.
  std::vector<torch::Tensor> torch_ref;
  for (auto& p : params) torch_ref.push_back(p.detach().clone().requires_grad_(true));
  torch::optim::AdamW opt(torch_ref, torch::optim::AdamWOptions(0.01).weight_decay(0.1).betas({0.9, 0.999}).eps(1e-8));
  for (int step = 1; step <= 6; ++step) {
    std::vector<torch::Tensor> grads;
    for (auto& p : params) grads.push_back(torch::randn(p.sizes()));
    grads[2] = torch::randn({3, 3, 2, 5}).permute({3, 2, 0, 1});  // a non-contiguous gradient
    if (step == 4) {  // data replaced, not copied into: found and bound again, keeping the new value
      torch::NoGradGuard g;
      lin->weight.set_data(torch::full({3, 4}, 0.5));
      ref[0] = torch::full({3, 4}, 0.5);
      torch_ref[0].detach().fill_(0.5);
    }
    adam.step(grads, step, 0.01, 0.9, 0.999, 1e-8, 0.1);
    for (size_t i = 0; i < params.size(); ++i) {
      flora::train::adamw_step(ref[i], grads[i], m[i], v[i], step, 0.01, 0.9, 0.999, 1e-8, 0.1);
      torch_ref[i].mutable_grad() = grads[i].contiguous();
    }
    opt.step();
  }
  const torch::Tensor now[] = {lin->weight, lin->bias, conv->weight, conv->bias};  // read through the modules
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::equal(now[i].detach(), ref[i])) << "tensor " << i << " differs from per-tensor steps by "
                                                       << max_abs_diff(now[i].detach(), ref[i]);
    EXPECT_LT(max_abs_diff(now[i].detach(), torch_ref[i].detach()), 1e-6) << "tensor " << i;
    EXPECT_TRUE(torch::equal(adam.exp_avg(i), m[i])) << i;
    EXPECT_TRUE(torch::equal(adam.exp_avg_sq(i), v[i])) << i;
  }
  // Several buckets (about 256K elements each): 200k | 150k + 10, the last two sharing one.
  std::vector<torch::Tensor> big{torch::randn({200000}), torch::randn({150, 1000}), torch::randn({10})};
  std::vector<torch::Tensor> big_ref, big_m, big_v;
  for (auto& p : big) big_ref.push_back(p.clone()), big_m.push_back(torch::zeros_like(p)), big_v.push_back(torch::zeros_like(p));
  flora::train::FlatAdamW bucketed(big);
  for (int step = 1; step <= 2; ++step) {
    std::vector<torch::Tensor> grads;
    for (auto& p : big) grads.push_back(torch::randn(p.sizes()));
    bucketed.step(grads, step, 0.01, 0.9, 0.999, 1e-8, 0.1);
    for (size_t i = 0; i < big.size(); ++i)
      flora::train::adamw_step(big_ref[i], grads[i], big_m[i], big_v[i], step, 0.01, 0.9, 0.999, 1e-8, 0.1);
  }
  for (size_t i = 0; i < big.size(); ++i) EXPECT_TRUE(torch::equal(big[i], big_ref[i])) << "bucketed tensor " << i;
  EXPECT_EQ(big[1].data_ptr<float>(), big[2].data_ptr<float>() - 150000) << "150k and 10 share a bucket";
  EXPECT_NE(big[0].data_ptr<float>() + 200000, big[1].data_ptr<float>()) << "200k + 150k exceed one bucket";
  // Mixed dtypes: stepped one by one, same arithmetic.
  auto a = torch::randn({3}), b = torch::randn({2}, torch::kFloat64);
  auto a0 = a.clone(), b0 = b.clone(), ma = torch::zeros({3}), va = torch::zeros({3});
  flora::train::FlatAdamW mixed({a, b});
  const auto ga = torch::randn({3}), gb = torch::randn({2}, torch::kFloat64);
  mixed.step({ga, gb}, 1, 0.1, 0.9, 0.999, 1e-8, 0.0);
  flora::train::adamw_step(a0, ga, ma, va, 1, 0.1, 0.9, 0.999, 1e-8, 0.0);
  EXPECT_TRUE(torch::equal(a, a0));
  EXPECT_FALSE(torch::equal(b, b0));  // it moved
  EXPECT_THROW(mixed.step({ga}, 2, 0.1, 0.9, 0.999, 1e-8, 0.0), flora::InvalidArgument);
}

struct LrRow {
  const char* schedule;
  int64_t step, total, warmup;
  double want;  // closed form for base 1
};

TEST(Train, LearningRateSchedules) {
  const LrRow rows[] = {
      {"constant", 0, 10, 0, 1.0},  {"constant", 9, 10, 0, 1.0},      {"linear", 0, 10, 0, 1.0},
      {"linear", 5, 10, 0, 0.5},    {"cosine", 5, 10, 0, 0.5},        {"cosine", 0, 10, 0, 1.0},
      {"cosine", 10, 10, 0, 0.0},   {"cosine", 0, 10, 4, 0.25},       {"cosine", 3, 10, 4, 1.0},
      {"linear", 7, 10, 4, 0.5},    {"cosine", 7, 10, 4, 0.5},        {"cosine", 2, 12, 0, 0.5 * (1 + std::cos(M_PI / 6))},
  };
  for (const auto& r : rows)
    EXPECT_NEAR(flora::train::learning_rate(r.schedule, 1.0, r.step, r.total, r.warmup), r.want, 1e-12)
        << r.schedule << " step " << r.step << " warmup " << r.warmup;
}

TEST(Train, EpochOrderIsAPermutationFixedBySeedAndEpoch) {
  const auto a = flora::data::epoch_order(100, 7, 3, true), b = flora::data::epoch_order(100, 7, 3, true);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, flora::data::epoch_order(100, 7, 4, true));
  EXPECT_NE(a, flora::data::epoch_order(100, 8, 3, true));
  EXPECT_EQ(std::set<int64_t>(a.begin(), a.end()).size(), 100u);
  const auto plain = flora::data::epoch_order(5, 7, 3, false);
  EXPECT_EQ(plain, (std::vector<int64_t>{0, 1, 2, 3, 4}));
}

TEST(Train, LoaderBatchesAreDeterministicShardedAndResumable) {
  flora::data::Dataset d;
  d.images = torch::randint(0, 255, {37, 3, 8, 8}, torch::kLong).to(torch::kUInt8);
  d.labels = torch::arange(37);
  flora::data::LoaderOptions o;
  o.batch_size = 5;
  o.augment = true;
  o.seed = 3;
  auto collect = [&](flora::data::LoaderOptions opt, int64_t start) {
    flora::data::Loader l(d, opt, 2, start);
    std::vector<torch::Tensor> xs, ys;
    torch::Tensor x, y;
    while (l.next(x, y)) xs.push_back(x), ys.push_back(y);
    return std::make_pair(xs, ys);
  };
  auto full = collect(o, 0);
  ASSERT_EQ(full.first.size(), 8u);  // ceil(37 / 5)
  auto again = collect(o, 0);
  for (size_t i = 0; i < full.first.size(); ++i) EXPECT_TRUE(torch::equal(full.first[i], again.first[i]));
  auto resumed = collect(o, 3);  // from batch 3: the same batches 3..7
  ASSERT_EQ(resumed.first.size(), 5u);
  for (size_t i = 0; i < 5; ++i) EXPECT_TRUE(torch::equal(full.first[i + 3], resumed.first[i]));
  // two shards cover the epoch's samples exactly once
  std::multiset<int64_t> seen;
  for (int k = 0; k < 2; ++k) {
    auto s = o;
    s.shard_index = k;
    s.shard_count = 2;
    for (auto& y : collect(s, 0).second)
      for (int64_t i = 0; i < y.size(0); ++i) seen.insert(y[i].item<int64_t>());
  }
  EXPECT_EQ(seen.size(), 37u);
  EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), 37u);
  // normalization: without augmentation a batch is (x / 255 - mean) / std
  auto plain = o;
  plain.augment = false;
  plain.shuffle = false;
  flora::data::Loader l(d, plain, 0);
  torch::Tensor x, y;
  ASSERT_TRUE(l.next(x, y));
  auto mean = torch::tensor({0.485, 0.456, 0.406}).view({1, 3, 1, 1}), std = torch::tensor({0.229, 0.224, 0.225}).view({1, 3, 1, 1});
  EXPECT_LT(max_abs_diff(x, (d.images.slice(0, 0, 5).to(torch::kFloat64) / 255.0 - mean) / std), 1e-5);
}

TEST(Train, ConfigOverridesAndErrors) {
  auto c = flora::train::load_config("", {"lr=0.5", "batch-size=3", "ranks=4,4,1,1", "update_batchnorm=true"});
  EXPECT_EQ(c.lr, 0.5);
  EXPECT_EQ(c.batch_size, 3);
  EXPECT_EQ(c.ranks, (std::vector<int64_t>{4, 4, 1, 1}));
  EXPECT_TRUE(c.update_batchnorm);
  EXPECT_THROW(flora::train::load_config("", {"lr=abc"}), flora::InvalidArgument);
  EXPECT_THROW(flora::train::load_config("", {"epochz=1"}), flora::InvalidArgument);
  EXPECT_THROW(flora::train::load_config("", {"novalue"}), flora::InvalidArgument);
  EXPECT_THROW(flora::train::load_config("/nonexistent.yaml", {}), flora::InvalidArgument);
  EXPECT_NE(c.to_yaml().find("lr: 0.5"), std::string::npos);
  EXPECT_TRUE(c.recompute_inputs);  // the default
  EXPECT_NE(c.to_yaml().find("recompute_inputs: true"), std::string::npos);
  EXPECT_FALSE(flora::train::load_config("", {"recompute-inputs=false"}).recompute_inputs);
  const auto e = flora_test::error_message<flora::InvalidArgument>([] { flora::train::load_config("", {"recompute_inputs=maybe"}); });
  EXPECT_NE(e.find("recompute_inputs"), std::string::npos) << e;
}

TEST(Train, SvgChartScalesSeriesIntoTheFrame) {
  const auto svg = flora::train::svg_chart("loss", "step", {{"a", {{0, 1}, {10, 3}}}, {"b", {}}});
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  EXPECT_NE(svg.find("60,280"), std::string::npos);   // (0, 1): left, bottom
  EXPECT_NE(svg.find("620,30"), std::string::npos);   // (10, 3): right, top
  EXPECT_NE(flora::train::svg_chart("x", "s", {}).find("no data"), std::string::npos);
}

TEST(Train, ProceduralTasksAreDeterministicBalancedAndSplit) {
  namespace P = flora::procedural;
  for (const auto& task : P::tasks()) {
    std::vector<uint8_t> a(3 * 24 * 24), b(a.size()), v(a.size());
    for (int64_t i = 0; i < 20; ++i) {
      EXPECT_EQ(P::render(task, 0, i, 24, a.data()), i % 10) << task.name;
      P::render(task, 0, i, 24, b.data());
      EXPECT_EQ(a, b) << task.name << " sample " << i << " is not a function of its index";
      P::render(task, 1, i, 24, v.data());
      EXPECT_NE(a, v) << task.name << ": the validation split repeats the training split";
    }
    EXPECT_EQ(task.classes.size(), 10u);
  }
  auto d = flora::data::load_dataset("procedural:glyphs:40", flora::data::Split::Train, 0, 2);
  EXPECT_EQ(d.images.sizes(), (std::vector<int64_t>{40, 3, 32, 32}));
  EXPECT_EQ(d.labels.bincount().min().item<int64_t>(), 4);
  EXPECT_EQ(flora::data::load_dataset("procedural:glyphs:40", flora::data::Split::Val, 16, 1).images.sizes(),
            (std::vector<int64_t>{500, 3, 16, 16}));
  EXPECT_THROW(flora::data::load_dataset("procedural:faces", flora::data::Split::Train, 0), flora::InvalidArgument);
  EXPECT_THROW(flora::data::load_dataset("procedural:shapes:ten", flora::data::Split::Train, 0), flora::Error);
}

TEST(Train, PrepareModelTrainsWhatTheMethodSays) {
  // Counts against the spec's formula per layer, computed independently of the injection.
  auto count = [](const std::string& method) {
    auto c = flora::train::load_config("", {"model=smallcnn", "num_classes=7", "method=" + method, "ranks=8,8,2,2"});
    auto m = flora::open_model("smallcnn");
    const auto report = flora::train::prepare_model(*m, c);
    int64_t trainable = 0;
    for (const auto& [n, p] : m->trainable_parameters()) trainable += p.numel();
    return std::make_pair(report.total_params(), trainable);
  };
  const int64_t head = 128 * 7 + 7;
  int64_t flora_expected = 0;
  for (auto shape : std::vector<std::vector<int64_t>>{{32, 3, 3, 3}, {64, 32, 3, 3}, {64, 64, 3, 3}, {128, 64, 3, 3}, {128, 128, 3, 3}})
    flora_expected += flora::parameter_count(flora::resolve_spec(flora::AdapterOptions().ranks({8, 8, 2, 2}).clip_ranks(true),
                                                                 {"conv", flora::LayerKind::Conv, shape, 1}));
  EXPECT_EQ(count("flora"), std::make_pair(flora_expected, flora_expected + head));
  EXPECT_EQ(count("frozen"), std::make_pair(int64_t{0}, head));
  auto m = flora::open_model("smallcnn");
  int64_t all = 0;
  for (const auto& [n, p] : m->named_parameters()) all += p.numel();
  EXPECT_EQ(count("full").second, all - (128 * 10 + 10) + head);
}

// memory_format: channels-last stores the conv weights NHWC and changes nothing else. Each row
// prepares the same model twice (contiguous and channels-last), gives both the same non-zero
// adapter tensors, and compares outputs, trainable gradients, the merged state dict and a merged
// .safetensors file written from the channels-last model (its writer must not copy NHWC bytes
// as if they were NCHW).
TEST(Train, ChannelsLastChangesOnlyTheLayout) {
  struct Row {
    std::string model, method;
    int64_t image;
  };
  const std::vector<Row> rows = {{"smallcnn", "flora", 16}, {"smallcnn", "lora", 16}, {"smallcnn", "full", 16},
                                 {"resnet18", "flora", 32}, {"convnext_tiny", "flora", 32}};
  const auto dir = std::filesystem::temp_directory_path() / ("flora_cl_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  for (const auto& r : rows) {
    SCOPED_TRACE(r.model + " " + r.method);
    auto make = [&](const std::string& format) {
      torch::manual_seed(3);
      auto c = flora::train::load_config("", {"model=" + r.model, "method=" + r.method, "memory_format=" + format});
      auto m = flora::open_model(r.model);
      flora::train::prepare_model(*m, c);
      torch::manual_seed(4);
      torch::NoGradGuard g;
      // adapters off their zero init; drawn contiguous (normal_ on an NHWC tensor fills it in memory order)
      for (auto& [n, p] : m->trainable_parameters()) p.copy_(torch::randn(p.sizes()) * 0.05);
      m->train(true);
      return m;
    };
    auto plain = make("contiguous"), nhwc = make("channels-last");
    int64_t convs = 0;
    for (const auto& [n, p] : nhwc->named_parameters())
      if (p.dim() == 4) {
        ++convs;
        EXPECT_TRUE(p.is_contiguous(at::MemoryFormat::ChannelsLast)) << n;
      }
    EXPECT_GT(convs, 0);
    for (const auto& [n, p] : plain->named_parameters()) EXPECT_TRUE(p.is_contiguous()) << n;

    const auto x = torch::randn({2, 3, r.image, r.image});
    const auto y = torch::tensor({1, 0}, torch::kLong);
    auto step = [&](flora::Model& m) {
      auto out = m.forward(x);
      torch::nn::functional::cross_entropy(out, y).backward();
      return out.detach();
    };
    const auto out_plain = step(*plain), out_nhwc = step(*nhwc);
    EXPECT_LT(max_abs_diff(out_plain, out_nhwc), 1e-4 * (1 + out_plain.abs().max().item<double>()));
    const auto tp = plain->trainable_parameters(), tn = nhwc->trainable_parameters();
    ASSERT_EQ(tp.size(), tn.size());
    for (size_t i = 0; i < tp.size(); ++i) {
      ASSERT_EQ(tp[i].first, tn[i].first);
      const auto gp = tp[i].second.grad(), gn = tn[i].second.grad();
      ASSERT_TRUE(gp.defined() && gn.defined()) << tp[i].first;
      EXPECT_LT(max_abs_diff(gp, gn), 1e-4 * (1 + gp.abs().max().item<double>())) << tp[i].first;
    }

    if (r.method != "full") {
      const auto file = (dir / (r.model + "_" + r.method + ".safetensors")).string();
      nhwc->save_merged(file);
      plain->merge();
      std::map<std::string, torch::Tensor> saved;
      for (const auto& [n, t] : flora::io::SafetensorsFile(file).load_all()) saved[n] = t;
      const auto expected = plain->state_dict();
      ASSERT_EQ(saved.size(), expected.size());
      for (const auto& [n, t] : expected) {
        ASSERT_TRUE(saved.count(n)) << n;
        EXPECT_LT(max_abs_diff(saved[n], t), 1e-6) << n;
      }
    }
    nhwc->set_channels_last(false);
    for (const auto& [n, p] : nhwc->named_parameters()) EXPECT_TRUE(p.is_contiguous()) << n;
  }
  std::filesystem::remove_all(dir);

  flora::train::TrainConfig c;
  EXPECT_TRUE(flora::train::use_channels_last(c));  // auto, on the CPU
  c.memory_format = "contiguous";
  EXPECT_FALSE(flora::train::use_channels_last(c));
  c.memory_format = "nhwc";
  const auto error_of = flora_test::error_message<flora::InvalidArgument>;
  const auto e = error_of([&] { flora::train::use_channels_last(c); });
  EXPECT_NE(e.find("memory_format"), std::string::npos) << e;
  EXPECT_NE(e.find("'nhwc'"), std::string::npos) << e;
  const auto v = error_of([] {
    flora::train::load_config("", {"model=smallcnn", "data=procedural:shapes", "memory_format=nhwc"}).validate();
  });
  EXPECT_NE(v.find("memory_format"), std::string::npos) << v;
}

// Data-parallel pieces: the launch variables, the bucket plan, padded shards, and the gradient
// reducer over a real Gloo group of two ranks (two threads on loopback) against the plain mean
// of the per-rank gradients computed independently.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <set>
#include <stdexcept>

#include <chrono>
#include <thread>

#include "flora/data.h"
#include "flora/distributed.h"
#include "flora/spec.h"
#include "helpers.h"

using flora_test::max_abs_diff;

namespace {

// A loopback port nobody listens on now: the kernel's choice for port 0. A fixed or pid-derived
// port could be taken by another process, or by ctest's other entries running this binary.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  const bool ok = fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  if (fd >= 0) ::close(fd);
  if (!ok) throw std::runtime_error("free_port: no loopback port to bind");
  return ntohs(a.sin_port);
}

std::map<std::string, std::string> g_env;
const char* fake_env(const char* name) {
  auto it = g_env.find(name);
  return it == g_env.end() ? nullptr : it->second.c_str();
}

struct LaunchRow {
  std::map<std::string, std::string> env;
  int rank, world, local_rank;
  const char* source;
  const char* error;  // substring of the error, or nullptr
};

}  // namespace

TEST(Distributed, LaunchFromEnvironment) {
  const LaunchRow rows[] = {
      {{}, 0, 1, 0, "none", nullptr},
      {{{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "29411"}}, 1, 4, 1, "torchrun", nullptr},
      {{{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"}, {"SLURM_NTASKS_PER_NODE", "2(x4)"}}, 3, 8, 1, "slurm", nullptr},
      // torchrun's variables win over SLURM's when both are there (torchrun inside an allocation)
      {{{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "6"}}, 0, 2, 0, "torchrun", nullptr},
      {{{"RANK", "2"}, {"WORLD_SIZE", "2"}}, 0, 0, 0, "", "rank 2 is not below the world size 2"},
      {{{"RANK", "0"}}, 0, 0, 0, "", "WORLD_SIZE is not"},
      {{{"RANK", "x"}, {"WORLD_SIZE", "2"}}, 0, 0, 0, "", "RANK='x' is invalid"},
      {{{"RANK", "0"}, {"WORLD_SIZE", "0"}}, 0, 0, 0, "", "WORLD_SIZE='0' is invalid"},
      {{{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}}, 0, 0, 0, "", "MASTER_PORT='70000' is invalid"},
      {{{"SLURM_PROCID", "0"}}, 0, 0, 0, "", "SLURM_NTASKS is not"},
  };
  for (const auto& r : rows) {
    g_env = r.env;
    SCOPED_TRACE(r.error ? r.error : r.source);
    if (r.error) {
      try {
        flora::dist::launch_from(fake_env);
        ADD_FAILURE() << "no error";
      } catch (const flora::InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find(r.error), std::string::npos) << e.what();
      }
      continue;
    }
    const auto l = flora::dist::launch_from(fake_env);
    EXPECT_EQ(l.rank, r.rank);
    EXPECT_EQ(l.world_size, r.world);
    EXPECT_EQ(l.local_rank, r.local_rank);
    EXPECT_EQ(l.source, r.source);
  }
  g_env = {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "29411"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}};
  const auto l = flora::dist::launch_from(fake_env);
  EXPECT_EQ(l.master_addr, "node7");
  EXPECT_EQ(l.master_port, 29411);
  EXPECT_TRUE(l.agent_store);
}

TEST(Distributed, BucketPlan) {
  // reverse order, capped, split where the dtype changes; every index exactly once
  const std::vector<int64_t> bytes{400, 400, 100, 900, 50, 50};
  const std::vector<int> dtypes{6, 6, 6, 6, 7, 6};
  const auto plan = flora::dist::assign_buckets(bytes, dtypes, 1000);
  const std::vector<std::vector<size_t>> want{{5}, {4}, {3, 2}, {1, 0}};
  EXPECT_EQ(plan, want);
  // one parameter larger than the cap gets a bucket of its own
  EXPECT_EQ(flora::dist::assign_buckets({5000, 10}, {6, 6}, 1000), (std::vector<std::vector<size_t>>{{1}, {0}}));
  EXPECT_TRUE(flora::dist::assign_buckets({}, {}, 1000).empty());
  EXPECT_THROW(flora::dist::assign_buckets({1, 2}, {6}, 1000), flora::InvalidArgument);
}

TEST(Distributed, PaddedShardsAreEqualAndCoverEverySample) {
  flora::data::Dataset d;
  d.images = torch::zeros({37, 1, 4, 4}, torch::kUInt8);
  d.labels = torch::arange(37, torch::kInt64);
  d.classes.resize(37);
  for (int count : {2, 3, 5}) {
    std::multiset<int64_t> seen;
    std::vector<int64_t> sizes;
    for (int k = 0; k < count; ++k) {
      flora::data::LoaderOptions o;
      o.batch_size = 4;
      o.workers = 1;
      o.shard_index = k;
      o.shard_count = count;
      o.pad_shards = true;
      flora::data::Loader l(d, o, 0);
      torch::Tensor x, y;
      int64_t n = 0;
      while (l.next(x, y)) {
        n += y.size(0);
        for (int64_t i = 0; i < y.size(0); ++i) seen.insert(y[i].item<int64_t>());
      }
      sizes.push_back(n);
    }
    SCOPED_TRACE(count);
    EXPECT_EQ(std::set<int64_t>(sizes.begin(), sizes.end()).size(), 1u);  // every shard as long
    EXPECT_EQ(sizes[0], (37 + count - 1) / count);
    EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), 37u);  // every sample
    EXPECT_EQ(static_cast<int64_t>(seen.size()) - 37, sizes[0] * count - 37);  // the padding repeats, nothing else
  }
  flora::data::LoaderOptions bad;
  bad.shard_index = 2;
  bad.shard_count = 2;
  EXPECT_THROW(flora::data::Loader(d, bad, 0), flora::InvalidArgument);
}

namespace {

// One rank's part: a tiny model whose parameters span several buckets (cap 64 bytes), one
// parameter unused in the last micro-batch, two micro-batches accumulated.
struct Toy {
  torch::Tensor w1, b1, w2, unused;
  std::vector<torch::Tensor> params() const { return {unused, w1, b1, w2}; }  // unused first: its bucket is last
};

// Made up front on one thread: the ranks below run as threads and LibTorch's seed is global.
Toy make_toy() {
  torch::manual_seed(11);
  Toy t;
  t.w1 = torch::randn({6, 4}, torch::kFloat64).requires_grad_(true);
  t.b1 = torch::randn({6}, torch::kFloat64).requires_grad_(true);
  t.w2 = torch::randn({3, 6}, torch::kFloat64).requires_grad_(true);
  t.unused = torch::randn({5}, torch::kFloat64).requires_grad_(true);
  return t;
}

torch::Tensor loss_of(const Toy& t, const torch::Tensor& x, bool use_unused) {
  auto h = torch::tanh(torch::matmul(x, t.w1.t()) + t.b1);
  auto loss = torch::matmul(h, t.w2.t()).pow(2).mean();
  if (use_unused) loss = loss + t.unused.pow(2).sum();
  return loss;
}

// The per-rank gradient, accumulated over both micro-batches, without any communication.
std::vector<torch::Tensor> local_grads(const std::vector<torch::Tensor>& micro) {
  auto t = make_toy();
  loss_of(t, micro[0], true).backward();
  loss_of(t, micro[1], false).backward();
  std::vector<torch::Tensor> g;
  for (auto& p : t.params()) g.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return g;
}

}  // namespace

TEST(Distributed, GradientReducerAveragesOverGlooRanks) {
  const int world = 2;
  std::vector<std::vector<torch::Tensor>> reduced(world);
  std::vector<double> control_sum(world);
  std::vector<std::string> errors(world);
  std::vector<int64_t> buckets(world), overlapped(world);
  const int port = free_port();
  torch::manual_seed(100);
  const std::vector<std::vector<torch::Tensor>> data{{torch::randn({3, 4}, torch::kFloat64), torch::randn({3, 4}, torch::kFloat64)},
                                                     {torch::randn({3, 4}, torch::kFloat64), torch::randn({3, 4}, torch::kFloat64)}};
  const std::vector<Toy> toys{make_toy(), make_toy()};
  auto rank_main = [&](int rank) {
    try {
      flora::dist::Launch l;
      l.rank = rank;
      l.world_size = world;
      l.master_port = port;
      auto group = flora::dist::Group::connect(l, 30);
      const auto& t = toys[rank];
      flora::dist::GradientReducer reducer(*group, t.params(), /*bucket_cap_bytes=*/64);
      buckets[rank] = reducer.buckets();
      for (int step = 0; step < 2; ++step) {  // twice: the reducer re-arms cleanly
        for (auto& p : t.params()) p.mutable_grad() = torch::Tensor();
        loss_of(t, data[rank][0], true).backward();
        reducer.arm();
        loss_of(t, data[rank][1], false).backward();
        auto control = torch::tensor({rank + 1.0}, torch::kFloat64);
        overlapped[rank] = reducer.overlapped_buckets();
        reducer.finish(control);
        control_sum[rank] = control.item<double>();
      }
      for (auto& p : t.params()) reduced[rank].push_back(p.grad().clone());
    } catch (const std::exception& e) {
      errors[rank] = e.what();
    }
  };
  std::thread r1(rank_main, 1);
  rank_main(0);
  r1.join();
  ASSERT_EQ(errors[0], "");
  ASSERT_EQ(errors[1], "");
  EXPECT_EQ(buckets[0], 4);  // the cap split the parameters
  // w2, b1 and w1 got their gradients in backward and started then; `unused` waited for finish
  EXPECT_EQ(overlapped[0], 3);
  EXPECT_EQ(overlapped[1], 3);
  const auto g0 = local_grads(data[0]), g1 = local_grads(data[1]);
  for (size_t k = 0; k < g0.size(); ++k) {
    const auto want = (g0[k] + g1[k]) / 2;
    EXPECT_LT(max_abs_diff(reduced[0][k], want), 1e-12) << "parameter " << k;
    EXPECT_LT(max_abs_diff(reduced[1][k], want), 1e-12) << "parameter " << k;
  }
  EXPECT_GT(max_abs_diff(g0[1], g1[1]), 1e-3);  // the ranks' data differ, so averaging mattered
  EXPECT_EQ(control_sum[0], 3.0);
  EXPECT_EQ(control_sum[1], 3.0);
}

TEST(Distributed, ConnectErrorsAreBoundedAndNamed) {
  flora::dist::Launch l;
  l.rank = 1;  // rank 0 never comes
  l.world_size = 2;
  l.master_port = free_port();
  const auto t0 = std::chrono::steady_clock::now();
  try {
    flora::dist::Group::connect(l, 1.0);
    ADD_FAILURE() << "connected without rank 0";
  } catch (const flora::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("rank 1 of 2 could not join"), std::string::npos) << m;
    EXPECT_NE(m.find("hint"), std::string::npos) << m;
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 20.0);
  EXPECT_THROW(flora::dist::Group::connect(l, 0), flora::InvalidArgument);
  EXPECT_THROW(flora::dist::Group::connect(l, 1, "mpi"), flora::InvalidArgument);
}

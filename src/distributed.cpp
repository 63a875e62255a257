// Data-parallel plumbing on c10d: launch variables, the process group, the bucketed reducer.
#ifndef USE_C10D_GLOO  // LibTorch's CMake flags may already say so
#define USE_C10D_GLOO
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef FLORA_WITH_NCCL
#define USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/torch.h>

#include <csignal>
#include <chrono>
#include <cstdlib>

#include "flora/distributed.h"
#include "flora/spec.h"

namespace flora {
namespace dist {
namespace {

int parse_int(const char* name, const char* value, int lo, int hi) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(value, &end, 10);
  if (errno || end == value || *end != '\0' || v < lo || v > hi)
    throw InvalidArgument("environment variable " + std::string(name) + "='" + value + "' is invalid (expected an integer in [" +
                          std::to_string(lo) + ", " + std::to_string(hi) + "]) (hint: set by torchrun, SLURM or flora train --nproc)");
  return static_cast<int>(v);
}

std::string describe(const Group& g) { return "rank " + std::to_string(g.rank()) + " of " + std::to_string(g.size()); }

// The launchers whose variables we read, in priority order (torchrun inside a SLURM allocation
// sets both: its own win).
struct LaunchVars {
  const char *source, *rank, *world, *local_rank, *local_world, *launcher;
};
const LaunchVars kLaunchers[] = {
    {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "torchrun"},
    {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "srun"},
};

}  // namespace

Launch launch_from(const char* (*get)(const char*)) {
  Launch l;
  const int kMax = 1 << 20;
  const LaunchVars* vars = nullptr;
  for (const auto& v : kLaunchers)
    if (get(v.rank)) {
      vars = &v;
      break;
    }
  if (!vars) return l;
  const char* world = get(vars->world);
  if (!world)
    throw InvalidArgument("environment variable " + std::string(vars->rank) + " is set but " + vars->world +
                          " is not (hint: launch with " + vars->launcher + ", or set both)");
  l.source = vars->source;
  l.rank = parse_int(vars->rank, get(vars->rank), 0, kMax);
  l.world_size = parse_int(vars->world, world, 1, kMax);
  if (const char* v = get(vars->local_rank)) l.local_rank = parse_int(vars->local_rank, v, 0, kMax);
  l.local_world_size = l.world_size;
  if (const char* v = get(vars->local_world)) {
    const std::string count(v);  // SLURM writes "2(x3)" for 2 tasks on each of 3 nodes
    l.local_world_size = parse_int(vars->local_world, count.substr(0, count.find('(')).c_str(), 1, kMax);
  }
  if (l.rank >= l.world_size)
    throw InvalidArgument("rank " + std::to_string(l.rank) + " is not below the world size " + std::to_string(l.world_size) +
                          " (hint: RANK counts from 0)");
  if (const char* a = get("MASTER_ADDR")) l.master_addr = a;
  if (l.master_addr.empty()) throw InvalidArgument("environment variable MASTER_ADDR is empty (hint: the host of rank 0)");
  if (const char* p = get("MASTER_PORT")) l.master_port = parse_int("MASTER_PORT", p, 1, 65535);
  if (const char* a = get("TORCHELASTIC_USE_AGENT_STORE")) l.agent_store = std::string(a) == "True";
  return l;
}

Launch launch_from_env() {
  return launch_from([](const char* name) -> const char* { return std::getenv(name); });
}

// ------------------------------------------------------------------------------------------------

struct Group::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  int rank = 0, size = 1;
  std::string backend;
  double timeout_s = 0;
  torch::Device device = torch::kCPU;  ///< where the backend reduces: CPU (Gloo) or cuda:LOCAL_RANK (NCCL)
  /// `t` where the backend can reduce it (a copy for CPU tensors under NCCL).
  torch::Tensor staged(const torch::Tensor& t) const { return t.device() == device ? t : t.to(device); }
};

Group::Group(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Group::~Group() = default;
int Group::rank() const { return impl_->rank; }
int Group::size() const { return impl_->size; }
const std::string& Group::backend() const { return impl_->backend; }
double Group::timeout_s() const { return impl_->timeout_s; }

std::unique_ptr<Group> Group::connect(const Launch& l, double timeout_s, const std::string& backend) {
  if (!(timeout_s > 0)) throw InvalidArgument("process group timeout " + std::to_string(timeout_s) + " s is invalid (expected > 0)");
  if (backend != "gloo" && backend != "nccl")
    throw InvalidArgument("backend '" + backend + "' is unknown (expected gloo or nccl)");
#ifndef FLORA_WITH_NCCL
  if (backend == "nccl")
    throw InvalidArgument("backend 'nccl' is not built in (hint: configure with -DFLORA_WITH_NCCL=ON against a CUDA LibTorch)");
#endif
  auto impl = std::make_unique<Impl>();
  impl->rank = l.rank;
  impl->size = l.world_size;
  impl->backend = backend;
  impl->timeout_s = timeout_s;
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  // A peer that dies leaves its sockets closed; Gloo's next write to one raises SIGPIPE, whose
  // default action kills this process before the collective can fail with a message (Python
  // ignores SIGPIPE, so torch.distributed never sees this). Ignored, the write fails with EPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  const std::string where = l.master_addr + ":" + std::to_string(l.master_port);
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(l.master_port);
    so.isServer = l.rank == 0 && !l.agent_store;
    so.numWorkers = static_cast<std::size_t>(l.world_size);
    so.waitWorkers = !l.agent_store;
    so.timeout = timeout;
    // Keys under a prefix of our own, one per torchrun restart: the agent's store outlives the
    // workers of a failed attempt, and their keys must not meet the next attempt's.
    const char* attempt = std::getenv("TORCHELASTIC_RESTART_COUNT");
    impl->store = c10::make_intrusive<c10d::PrefixStore>("flora/attempt_" + std::string(attempt ? attempt : "0"),
                                                         c10::make_intrusive<c10d::TCPStore>(l.master_addr, so));
    if (backend == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      // The address the peers reach this process at: GLOO_SOCKET_IFNAME's interface when set (as
      // torch.distributed reads it), loopback for a one-machine job, else the host name's address.
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      const bool local = l.master_addr == "127.0.0.1" || l.master_addr == "localhost";
      opts->devices.push_back(ifname && *ifname ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                              : local           ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                                : c10d::ProcessGroupGloo::createDefaultDevice());
      impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, l.rank, l.world_size, opts);
    }
#ifdef FLORA_WITH_NCCL
    if (backend == "nccl") {
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      impl->device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(l.local_rank));
      impl->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl->store, l.rank, l.world_size, opts);
    }
#endif
  } catch (const std::exception& e) {
    throw Error("rank " + std::to_string(l.rank) + " of " + std::to_string(l.world_size) + " could not join the " + backend +
                " process group at " + where + " within " + std::to_string(static_cast<int>(timeout_s)) + " s: " +
                std::string(e.what()).substr(0, 300) +
                " (hint: every rank needs the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, and rank 0 must be running)");
  }
  return std::unique_ptr<Group>(new Group(std::move(impl)));
}

namespace {
// Runs one collective; a failure names the operation and the rank, and says whether it was the
// timeout (a peer stopped responding) or an error (a peer's connection closed: it died).
template <class F>
void collective(const Group& g, const char* what, F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    f();
  } catch (const std::exception& e) {
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // (a bucket started during backward may time out soon after its wait began: Gloo says so)
    const std::string m = e.what();
    const bool timed_out = took >= 0.9 * g.timeout_s() || m.find("Timed out") != std::string::npos ||
                           m.find("timed out") != std::string::npos;
    throw Error(std::string(what) + (timed_out ? " did not complete within " + std::to_string(static_cast<int>(g.timeout_s())) + " s" : " failed") +
                " on " + describe(g) + ": " + std::string(e.what()).substr(0, 300) +
                (timed_out ? " (hint: a worker stopped responding; raise --dist-timeout if it was only slow)"
                           : " (hint: another worker died; its log says why)"));
  }
}
}  // namespace

void Group::broadcast(std::vector<torch::Tensor>& tensors) {
  collective(*this, "broadcast", [&] {
    for (auto& t : tensors) {
      std::vector<at::Tensor> one{impl_->staged(t)};
      impl_->pg->broadcast(one)->wait();
      if (!one[0].is_same(t)) t.copy_(one[0]);
    }
  });
}

void Group::allreduce_sum(torch::Tensor& t) {
  collective(*this, "all-reduce", [&] {
    std::vector<at::Tensor> one{impl_->staged(t)};
    impl_->pg->allreduce(one)->wait();
    if (!one[0].is_same(t)) t.copy_(one[0]);
  });
}

std::vector<torch::Tensor> Group::allgather(const torch::Tensor& t) {
  std::vector<std::vector<at::Tensor>> out(1);
  const auto in_place = impl_->staged(t.contiguous());
  for (int r = 0; r < size(); ++r) out[0].push_back(torch::empty_like(in_place));
  collective(*this, "all-gather", [&] {
    std::vector<at::Tensor> in{in_place};
    impl_->pg->allgather(out, in)->wait();
  });
  for (auto& x : out[0]) x = x.to(t.device());
  return out[0];
}

void Group::barrier() {
  collective(*this, "barrier", [&] { impl_->pg->barrier()->wait(); });
}

// ------------------------------------------------------------------------------------------------

std::vector<std::vector<size_t>> assign_buckets(const std::vector<int64_t>& bytes, const std::vector<int>& dtypes,
                                                int64_t cap_bytes) {
  if (bytes.size() != dtypes.size())
    throw InvalidArgument("assign_buckets: " + std::to_string(bytes.size()) + " sizes but " + std::to_string(dtypes.size()) + " dtypes");
  std::vector<std::vector<size_t>> out;
  int64_t used = 0;
  for (size_t k = bytes.size(); k-- > 0;) {
    const bool fits = !out.empty() && used + bytes[k] <= cap_bytes && dtypes[out.back().front()] == dtypes[k];
    if (!fits) {
      out.emplace_back();
      used = 0;
    }
    out.back().push_back(k);
    used += bytes[k];
  }
  return out;
}

struct GradientReducer::Bucket {
  torch::Tensor flat;
  size_t members = 0, ready = 0;
  c10::intrusive_ptr<c10d::Work> work;
};

GradientReducer::GradientReducer(Group& group, std::vector<torch::Tensor> params, int64_t cap)
    : group_(group), params_(std::move(params)) {
  std::vector<int64_t> bytes;
  std::vector<int> dtypes;
  for (const auto& p : params_) {
    bytes.push_back(p.numel() * static_cast<int64_t>(p.element_size()));
    dtypes.push_back(static_cast<int>(p.scalar_type()));
  }
  const auto plan = assign_buckets(bytes, dtypes, cap);
  bucket_of_.resize(params_.size());
  offset_of_.resize(params_.size());
  filled_.assign(params_.size(), false);
  for (size_t b = 0; b < plan.size(); ++b) {
    int64_t numel = 0;
    for (size_t k : plan[b]) {
      bucket_of_[k] = b;
      offset_of_[k] = static_cast<size_t>(numel);
      numel += params_[k].numel();
    }
    Bucket bucket;
    bucket.flat = torch::zeros({numel}, params_[plan[b].front()].options().requires_grad(false));
    bucket.members = plan[b].size();
    bytes_ += numel * static_cast<int64_t>(bucket.flat.element_size());
    buckets_.push_back(std::move(bucket));
  }
  for (size_t k = 0; k < params_.size(); ++k)
    hooks_.push_back(params_[k].register_hook([this, k](const torch::Tensor& g) { on_grad(k, g); }));
}

GradientReducer::~GradientReducer() {
  for (size_t k = 0; k < params_.size(); ++k) params_[k].remove_hook(hooks_[k]);
}

int64_t GradientReducer::buckets() const { return static_cast<int64_t>(buckets_.size()); }

void GradientReducer::arm() {
  armed_ = true;
  next_launch_ = 0;
  overlapped_ = 0;
  std::fill(filled_.begin(), filled_.end(), false);
  for (auto& b : buckets_) {
    b.ready = 0;
    b.work.reset();
  }
}

torch::Tensor GradientReducer::slice(size_t k) const {
  return buckets_[bucket_of_[k]].flat.narrow(0, static_cast<int64_t>(offset_of_[k]), params_[k].numel()).view_as(params_[k]);
}

void GradientReducer::on_grad(size_t k, const torch::Tensor& g) {
  if (!armed_ || filled_[k]) return;
  torch::NoGradGuard no_grad;
  auto& b = buckets_[bucket_of_[k]];
  auto mine = slice(k);
  // The hook sees this backward's gradient before it is accumulated: add the earlier micro-batches'.
  const auto& earlier = params_[k].grad();
  if (earlier.defined()) torch::add_out(mine, g, earlier);
  else mine.copy_(g);
  filled_[k] = true;
  ++b.ready;
  const size_t before = next_launch_;
  launch_ready();
  overlapped_ += static_cast<int64_t>(next_launch_ - before);
}

void GradientReducer::launch_ready() {
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].ready == buckets_[next_launch_].members) {
    auto& b = buckets_[next_launch_];
    std::vector<at::Tensor> one{b.flat};
    collective(group_, "gradient all-reduce", [&] { b.work = group_.impl().pg->allreduce(one); });
    ++next_launch_;
  }
}

void GradientReducer::finish(torch::Tensor& control) {
  if (!armed_) throw Error("GradientReducer::finish without arm() before the backward pass");
  torch::NoGradGuard no_grad;
  // Parameters that got no gradient in this backward: their accumulated grad, or 0.
  for (size_t k = 0; k < params_.size(); ++k) {
    if (filled_[k]) continue;
    auto& b = buckets_[bucket_of_[k]];
    auto mine = slice(k);
    const auto& earlier = params_[k].grad();
    if (earlier.defined()) mine.copy_(earlier);
    else mine.zero_();
    filled_[k] = true;
    ++b.ready;
  }
  launch_ready();
  armed_ = false;
  collective(group_, "gradient all-reduce", [&] {
    for (auto& b : buckets_) b.work->wait();
  });
  group_.allreduce_sum(control);
  const double n = static_cast<double>(group_.size());
  for (auto& b : buckets_) b.flat.div_(n);
  for (size_t k = 0; k < params_.size(); ++k) params_[k].mutable_grad() = slice(k);
}

}  // namespace dist
}  // namespace flora

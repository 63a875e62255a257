// flora/distributed.h: data-parallel training on PyTorch's c10d (Gloo on CPU, NCCL with a CUDA
// LibTorch). Only what the trainer needs: a process group joined through torchrun's environment,
// and a gradient reducer that all-reduces the trainable parameters' gradients in buckets while
// the backward pass still runs.
//
// Usage (each process):
//   auto launch = flora::dist::launch_from_env();          // RANK, WORLD_SIZE, MASTER_ADDR, ...
//   auto group = flora::dist::Group::connect(launch, 600); // rendezvous through c10d's TCPStore
//   flora::dist::GradientReducer reducer(*group, params);
//   reducer.arm();  loss.backward();  reducer.finish();    // p.grad() now holds the global mean
//
// Failures (a peer that died, a collective that did not finish within the timeout) throw
// flora::Error naming the rank, the operation and the hint; no call waits longer than the timeout.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace flora {
namespace dist {

/// Where this process sits in the job. world_size 1 means a single process.
struct Launch {
  int rank = 0, world_size = 1, local_rank = 0, local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source = "none";  ///< "torchrun" (RANK/WORLD_SIZE), "slurm" (SLURM_PROCID/SLURM_NTASKS) or "none"
  bool agent_store = false;     ///< TORCHELASTIC_USE_AGENT_STORE=True: torchrun's agent already hosts the TCPStore
};

/// Reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
/// MASTER_PORT) or, when RANK is unset, SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
/// SLURM_NTASKS_PER_NODE; MASTER_ADDR and MASTER_PORT still from the environment, defaults
/// 127.0.0.1:29500). Throws InvalidArgument naming the variable when a value is malformed or
/// inconsistent (rank >= world size, a port out of range). Under torchrun's elastic agent
/// (TORCHELASTIC_USE_AGENT_STORE=True) every rank is a client of the agent's store.
Launch launch_from_env();
/// The same from an explicit variable lookup (tests): `get(name)` returns nullptr when unset.
Launch launch_from(const char* (*get)(const char*));

/// A c10d process group: Gloo for CPU tensors, NCCL for CUDA ones when LibTorch has it.
class Group {
 public:
  /// Joins the group: rank 0 hosts the TCPStore at master_addr:master_port, every rank connects.
  /// `timeout_s` bounds the rendezvous and every later collective. `backend`: gloo | nccl.
  static std::unique_ptr<Group> connect(const Launch& launch, double timeout_s, const std::string& backend = "gloo");
  ~Group();
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  int rank() const;
  int size() const;
  const std::string& backend() const;
  double timeout_s() const;

  /// In place: every rank ends with rank 0's values.
  void broadcast(std::vector<torch::Tensor>& tensors);
  /// In place: the element-wise sum over ranks.
  void allreduce_sum(torch::Tensor& t);
  /// Every rank's `t` (same shape on all ranks), in rank order.
  std::vector<torch::Tensor> allgather(const torch::Tensor& t);
  void barrier();

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  explicit Group(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// Buckets of parameter indices: parameters in reverse order (the order backward produces their
/// gradients), a new bucket when the next one would pass `cap_bytes` or changes dtype. Pure.
std::vector<std::vector<size_t>> assign_buckets(const std::vector<int64_t>& bytes, const std::vector<int>& dtypes,
                                                int64_t cap_bytes);

/// Averages the gradients of `params` over the group. Each bucket is one flat tensor; a hook on
/// every parameter copies its gradient in and, once a bucket is complete, starts its all-reduce
/// while backward goes on (buckets start in index order on every rank, as Gloo requires).
class GradientReducer {
 public:
  GradientReducer(Group& group, std::vector<torch::Tensor> params, int64_t bucket_cap_bytes = 1 << 20);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;  // the hooks hold `this`
  GradientReducer& operator=(const GradientReducer&) = delete;
  /// Call before the backward pass that ends an optimizer step (the last micro-batch).
  void arm();
  /// Completes every bucket (parameters that got no gradient count as 0), waits, divides by the
  /// world size and sets each parameter's grad to its slice. `control` (float64, any length) is
  /// summed over ranks in the same round (the trainer's stop flag and loss totals).
  void finish(torch::Tensor& control);
  int64_t buckets() const;
  /// Gradient bytes all-reduced per optimizer step (the payload; a ring sends 2 (N-1)/N of it).
  int64_t bytes_per_step() const { return bytes_; }
  /// Buckets whose all-reduce the last step started during backward (the rest started in finish).
  int64_t overlapped_buckets() const { return overlapped_; }

 private:
  void on_grad(size_t param, const torch::Tensor& grad);
  torch::Tensor slice(size_t param) const;  ///< the parameter's view into its bucket
  void launch_ready();
  struct Bucket;
  Group& group_;
  std::vector<torch::Tensor> params_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_, offset_of_;
  std::vector<bool> filled_;
  std::vector<unsigned> hooks_;
  size_t next_launch_ = 0;
  bool armed_ = false;
  int64_t bytes_ = 0, overlapped_ = 0;
};

}  // namespace dist
}  // namespace flora

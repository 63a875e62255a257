// flora/train.h: the fine-tuning loop behind `flora train` and `flora eval`.
//
// Usage:
//   flora::train::TrainConfig c = flora::train::load_config("cfg.yaml", {"lr=3e-4", "epochs=2"});
//   c.validate();                                   // every error before any work
//   int rc = flora::train::run_training(c);         // writes c.out (see below)
//
// RUN_DIR layout: adapter/ (the adapter directory, at the end and for the best evaluation in
// best/), checkpoints/last.safetensors (trainable tensors, AdamW moments, step, RNG state),
// metrics.jsonl, config.yaml (the resolved configuration), report.html (SVG curves).
// Determinism: the data order and augmentation are functions of (seed, epoch, index) and the RNG
// state is checkpointed, so a resumed run ends with the adapter an uninterrupted run would have.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "flora/inject.h"

namespace flora {
class Model;
namespace dist {
class Group;
}
namespace train {

struct TrainConfig {
  // model
  std::string model;                 ///< TorchScript .pt or an architecture name
  std::string weights;               ///< .safetensors state dict for a native architecture
  std::string method = "flora";      ///< flora | lora | full | frozen
  std::vector<int64_t> ranks;        ///< FLoRA ranks per mode (conv); empty: rank / spatial_rank
  int64_t rank = 8;                  ///< LoRA rank, or FLoRA's rank for every channel mode
  int64_t spatial_rank = 2;
  double scale = 1.0;                ///< FLoRA s
  double alpha = 16.0;               ///< LoRA alpha
  std::string core = "full";         ///< FLoRA core: full | diagonal (CP, with equal ranks) | identity
  std::vector<int64_t> identity;     ///< FLoRA modes with no factor, e.g. 2,3 (Tucker-2 / LoCon on convs); modes a layer lacks are ignored
  std::string conv_path = "auto";    ///< auto (the cost model per layer and call) | merged | factorized | separable | hybrid
  std::string targets;               ///< comma list of names, a regex (has a regex character), or all-linear; empty: every conv and linear but the head
  int64_t num_classes = 0;           ///< > 0: new head, trained fully
  std::vector<std::string> train_modules;
  // data
  std::string data, val_data;
  int64_t image_size = 0;            ///< 0: the data's own size (CIFAR, MNIST); required for ImageFolder
  int64_t in_channels = 3;           ///< 1-channel data are repeated to 3 when 3
  std::string augment = "default";   ///< none | default (random crop and flip)
  int workers = 2;
  // optimization
  int64_t epochs = 1, steps = 0;     ///< steps > 0 overrides epochs
  int64_t batch_size = 32, grad_accum = 1;
  double lr = 1e-3, weight_decay = 0.01, clip_grad = 1.0;
  std::string schedule = "cosine";   ///< constant | linear | cosine
  int64_t warmup_steps = 0;
  std::string precision = "fp32";    ///< fp32 | bf16 (autocast)
  bool update_batchnorm = false;
  uint64_t seed = 0;
  std::string device = "cpu";
  std::string memory_format = "auto"; ///< auto (channels-last on CPU) | channels-last | contiguous: conv weights' layout
  bool recompute_inputs = true;      ///< adapted Linears after GELU / LayerNorm / attention recompute their input in backward (nn::set_recompute_inputs)
  // run
  std::string out;
  bool resume = false;
  int64_t log_every = 10, checkpoint_every = 0;  ///< 0: checkpoint each epoch
  double dist_timeout = 600;         ///< data-parallel: seconds any rendezvous or collective may take

  /// Checks every value (and that files and directories exist) before any work; throws
  /// InvalidArgument naming the key and the expected values.
  void validate() const;
  /// YAML of every key, as written to RUN_DIR/config.yaml.
  std::string to_yaml() const;
};

/// Whether `c` stores conv weights channels-last: its memory_format, where auto means channels-last
/// on the CPU (measured faster there, docs/PERFORMANCE.md) and contiguous elsewhere.
bool use_channels_last(const TrainConfig& c);

/// Applies `key=value` (also `key: value` YAML scalars; '-' and '_' are the same in keys).
void apply_override(TrainConfig& c, const std::string& key, const std::string& value);
/// A YAML file (flat map of the keys above), then the overrides in order.
TrainConfig load_config(const std::string& yaml_path, const std::vector<std::string>& overrides);
/// The value of `key` in `c` as it is written to config.yaml (for --help's defaults).
std::string config_value(const TrainConfig& c, const std::string& key);
/// Every accepted key, for --help and error messages.
std::vector<std::string> config_keys();

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup, then constant,
/// linear decay to 0 or cosine decay to 0.
double learning_rate(const std::string& schedule, double base, int64_t step, int64_t total, int64_t warmup);

/// One AdamW step (decoupled weight decay, bias correction), as torch.optim.AdamW.
void adamw_step(torch::Tensor& param, const torch::Tensor& grad, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq,
                int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay);

/// AdamW over many tensors at once, with adamw_step's arithmetic. Consecutive parameters are
/// packed into buckets of about 256K elements; each bucket's parameters, exp_avg and exp_avg_sq
/// live in three flat buffers and each parameter becomes a view of its slice (Tensor::set_data),
/// so a step costs about ten ops per bucket instead of per tensor (stepping FLoRA's five tensors
/// per layer one by one cost ResNet-18 about 8 ms per step), and the temporaries of a step are
/// two buckets large (with 1M-element buckets they were 12 MB of ViT-S/16's peak). Element for
/// element the result equals adamw_step's. Tensors of mixed dtype or device are stepped one by
/// one instead. A parameter whose data is replaced after
/// construction (not copied into) is found at the next step and bound to its slice again,
/// keeping its new value.
class FlatAdamW {
 public:
  explicit FlatAdamW(std::vector<torch::Tensor> params);
  /// One step; `grads[i]` has params[i]'s shape (any layout).
  void step(const std::vector<torch::Tensor>& grads, int64_t step, double lr, double beta1, double beta2, double eps,
            double weight_decay);
  /// Views of the moments of parameter i (copy_ into them to restore a checkpoint).
  const torch::Tensor& exp_avg(size_t i) const { return m_.at(i); }
  const torch::Tensor& exp_avg_sq(size_t i) const { return v_.at(i); }
  size_t size() const { return params_.size(); }

 private:
  struct Bucket {
    size_t begin = 0, end = 0;          // parameter indices [begin, end)
    torch::Tensor p, m, v;              // flat buffers
  };
  void rebind(const Bucket& b);
  std::vector<torch::Tensor> params_, m_, v_;
  std::vector<int64_t> offsets_;        // each parameter's offset in its bucket
  std::vector<Bucket> buckets_;         // empty when stepped one by one
};

struct EvalResult {
  double loss = 0, top1 = 0;
  int64_t samples = 0;
};
/// Mean cross-entropy and top-1 accuracy of `model` on `data_spec` (the Val split), eval mode.
/// With a process group each rank evaluates its shard and the totals are summed over ranks.
EvalResult evaluate(Model& model, const std::string& data_spec, int64_t image_size, int64_t in_channels,
                    int64_t batch_size, int workers, dist::Group* group = nullptr);

/// Sets `model` up for the configured method: a new head (num_classes), adapters on the targets
/// (flora, lora; base frozen), everything trainable (full), train_modules. Returns the injection
/// report (empty without adapters). run_training calls it; so can anything that wants the counts.
InjectionReport prepare_model(Model& model, const TrainConfig& config);
/// Runs the configured training; returns the exit code (0 done, 130 interrupted with a
/// checkpoint saved). Throws flora::Error for runtime failures (a NaN loss included).
/// Data-parallel when the environment names a world size > 1 (torchrun's RANK/WORLD_SIZE or
/// SLURM's, see flora/distributed.h): each rank trains on its shard, gradients of the trainable
/// parameters are averaged, rank 0 writes every file; docs/DISTRIBUTED.md.
int run_training(const TrainConfig& config);

/// The SVG line chart used in report.html: one polyline per series over (x, y) points.
std::string svg_chart(const std::string& title, const std::string& x_label,
                      const std::vector<std::pair<std::string, std::vector<std::pair<double, double>>>>& series);

}  // namespace train
}  // namespace flora

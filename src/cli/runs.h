// Child `flora` processes for the commands that compare training runs (`flora demo`, `flora bench
// study`): each run is its own process, so its peak memory is its own and a crash stays contained.
//
// Usage:
//   1. RunResult r; count_parameters(config, r);               // trainable / adapter counts, no training
//   2. int rc = train_child(config, "runs/a.yaml", "runs/a.log", "demo", r);
//      // writes the YAML, runs `flora train` on it, times it, reads config.out/metrics.jsonl into r
//   3. pretrain_config(...), pretrained(config): the cached source-task base both commands adapt.
//   4. run_child({"bench", "step", ...}, "b.log", peak_mb, "study") for any other subcommand.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "flora/train.h"

namespace flora {
namespace cli {

/// What a finished `flora train` run measured.
struct RunResult {
  int64_t trainable = 0, adapter = 0;  ///< every trained tensor (incl. a new head); the adapters alone
  double top1 = 0;                     ///< %, the last evaluation
  double step_s = 0;                   ///< median training step (the first log window, a warm-up, dropped)
  double wall_s = 0, peak_mb = 0;      ///< the child's wall time and peak RSS
  std::vector<std::pair<double, double>> acc, loss;  ///< per eval (epoch, top-1 %), per log (step, loss)
};

/// Runs this executable with `args` (after --threads N: `threads`, or the parent's thread count
/// when 0) as a child process, stdout and stderr to `log`; returns its exit code (128 + signal when
/// killed) and sets `peak_mb` to that process's own peak resident memory. `who` names the caller in
/// errors. Thread-safe: several children may run at once.
int run_child(const std::vector<std::string>& args, const std::string& log, double& peak_mb, const std::string& who,
              int threads = 0);

/// Writes `config` to `yaml`, removes config.out, runs `flora train` on it (output to `log`) and,
/// when it exits 0, reads config.out/metrics.jsonl into `r` (top1, curves, median step) with its
/// wall time and peak memory. Returns the exit code.
int train_child(const train::TrainConfig& config, const std::string& yaml, const std::string& log, const std::string& who,
                RunResult& r, int threads = 0);

/// The base that `flora demo` and `flora bench study` adapt: smallcnn trained fully on
/// procedural:shapes:IMAGES (BatchNorm statistics too), evaluated on the shapes validation split.
train::TrainConfig pretrain_config(int64_t images, int64_t epochs, uint64_t seed, const std::string& out);
/// Its weights once trained: OUT/adapter/trained_modules.safetensors (a complete state dict).
std::string pretrained_weights(const train::TrainConfig& pretrain);
/// Whether `pretrain.out` already holds that base, trained with exactly this configuration.
bool pretrained(const train::TrainConfig& pretrain);

/// Reads RUN_DIR/metrics.jsonl: the last evaluation, the curves and the median step time.
void read_metrics(const std::string& run_dir, int64_t batch_size, RunResult& r);

/// Trainable parameters of a configuration, counted on the model itself (no training).
void count_parameters(const train::TrainConfig& config, RunResult& r);

std::string html_escape(const std::string& s);

}  // namespace cli
}  // namespace flora

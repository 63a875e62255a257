// Child processes and their metrics for `flora demo` and `flora bench study` (see runs.h).
#include "runs.h"

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "flora/io/safetensors.h"
#include "flora/model.h"

extern char** environ;

namespace flora {
namespace cli {

namespace fs = std::filesystem;
using json = nlohmann::json;

int run_child(const std::vector<std::string>& child_args, const std::string& log, double& peak_mb, const std::string& who,
              int threads) {
  const std::string exe = fs::read_symlink("/proc/self/exe").string();
  std::vector<std::string> args{exe, "--threads", std::to_string(threads > 0 ? threads : torch::get_num_threads())};
  args.insert(args.end(), child_args.begin(), child_args.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 2, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 2, 1);
  pid_t pid = 0;
  const int err = posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (err != 0) throw Error(who + ": cannot start '" + exe + "': " + std::strerror(err));
  int status = 0;
  struct rusage ru {};
  while (wait4(pid, &status, 0, &ru) < 0)
    if (errno != EINTR) throw Error(who + ": waiting for the child process failed: " + std::string(std::strerror(errno)));
  peak_mb = ru.ru_maxrss / 1024.0;  // kilobytes on Linux
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return WEXITSTATUS(status);
}

int train_child(const train::TrainConfig& config, const std::string& yaml, const std::string& log, const std::string& who,
                RunResult& r, int threads) {
  fs::remove_all(config.out);
  io::atomic_write(yaml, config.to_yaml());
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = run_child({"train", yaml}, log, r.peak_mb, who, threads);
  r.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (rc == 0) read_metrics(config.out, config.batch_size, r);
  return rc;
}

train::TrainConfig pretrain_config(int64_t images, int64_t epochs, uint64_t seed, const std::string& out) {
  train::TrainConfig pre;
  pre.model = "smallcnn";
  pre.data = "procedural:shapes:" + std::to_string(images);
  pre.val_data = "procedural:shapes";
  pre.method = "full";
  pre.update_batchnorm = true;
  pre.epochs = epochs;
  pre.batch_size = 64;
  pre.lr = 2e-3;
  pre.warmup_steps = 20;
  pre.seed = seed;
  pre.log_every = 20;
  pre.out = out;
  return pre;
}

std::string pretrained_weights(const train::TrainConfig& pre) {
  return (fs::path(pre.out) / "adapter" / "trained_modules.safetensors").string();
}

bool pretrained(const train::TrainConfig& pre) {
  std::ifstream in(fs::path(pre.out) / "config.yaml");
  const std::string cached{std::istreambuf_iterator<char>(in), {}};
  return fs::exists(pretrained_weights(pre)) && cached == pre.to_yaml();
}

void read_metrics(const std::string& run_dir, int64_t batch_size, RunResult& r) {
  std::ifstream in(fs::path(run_dir) / "metrics.jsonl");
  std::vector<double> step_s;
  r.acc.clear();
  r.loss.clear();
  for (std::string line; std::getline(in, line);) {
    const auto j = json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    if (j.value("type", "") == "eval") {
      r.top1 = 100 * j.value("top1", 0.0);
      r.acc.emplace_back(j.value("epoch", 0), r.top1);
    } else if (j.value("type", "") == "train") {
      r.loss.emplace_back(j.value("step", 0), j.value("loss", 0.0));
      const double rate = j.value("images_per_s", 0.0);
      if (rate > 0) step_s.push_back(static_cast<double>(batch_size) / rate);
    }
  }
  if (step_s.size() > 1) step_s.erase(step_s.begin());  // the first window warms up
  if (!step_s.empty()) {
    std::nth_element(step_s.begin(), step_s.begin() + step_s.size() / 2, step_s.end());
    r.step_s = step_s[step_s.size() / 2];
  }
}

void count_parameters(const train::TrainConfig& config, RunResult& r) {
  auto model = open_model(config.model);
  r.adapter = train::prepare_model(*model, config).total_params();
  r.trainable = 0;
  for (const auto& [n, p] : model->trainable_parameters()) r.trainable += p.numel();
}

std::string html_escape(const std::string& s) {
  std::string o;
  for (char ch : s) o += ch == '<' ? "&lt;" : ch == '>' ? "&gt;" : ch == '&' ? "&amp;" : std::string(1, ch);
  return o;
}

}  // namespace cli
}  // namespace flora

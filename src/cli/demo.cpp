// `flora demo`: transfer learning end to end, no download. A small CNN is pretrained on a
// procedural source task (shapes; cached in OUT/pretrain), then adapted to a different target task
// (glyphs: new classes) by head-only training, FLoRA, LoRA at the same rank, LoRA at FLoRA's
// parameter count and full fine-tuning. Each run is a `flora train` child process (so its peak
// memory is its own); the table and OUT/report.html compare them.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "flora/flora.h"
#include "flora/io/safetensors.h"
#include "flora/model.h"
#include "flora/train.h"

extern char** environ;

namespace flora {
namespace cli {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct DemoArgs {
  std::string out = "flora-demo";
  bool quick = false;
  uint64_t seed = 0;
  std::vector<int64_t> ranks{8, 8, 2, 2};
  double scale = 4.0;
};

struct Run {
  std::string name, label;  // directory name, table label
  train::TrainConfig config;
  // measured
  int64_t trainable = 0, adapter = 0;
  double top1 = 0, step_s = 0, wall_s = 0, peak_mb = 0;
  std::vector<std::pair<double, double>> acc, loss;  // per eval (epoch, top-1 %), per log (step, loss)
};

// Runs `flora train CONFIG` as a child process (stderr and stdout to LOG); returns its exit code
// and sets the peak resident memory of that process alone.
int run_child(const std::string& config, const std::string& log, double& peak_mb) {
  const std::string exe = fs::read_symlink("/proc/self/exe").string();
  const std::string threads = std::to_string(torch::get_num_threads());
  std::vector<std::string> args{exe, "--threads", threads, "train", config};
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
  if (err != 0) throw Error("demo: cannot start '" + exe + "': " + std::strerror(err));
  int status = 0;
  struct rusage ru {};
  while (wait4(pid, &status, 0, &ru) < 0)
    if (errno != EINTR) throw Error("demo: waiting for the training process failed: " + std::string(std::strerror(errno)));
  peak_mb = ru.ru_maxrss / 1024.0;  // kilobytes on Linux
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return WEXITSTATUS(status);
}

// Reads the run's metrics.jsonl: the last evaluation, the curves and the median step time.
void read_metrics(Run& r) {
  std::ifstream in(fs::path(r.config.out) / "metrics.jsonl");
  std::vector<double> step_s;
  for (std::string line; std::getline(in, line);) {
    const auto j = json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    if (j.value("type", "") == "eval") {
      r.top1 = 100 * j.value("top1", 0.0);
      r.acc.emplace_back(j.value("epoch", 0), r.top1);
    } else if (j.value("type", "") == "train") {
      r.loss.emplace_back(j.value("step", 0), j.value("loss", 0.0));
      const double rate = j.value("images_per_s", 0.0);
      if (rate > 0) step_s.push_back(static_cast<double>(r.config.batch_size) / rate);
    }
  }
  if (step_s.size() > 1) step_s.erase(step_s.begin());  // the first window warms up
  if (!step_s.empty()) {
    std::nth_element(step_s.begin(), step_s.begin() + step_s.size() / 2, step_s.end());
    r.step_s = step_s[step_s.size() / 2];
  }
}

// Trainable parameters of a configuration, counted on the model itself (no training).
void count_parameters(Run& r) {
  auto model = open_model(r.config.model);
  r.adapter = train::prepare_model(*model, r.config).total_params();
  r.trainable = 0;
  for (const auto& [n, p] : model->trainable_parameters()) r.trainable += p.numel();
}

// The LoRA rank whose total count on the same layers is closest to `target` parameters.
int64_t lora_rank_for(const train::TrainConfig& base, int64_t target) {
  int64_t best = 1, best_gap = -1;
  for (int64_t rank = 1; rank <= 64; ++rank) {
    Run probe{"", "", base};
    probe.config.method = "lora";
    probe.config.rank = rank;
    count_parameters(probe);
    const int64_t gap = std::llabs(probe.adapter - target);
    if (best_gap < 0 || gap < best_gap) best = rank, best_gap = gap;
    if (probe.adapter > target) break;
  }
  return best;
}

std::string html_escape(const std::string& s) {
  std::string o;
  for (char ch : s) o += ch == '<' ? "&lt;" : ch == '>' ? "&gt;" : ch == '&' ? "&amp;" : std::string(1, ch);
  return o;
}

void write_report(const fs::path& out, const std::vector<Run>& runs, const std::string& table, double pretrain_top1) {
  std::vector<std::pair<std::string, std::vector<std::pair<double, double>>>> acc, loss;
  for (const auto& r : runs) {
    acc.emplace_back(r.label, r.acc);
    loss.emplace_back(r.label, r.loss);
  }
  std::ostringstream h;
  h << "<!doctype html><meta charset=\"utf-8\"><title>flora demo</title><body style=\"font-family:sans-serif;max-width:760px\">"
    << "<h1>flora demo: FLoRA vs LoRA vs full fine-tuning</h1>"
    << "<p>A small CNN (smallcnn) pretrained on the procedural <b>shapes</b> task (validation top-1 " << pretrain_top1
    << " %) is adapted to the <b>glyphs</b> task: ten new classes. Every method trains a new classifier head; the "
       "adapters go on every convolution.</p><pre>"
    << html_escape(table) << "</pre>" << train::svg_chart("target validation top-1 (%)", "epoch", acc)
    << train::svg_chart("training loss", "step", loss) << "<p>Each run's own report, metrics and adapter: ";
  for (const auto& r : runs) h << "<a href=\"runs/" << r.name << "/report.html\">" << r.name << "</a> ";
  h << "</p></body>";
  io::atomic_write((out / "report.html").string(), h.str());
}

int run_demo(const DemoArgs& a) {
  const auto t_start = std::chrono::steady_clock::now();
  const fs::path out = a.out;
  fs::create_directories(out / "runs");
  const int64_t source_n = a.quick ? 1000 : 6000, target_n = a.quick ? 500 : 3000;

  // 1. The base: full training on the source task, cached by its configuration.
  train::TrainConfig pre;
  pre.model = "smallcnn";
  pre.data = "procedural:shapes:" + std::to_string(source_n);
  pre.val_data = "procedural:shapes";
  pre.method = "full";
  pre.update_batchnorm = true;
  pre.epochs = a.quick ? 1 : 5;
  pre.batch_size = 64;
  pre.lr = 2e-3;
  pre.warmup_steps = 20;
  pre.seed = a.seed;
  pre.log_every = 20;
  pre.out = (out / "pretrain").string();
  const fs::path base = out / "pretrain" / "adapter" / "trained_modules.safetensors";
  std::string cached;
  {
    std::ifstream in(out / "pretrain" / "config.yaml");
    cached.assign(std::istreambuf_iterator<char>(in), {});
  }
  double pre_peak = 0;
  if (fs::exists(base) && cached == pre.to_yaml()) {
    std::printf("[1/6] pretrained base: reusing %s\n", base.c_str());
  } else {
    std::printf("[1/6] pretraining smallcnn on procedural:shapes (%lld images, %lld epochs; cached for the next run) ...\n",
                (long long)source_n, (long long)pre.epochs);
    std::fflush(stdout);
    fs::remove_all(out / "pretrain");
    fs::create_directories(out / "pretrain");
    io::atomic_write((out / "pretrain.yaml").string(), pre.to_yaml());
    const int rc = run_child((out / "pretrain.yaml").string(), (out / "pretrain.log").string(), pre_peak);
    if (rc != 0) {
      if (rc == 130) return 130;
      throw Error("demo: pretraining failed (exit " + std::to_string(rc) + "); see " + (out / "pretrain.log").string());
    }
  }
  Run pre_run{"pretrain", "pretrain", pre};
  read_metrics(pre_run);

  // 2. The target runs, all from the same base with a new 10-class head.
  train::TrainConfig t;
  t.model = "smallcnn";
  t.weights = base.string();
  t.data = "procedural:glyphs:" + std::to_string(target_n);
  t.val_data = "procedural:glyphs";
  t.num_classes = 10;
  t.epochs = a.quick ? 1 : 4;
  t.batch_size = 64;
  t.lr = 5e-3;
  t.warmup_steps = 10;
  t.seed = a.seed;
  t.log_every = a.quick ? 2 : 10;
  std::vector<Run> runs;
  auto add = [&](const std::string& name, const std::string& label, auto edit) {
    Run r{name, label, t};
    edit(r.config);
    r.config.out = (out / "runs" / name).string();
    runs.push_back(std::move(r));
  };
  add("head", "head only", [](train::TrainConfig& c) { c.method = "frozen"; });
  add("flora", "", [&](train::TrainConfig& c) {
    c.method = "flora";
    c.ranks = a.ranks;
    c.scale = a.scale;
  });
  add("lora", "", [&](train::TrainConfig& c) {
    c.method = "lora";
    c.rank = a.ranks[0];
    c.alpha = 2.0 * a.ranks[0];
  });
  for (auto& r : runs) count_parameters(r);
  const int64_t r_eq = lora_rank_for(runs[2].config, runs[1].adapter);
  add("lora_eq", "", [&](train::TrainConfig& c) {
    c.method = "lora";
    c.rank = r_eq;
    c.alpha = 2.0 * r_eq;
  });
  add("full", "full fine-tuning", [](train::TrainConfig& c) {
    c.method = "full";
    c.lr = 2e-3;
  });
  count_parameters(runs[3]);
  count_parameters(runs[4]);
  std::string ranks;
  for (auto r : a.ranks) ranks += (ranks.empty() ? "" : ",") + std::to_string(r);
  std::ostringstream scale;
  scale << a.scale;
  runs[1].label = "FLoRA [" + ranks + "] s=" + scale.str();
  runs[2].label = "LoRA r=" + std::to_string(a.ranks[0]);
  runs[3].label = "LoRA r=" + std::to_string(r_eq) + " (FLoRA's count)";

  for (size_t i = 0; i < runs.size(); ++i) {
    auto& r = runs[i];
    std::printf("[%zu/6] %-30s on procedural:glyphs (%lld images, %lld epochs) ...", i + 2, r.label.c_str(), (long long)target_n,
                (long long)r.config.epochs);
    std::fflush(stdout);
    fs::remove_all(r.config.out);
    const std::string yaml = (out / "runs" / (r.name + ".yaml")).string(), log = (out / "runs" / (r.name + ".log")).string();
    io::atomic_write(yaml, r.config.to_yaml());
    const auto t0 = std::chrono::steady_clock::now();
    const int rc = run_child(yaml, log, r.peak_mb);
    r.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rc == 130) {
      std::printf(" interrupted\n");
      return 130;
    }
    if (rc != 0) throw Error("demo: run '" + r.name + "' failed (exit " + std::to_string(rc) + "); see " + log);
    read_metrics(r);
    std::printf(" top-1 %5.1f %%  (%.0f s)\n", r.top1, r.wall_s);
  }

  // 3. The table and the report.
  const double lora_count = static_cast<double>(runs[2].adapter);
  std::ostringstream tab;
  char line[256];
  std::snprintf(line, sizeof line, "%-32s %10s %10s %9s %8s %10s %9s\n", "method", "trainable", "adapter", "% of LoRA", "top-1 %",
                "step ms", "peak MB");
  tab << line;
  for (const auto& r : runs) {
    const std::string pct = r.adapter > 0 ? std::to_string(static_cast<int>(std::lround(100 * r.adapter / lora_count))) + " %" : "-";
    std::snprintf(line, sizeof line, "%-32s %10s %10s %9s %8.1f %10.1f %9.0f\n", r.label.c_str(), format_count(r.trainable).c_str(),
                  r.adapter > 0 ? format_count(r.adapter).c_str() : "-", pct.c_str(), r.top1, 1e3 * r.step_s, r.peak_mb);
    tab << line;
  }
  const std::string table = tab.str();
  std::printf("\n%s\n", table.c_str());
  std::printf("trainable: every trained tensor incl. the new head (%s); adapter: the adapters alone; top-1: the target's\n"
              "validation set after the last epoch; step ms: median training step (batch %lld); peak MB: the run's peak RSS.\n",
              format_count(runs[0].trainable).c_str(), (long long)t.batch_size);
  write_report(out, runs, table, pre_run.top1);
  json j = {{"pretrain_top1", pre_run.top1}, {"runs", json::array()}};
  for (const auto& r : runs)
    j["runs"].push_back({{"name", r.name}, {"label", r.label}, {"method", r.config.method}, {"trainable", r.trainable},
                         {"adapter_params", r.adapter}, {"top1", r.top1}, {"median_step_s", r.step_s}, {"peak_rss_mb", r.peak_mb},
                         {"wall_s", r.wall_s}, {"lr", r.config.lr}});
  io::atomic_write((out / "results.json").string(), j.dump(2) + "\n");
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::printf("report: %s  (demo took %.0f s)\n", (out / "report.html").c_str(), total);
  return 0;
}

}  // namespace

void add_demo(CLI::App& app, std::function<int()>& run) {
  auto a = std::make_shared<DemoArgs>();
  auto* c = app.add_subcommand("demo",
                               "Transfer learning end to end on procedural data: pretrain a small CNN (cached), then compare "
                               "head-only, FLoRA, LoRA (same rank and same parameter count) and full fine-tuning");
  c->add_option("--out", a->out, "Directory for the pretrained base, the runs and report.html")->capture_default_str();
  c->add_flag("--quick", a->quick, "Tiny data and one epoch: checks the mechanics in about 30 s (the accuracies mean nothing)");
  c->add_option("--ranks", a->ranks, "FLoRA ranks per conv mode (out, in, kh, kw); LoRA's rank is the first")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  c->add_option("--scale", a->scale, "FLoRA scale s")->capture_default_str();
  c->add_option("--seed", a->seed, "Random seed")->capture_default_str();
  c->callback([a, &run] { run = [a] { return run_demo(*a); }; });
}

}  // namespace cli
}  // namespace flora

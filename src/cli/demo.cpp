// `flora demo`: transfer learning end to end, no download. A small CNN is pretrained on a
// procedural source task (shapes; cached in OUT/pretrain), then adapted to a different target task
// (glyphs: new classes) by head-only training, FLoRA, LoRA at the same rank, LoRA at FLoRA's
// parameter count and full fine-tuning. Each run is a `flora train` child process (so its peak
// memory is its own); the table and OUT/report.html compare them.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "flora/flora.h"
#include "flora/io/safetensors.h"
#include "flora/model.h"
#include "flora/train.h"
#include "runs.h"

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

struct Run : RunResult {
  Run(std::string n, std::string l, train::TrainConfig c) : name(std::move(n)), label(std::move(l)), config(std::move(c)) {}
  std::string name, label;  // directory name, table label
  train::TrainConfig config;
};

// The LoRA rank whose total count on the same layers is closest to `target` parameters.
int64_t lora_rank_for(const train::TrainConfig& base, int64_t target) {
  int64_t best = 1, best_gap = -1;
  for (int64_t rank = 1; rank <= 64; ++rank) {
    Run probe{"", "", base};
    probe.config.method = "lora";
    probe.config.rank = rank;
    count_parameters(probe.config, probe);
    const int64_t gap = std::llabs(probe.adapter - target);
    if (best_gap < 0 || gap < best_gap) best = rank, best_gap = gap;
    if (probe.adapter > target) break;
  }
  return best;
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
  const train::TrainConfig pre = pretrain_config(source_n, a.quick ? 1 : 5, a.seed, (out / "pretrain").string());
  const fs::path base = pretrained_weights(pre);
  double pre_peak = 0;
  if (pretrained(pre)) {
    std::printf("[1/6] pretrained base: reusing %s\n", base.c_str());
  } else {
    std::printf("[1/6] pretraining smallcnn on procedural:shapes (%lld images, %lld epochs; cached for the next run) ...\n",
                (long long)source_n, (long long)pre.epochs);
    std::fflush(stdout);
    fs::remove_all(out / "pretrain");
    fs::create_directories(out / "pretrain");
    io::atomic_write((out / "pretrain.yaml").string(), pre.to_yaml());
    const int rc = run_child({"train", (out / "pretrain.yaml").string()}, (out / "pretrain.log").string(), pre_peak, "demo");
    if (rc != 0) {
      if (rc == 130) return 130;
      throw Error("demo: pretraining failed (exit " + std::to_string(rc) + "); see " + (out / "pretrain.log").string());
    }
  }
  Run pre_run{"pretrain", "pretrain", pre};
  read_metrics(pre.out, pre.batch_size, pre_run);

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
  for (auto& r : runs) count_parameters(r.config, r);
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
  count_parameters(runs[3].config, runs[3]);
  count_parameters(runs[4].config, runs[4]);
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
    const std::string yaml = (out / "runs" / (r.name + ".yaml")).string(), log = (out / "runs" / (r.name + ".log")).string();
    const int rc = train_child(r.config, yaml, log, "demo", r);
    if (rc == 130) {
      std::printf(" interrupted\n");
      return 130;
    }
    if (rc != 0) throw Error("demo: run '" + r.name + "' failed (exit " + std::to_string(rc) + "); see " + log);
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

// `flora bench study`: the seed's claims measured at CPU scale (docs/RESULTS.md).
//
// Transfer protocol: smallcnn is pretrained once on procedural:shapes (cached in OUT/tmp/pretrain),
// then adapted with a new 10-class head to each target (procedural:glyphs: new classes;
// procedural:outlines: a new visual domain; CIFAR-10 / MNIST directories when given) by head-only
// training, full fine-tuning, LoRA (PEFT conv layout) at several ranks, FLoRA at several channel
// and spatial ranks, and FLoRA's Tucker-2 (LoCon) and CP special cases, over several seeds. Then
// a sweep of FLoRA's scale s for conv adapters and for a linear adapter, a learning-rate sweep,
// and `flora bench step` per method for time and memory.
//
// Every run is a `flora train` child process; its result is OUT/runs/NAME.json, reused while its
// configuration is unchanged, so an interrupted study continues where it stopped and the phases
// (`--phase accuracy`, `--phase bench`) can run apart. Every invocation rebuilds OUT/study.json,
// OUT/tables.md and the SVG plots from the results present.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <atomic>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "commands.h"
#include "flora/flora.h"
#include "flora/io/safetensors.h"
#include "flora/stats.h"
#include "flora/train.h"
#include "runs.h"

namespace flora {
namespace cli {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct StudyArgs {
  std::string out = "results";
  bool quick = false;
  int64_t seeds = 3;
  std::vector<std::string> targets{"glyphs", "outlines"};
  std::string cifar10, mnist;  // extra targets from the user's files
  std::string phase = "all";   // all | accuracy | bench | report
  int64_t images = 0, epochs = 0;  // overrides of the target runs' size (0: the protocol's)
  int64_t source_images = 0;       // override of the pretraining set's size
  int64_t jobs = 0;                // training runs at a time (0: cores / threads_per_run)
  int threads_per_run = 1;         // intra-op threads of each training run
  bool fresh = false;              // rerun the pretraining and every run, ignoring stored results
};

// The sizes and grids of the study; --quick shrinks every one of them.
struct Protocol {
  int64_t source_n, source_epochs, target_n, target_epochs, val_n, batch = 64;
  double lr = 5e-3, full_lr = 2e-3, scale = 4;
  int64_t ref_rank = 8;  // the LoRA rank of the headline, the lr sweep and the bench table
  int64_t sweep_seeds = 2;  // seeds of the sweeps' own runs (at most --seeds)
  std::vector<int64_t> lora_ranks, flora_channel, tucker2_ranks, cp_ranks;
  std::vector<int64_t> flora_spatial;  // spatial ranks tried at channel rank ref_rank (2 at the other channel ranks)
  std::vector<double> scales, lrs;
};

Protocol make_protocol(const StudyArgs& a) {
  Protocol p;
  if (a.quick) {
    p.source_n = 3000, p.source_epochs = 3, p.target_n = 500, p.target_epochs = 3, p.val_n = 500;
    p.lora_ranks = {2, 8};
    p.flora_channel = {4, 8};
    p.flora_spatial = {1, 2, 3};
    p.tucker2_ranks = {4};
    p.cp_ranks = {16};
    p.scales = {0.04, 4, 16};
    p.lrs = {2e-3, 5e-3};
  } else {
    p.source_n = 6000, p.source_epochs = 5, p.target_n = 2000, p.target_epochs = 4, p.val_n = 1500;
    p.lora_ranks = {1, 2, 4, 8, 16};
    p.flora_channel = {4, 8, 16};
    p.flora_spatial = {1, 2, 3};
    p.tucker2_ranks = {4, 8};
    p.cp_ranks = {8, 16};
    p.scales = {0.04, 0.4, 4, 16};
    p.lrs = {1e-3, 5e-3, 2e-2};
  }
  if (a.images > 0) p.target_n = a.images;
  if (a.source_images > 0) p.source_n = a.source_images;
  p.sweep_seeds = std::min(p.sweep_seeds, a.seeds);
  if (a.epochs > 0) p.target_epochs = a.epochs;
  return p;
}

std::string num(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

std::string ints(const std::vector<int64_t>& v, const char* sep = ",") {
  std::string s;
  for (auto x : v) s += (s.empty() ? "" : sep) + std::to_string(x);
  return s;
}

// One configuration of the study (all seeds); `key` names it uniquely.
struct Config {
  std::string key, target, family, label;
  int64_t seeds = 1;
  train::TrainConfig base;  // seed 0, no out
};

// A planned (configuration, seed) run and its result.
struct Planned {
  const Config* config;
  uint64_t seed;
  std::string name() const { return config->key + "_seed" + std::to_string(seed); }
};

struct Plan {
  std::vector<Config> configs;  // deduplicated by key
  std::vector<std::string> grid_keys, scale_conv_keys, scale_linear_keys, lr_keys;
  std::map<std::string, std::string> data;  // target -> data spec (for the report)
};

std::string data_spec(const std::string& target, const StudyArgs& a, const Protocol& p, bool val) {
  if (target == "cifar10") return "cifar10:" + a.cifar10;
  if (target == "mnist") return "mnist:" + a.mnist;
  return "procedural:" + target + ":" + std::to_string(val ? p.val_n * 5 : p.target_n);  // val: N / 5 images
}

Plan make_plan(const StudyArgs& a, const Protocol& p, const std::string& base_weights) {
  Plan plan;
  std::vector<std::string> targets = a.targets;
  if (!a.cifar10.empty()) targets.push_back("cifar10");
  if (!a.mnist.empty()) targets.push_back("mnist");
  std::map<std::string, size_t> index;
  int64_t seeds = a.seeds;  // of the configurations added next
  auto add = [&](std::vector<std::string>& group, const std::string& target, const std::string& family, const std::string& label,
                 const std::function<void(train::TrainConfig&)>& edit) {
    train::TrainConfig c;
    c.model = "smallcnn";
    c.weights = base_weights;
    c.data = data_spec(target, a, p, false);
    c.val_data = data_spec(target, a, p, true);
    c.num_classes = 10;
    c.epochs = p.target_epochs;
    if (target == "cifar10" || target == "mnist") c.steps = p.target_epochs * ((p.target_n + p.batch - 1) / p.batch);  // same budget
    c.batch_size = p.batch;
    c.lr = p.lr;
    c.warmup_steps = 10;
    c.log_every = 10;
    edit(c);
    std::string key = target + "_" + family;
    if (c.method == "lora") key += "_r" + std::to_string(c.rank);
    if (c.method == "flora") key += "_" + (c.ranks.empty() ? std::to_string(c.rank) : ints(c.ranks, "-")) + "_s" + num(c.scale);
    key += "_lr" + num(c.lr);
    if (!index.count(key)) {
      index[key] = plan.configs.size();
      plan.configs.push_back({key, target, family, label, seeds, c});
    }
    plan.configs[index[key]].seeds = std::max(plan.configs[index[key]].seeds, seeds);
    if (std::find(group.begin(), group.end(), key) == group.end()) group.push_back(key);
  };
  auto lora = [&](std::vector<std::string>& g, const std::string& t, int64_t r, double lr) {
    add(g, t, "lora", "LoRA r=" + std::to_string(r), [&](train::TrainConfig& c) {
      c.method = "lora", c.rank = r, c.alpha = 2.0 * r, c.lr = lr;  // scaling alpha / r = 2 at every rank, as the demo
    });
  };
  auto flora = [&](std::vector<std::string>& g, const std::string& t, int64_t r, int64_t k, double s, double lr) {
    add(g, t, "flora", "FLoRA [" + ints({r, r, k, k}) + "]", [&](train::TrainConfig& c) {
      c.method = "flora", c.ranks = {r, r, k, k}, c.scale = s, c.lr = lr;
    });
  };
  for (const auto& t : targets) {
    plan.data[t] = data_spec(t, a, p, false) + " (validation " + data_spec(t, a, p, true) + ")";
    add(plan.grid_keys, t, "head", "head only", [](train::TrainConfig& c) { c.method = "frozen"; });
    add(plan.grid_keys, t, "full", "full fine-tuning", [&](train::TrainConfig& c) { c.method = "full", c.lr = p.full_lr; });
    for (auto r : p.lora_ranks) lora(plan.grid_keys, t, r, p.lr);
    for (auto r : p.flora_channel)
      for (auto k : r == p.ref_rank ? p.flora_spatial : std::vector<int64_t>{2}) flora(plan.grid_keys, t, r, k, p.scale, p.lr);
    for (auto r : p.tucker2_ranks)
      add(plan.grid_keys, t, "tucker2", "Tucker-2 r=" + std::to_string(r), [&](train::TrainConfig& c) {
        c.method = "flora", c.ranks = {r, r, 3, 3}, c.identity = {2, 3}, c.scale = p.scale;  // LoCon: no spatial factors
      });
    for (auto r : p.cp_ranks)
      add(plan.grid_keys, t, "cp", "CP R=" + std::to_string(r), [&](train::TrainConfig& c) {
        c.method = "flora", c.ranks = {r, r, r, r}, c.core = "diagonal", c.scale = p.scale;
      });
  }
  // The sweeps run on `outlines` (the harder target, where the methods differ most) when it is one.
  // The linear adapter: smallcnn's only Linear is its head, so that sweep keeps the pretrained head
  // on `outlines` (the source's ten classes in another domain) and adapts it alone.
  const std::string first = std::count(targets.begin(), targets.end(), "outlines") ? "outlines" : targets.front();
  seeds = p.sweep_seeds;
  for (double s : p.scales) flora(plan.scale_conv_keys, first, p.ref_rank, 2, s, p.lr);
  for (double s : p.scales)
    add(plan.scale_linear_keys, first, "flora-fc", "FLoRA on fc [8,8]", [&](train::TrainConfig& c) {
      c.method = "flora", c.ranks = {8, 8}, c.scale = s, c.targets = "fc", c.num_classes = 0;
    });
  for (double lr : p.lrs) {
    flora(plan.lr_keys, first, p.ref_rank, 2, p.scale, lr);
    lora(plan.lr_keys, first, p.ref_rank, lr);
  }
  return plan;
}

// ---- results on disk ----

struct Result {
  bool present = false;
  RunResult r;
};

json result_json(const Planned& pl, const train::TrainConfig& c, const RunResult& r, const std::string& base_id) {
  json acc = json::array();
  for (auto& [e, t] : r.acc) acc.push_back(t);
  return {{"name", pl.name()}, {"key", pl.config->key}, {"target", pl.config->target}, {"family", pl.config->family},
          {"label", pl.config->label}, {"seed", pl.seed}, {"method", c.method}, {"ranks", c.ranks}, {"rank", c.rank},
          {"core", c.core}, {"identity", c.identity}, {"scale", c.scale}, {"alpha", c.alpha}, {"lr", c.lr},
          {"targets", c.targets}, {"data", c.data}, {"epochs", c.epochs}, {"steps", c.steps}, {"batch_size", c.batch_size},
          {"trainable", r.trainable}, {"adapter_params", r.adapter}, {"top1_per_epoch", acc}, {"top1", r.top1},
          {"wall_s", r.wall_s}, {"median_step_s", r.step_s}, {"peak_rss_mb", r.peak_mb}, {"base", base_id},
          {"config_yaml", c.to_yaml()}};
}

Result read_result(const fs::path& file, const std::string& yaml, const std::string& base_id) {
  Result res;
  std::ifstream in(file);
  if (!in) return res;
  const auto j = json::parse(in, nullptr, false);
  if (j.is_discarded() || j.value("config_yaml", "") != yaml || j.value("base", "") != base_id) return res;
  res.present = true;
  res.r.trainable = j["trainable"], res.r.adapter = j["adapter_params"], res.r.top1 = j["top1"];
  res.r.wall_s = j["wall_s"], res.r.step_s = j["median_step_s"], res.r.peak_mb = j["peak_rss_mb"];
  int e = 0;
  for (double t : j["top1_per_epoch"]) res.r.acc.emplace_back(++e, t);
  return res;
}

// ---- plots ----

struct Point {
  double x, y, err;
};
using Series = std::pair<std::string, std::vector<Point>>;

// A line plot with markers and +-1 std error bars, log x if asked; one colour per series.
std::string svg_plot(const std::string& title, const std::string& x_label, const std::string& y_label, bool log_x,
                     const std::vector<Series>& series) {
  const double W = 720, H = 440, L = 60, R = 190, T = 34, B = 46;
  static const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"};
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  for (const auto& [n, pts] : series)
    for (const auto& p : pts) {
      const double x = log_x ? std::log10(p.x) : p.x;
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, p.y - p.err), y1 = std::max(y1, p.y + p.err);
    }
  if (x0 > x1) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (x1 - x0 < 1e-9) x0 -= 0.5, x1 += 0.5;
  const double ypad = std::max(0.5, 0.05 * (y1 - y0)), xpad = 0.04 * (x1 - x0);
  y0 -= ypad, y1 += ypad, x0 -= xpad, x1 += xpad;
  auto px = [&](double x) { return L + ((log_x ? std::log10(x) : x) - x0) / (x1 - x0) * (W - L - R); };
  auto pxl = [&](double lx) { return L + (lx - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return T + (y1 - y) / (y1 - y0) * (H - T - B); };
  std::ostringstream s;
  s.precision(5);
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" font-family=\"sans-serif\" font-size=\"11\">"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    << "<text x=\"" << L << "\" y=\"20\" font-size=\"14\">" << html_escape(title) << "</text>"
    << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << W - L - R << "\" height=\"" << H - T - B
    << "\" fill=\"none\" stroke=\"#999\"/>";
  // y ticks: a step of 1, 2 or 5 x 10^k giving 4..10 ticks
  double step = std::pow(10, std::floor(std::log10((y1 - y0) / 5)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if ((y1 - y0) / (step * m) <= 8) {
      step *= m;
      break;
    }
  for (double y = std::ceil(y0 / step) * step; y <= y1; y += step)
    s << "<line x1=\"" << L << "\" x2=\"" << W - R << "\" y1=\"" << py(y) << "\" y2=\"" << py(y) << "\" stroke=\"#eee\"/>"
      << "<text x=\"" << L - 4 << "\" y=\"" << py(y) + 4 << "\" text-anchor=\"end\">" << num(std::round(y * 100) / 100) << "</text>";
  if (log_x) {
    for (double d = std::floor(x0); d <= x1; d += 1)
      for (double m : {1.0, 2.0, 5.0}) {
        const double lx = d + std::log10(m);
        if (lx < x0 || lx > x1) continue;
        s << "<line x1=\"" << pxl(lx) << "\" x2=\"" << pxl(lx) << "\" y1=\"" << T << "\" y2=\"" << H - B << "\" stroke=\""
          << (m == 1 ? "#ddd" : "#f3f3f3") << "\"/><text x=\"" << pxl(lx) << "\" y=\"" << H - B + 14 << "\" text-anchor=\"middle\">"
          << num(std::pow(10, lx) >= 1e4 ? std::round(std::pow(10, lx)) : std::pow(10, lx)) << "</text>";
      }
  } else {
    double xs = std::pow(10, std::floor(std::log10((x1 - x0) / 5)));
    for (double x = std::ceil(x0 / xs) * xs; x <= x1; x += xs)
      s << "<text x=\"" << pxl(x) << "\" y=\"" << H - B + 14 << "\" text-anchor=\"middle\">" << num(x) << "</text>";
  }
  s << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 8 << "\" text-anchor=\"middle\">" << html_escape(x_label) << "</text>"
    << "<text transform=\"translate(14," << (T + H - B) / 2 << ") rotate(-90)\" text-anchor=\"middle\">" << html_escape(y_label)
    << "</text>";
  for (size_t k = 0; k < series.size(); ++k) {
    const char* c = colors[k % 9];
    auto pts = series[k].second;
    std::sort(pts.begin(), pts.end(), [](const Point& a, const Point& b) { return a.x < b.x; });
    s << "<polyline fill=\"none\" stroke=\"" << c << "\" stroke-width=\"1.5\" points=\"";
    for (const auto& p : pts) s << px(p.x) << "," << py(p.y) << " ";
    s << "\"/>";
    for (const auto& p : pts) {
      if (p.err > 0)
        s << "<line x1=\"" << px(p.x) << "\" x2=\"" << px(p.x) << "\" y1=\"" << py(p.y - p.err) << "\" y2=\"" << py(p.y + p.err)
          << "\" stroke=\"" << c << "\"/>";
      s << "<circle cx=\"" << px(p.x) << "\" cy=\"" << py(p.y) << "\" r=\"3\" fill=\"" << c << "\"/>";
    }
    s << "<text x=\"" << W - R + 10 << "\" y=\"" << T + 10 + 15 * k << "\" fill=\"" << c << "\">" << html_escape(series[k].first)
      << "</text>";
  }
  s << "</svg>\n";
  return s.str();
}

// ---- aggregation ----

struct Aggregate {
  const Config* config = nullptr;
  int64_t adapter = 0, trainable = 0;
  std::map<uint64_t, double> top1;  // seed -> final top-1 %
  std::vector<double> step_s, peak_mb, wall_s;
  stats::MeanStd acc() const {
    std::vector<double> v;
    for (auto& [s, t] : top1) v.push_back(t);
    return stats::mean_std(v);
  }
};

std::string pm(const stats::MeanStd& m, int digits = 1) {
  if (m.n == 0 || std::isnan(m.mean)) return "-";
  char b[64];
  if (m.n > 1) std::snprintf(b, sizeof b, "%.*f ± %.*f", digits, m.mean, digits, m.std);
  else std::snprintf(b, sizeof b, "%.*f", digits, m.mean);
  return b;
}

json ms_json(const stats::MeanStd& m) {
  if (m.n == 0 || std::isnan(m.mean)) return nullptr;
  return {{"mean", m.mean}, {"std", m.std}, {"n", m.n}};
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

int run_study(const StudyArgs& a, const std::string& command_line) {
  const auto t_start = std::chrono::steady_clock::now();
  if (a.phase != "all" && a.phase != "accuracy" && a.phase != "bench" && a.phase != "report")
    throw InvalidArgument("--phase '" + a.phase + "' is unknown (expected all, accuracy, bench or report)");
  if (a.seeds < 1) throw InvalidArgument("--seeds " + std::to_string(a.seeds) + " is invalid (expected >= 1)");
  for (const auto& t : a.targets)
    if (t != "glyphs" && t != "outlines" && t != "shapes")
      throw InvalidArgument("--targets '" + t + "' is unknown (expected procedural tasks glyphs, outlines or shapes; CIFAR-10 and "
                            "MNIST come with --cifar10 DIR / --mnist DIR)");
  if (a.targets.empty() && a.cifar10.empty() && a.mnist.empty()) throw InvalidArgument("no targets (hint: --targets glyphs,outlines)");
  const Protocol p = make_protocol(a);
  const fs::path out = a.out, tmp = out / "tmp", runs_dir = out / "runs";
  fs::create_directories(tmp);
  fs::create_directories(runs_dir);
  const bool do_accuracy = a.phase == "all" || a.phase == "accuracy", do_bench = a.phase == "all" || a.phase == "bench";

  // 1. The base, cached by its configuration (as flora demo's).
  const train::TrainConfig pre = pretrain_config(p.source_n, p.source_epochs, 0, (tmp / "pretrain").string());
  const std::string base = pretrained_weights(pre);
  const std::string base_id = std::to_string(std::hash<std::string>{}(pre.to_yaml()));
  if (a.fresh && do_accuracy) fs::remove_all(pre.out);  // pretrain again: nothing below is reused
  RunResult pre_r;
  {
    if (pretrained(pre)) {
      std::printf("pretrained base: reusing %s\n", base.c_str());
    } else if (a.phase != "report") {
      std::printf("pretraining smallcnn on procedural:shapes (%lld images, %lld epochs) ...", (long long)p.source_n,
                  (long long)p.source_epochs);
      std::fflush(stdout);
      const int rc =
          train_child(pre, (tmp / "pretrain.yaml").string(), (tmp / "pretrain.log").string(), "study", pre_r, a.threads_per_run);
      if (rc == 130) return 130;
      if (rc != 0) throw Error("study: pretraining failed (exit " + std::to_string(rc) + "); see " + (tmp / "pretrain.log").string());
      std::printf(" top-1 %.1f %% (%.0f s)\n", pre_r.top1, pre_r.wall_s);
    }
    if (fs::exists(base)) read_metrics(pre.out, pre.batch_size, pre_r);
  }

  // 2. The plan, and every run of it not yet done.
  const Plan plan = make_plan(a, p, base);
  std::map<std::string, const Config*> by_key;
  for (const auto& c : plan.configs) by_key[c.key] = &c;
  std::vector<Planned> planned;  // seed-major: a partial study covers every method first
  for (uint64_t seed = 0; seed < static_cast<uint64_t>(a.seeds); ++seed)
    for (const auto& c : plan.configs)
      if (static_cast<int64_t>(seed) < c.seeds) planned.push_back({&c, seed});
  std::map<std::string, Result> results;
  std::vector<std::pair<size_t, train::TrainConfig>> pending;
  size_t reused = 0, ran = 0;
  for (size_t i = 0; i < planned.size(); ++i) {
    const auto& pl = planned[i];
    train::TrainConfig c = pl.config->base;
    c.seed = pl.seed;
    c.out = (tmp / "runs" / pl.name()).string();
    Result res;
    if (!(a.fresh && do_accuracy)) res = read_result(runs_dir / (pl.name() + ".json"), c.to_yaml(), base_id);
    if (res.present) ++reused;
    else if (do_accuracy) pending.emplace_back(i, c);
    results[pl.name()] = res;
  }
  // Independent single-threaded children, `jobs` at a time: deterministic (a run's numbers depend
  // on its thread count, not on the load), and far less CPU than two-thread runs on a busy machine.
  std::mutex mu;
  std::atomic<size_t> next{0}, done{0};
  std::atomic<bool> stop{false};
  int exit_code = 0;
  std::string failure;
  double train_s = 0;
  fs::create_directories(tmp / "runs");
  for (auto& [i, c] : pending) count_parameters(c, results[planned[i].name()].r);
  // The first failure stops the others and is what the study reports (call with `mu` held).
  auto record_failure = [&](int code, const std::string& why) {
    stop = true;
    if (exit_code == 0) exit_code = code;
    if (code != 130 && failure.empty()) failure = why;
  };
  auto worker = [&] {
    for (size_t k; !stop && (k = next.fetch_add(1)) < pending.size();) {
      const auto& [i, c] = pending[k];
      const auto& pl = planned[i];
      RunResult r;
      {
        std::lock_guard<std::mutex> g(mu);
        r = results[pl.name()].r;  // the counts
      }
      const std::string log = (tmp / "runs" / (pl.name() + ".log")).string();
      int rc = 0;
      try {  // an exception must not leave this thread (std::terminate): report it as the failure
        rc = train_child(c, (tmp / "runs" / (pl.name() + ".yaml")).string(), log, "study", r, a.threads_per_run);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> g(mu);
        record_failure(1, "study: run '" + pl.name() + "' could not run: " + e.what());
        continue;
      }
      std::lock_guard<std::mutex> g(mu);
      if (rc != 0) {
        record_failure(rc == 130 ? 130 : 1, "study: run '" + pl.name() + "' failed (exit " + std::to_string(rc) + "); see " + log);
        continue;
      }
      results[pl.name()] = {true, r};
      ++ran;
      train_s += r.wall_s;
      try {
        io::atomic_write((runs_dir / (pl.name() + ".json")).string(), result_json(pl, c, r, base_id).dump(1) + "\n");
      } catch (const std::exception& e) {
        record_failure(1, "study: cannot save run '" + pl.name() + "': " + e.what());
        continue;
      }
      std::printf("[%zu/%zu] %-22s %-9s seed %llu: top-1 %5.1f %%  (%s params, %.0f s)\n", ++done, pending.size(),
                  pl.config->label.c_str(), pl.config->target.c_str(), (unsigned long long)pl.seed, r.top1,
                  format_count(r.trainable).c_str(), r.wall_s);
      std::fflush(stdout);
    }
  };
  if (!pending.empty()) {
    const int jobs = static_cast<int>(std::max<int64_t>(1, a.jobs > 0 ? a.jobs : std::thread::hardware_concurrency() / a.threads_per_run));
    std::printf("%zu runs to do (%zu reused), %d at a time, %d thread(s) each\n", pending.size(), reused, jobs, a.threads_per_run);
    std::fflush(stdout);
    std::vector<std::thread> pool;
    for (int j = 0; j < jobs; ++j) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
  }
  if (exit_code == 130) return 130;
  if (exit_code != 0) throw Error(failure);

  // 3. Time and memory per method: `flora bench step` children on the same model and batch.
  struct BenchRow {
    std::string label, method;
    std::vector<std::string> args;
    json result;
  };
  std::vector<BenchRow> bench{
      {"frozen base (forward + input gradient)", "frozen", {"--method", "frozen"}, nullptr},
      {"full fine-tuning", "full", {"--method", "full"}, nullptr},
      {"LoRA r=" + std::to_string(p.ref_rank), "lora",
       {"--method", "lora", "--rank", std::to_string(p.ref_rank), "--alpha", num(2.0 * p.ref_rank)}, nullptr},
      {"FLoRA [" + ints({p.ref_rank, p.ref_rank, 2, 2}) + "]", "flora",
       {"--method", "flora", "--ranks", ints({p.ref_rank, p.ref_rank, 2, 2}), "--scale", num(p.scale)}, nullptr},
      {"Tucker-2 r=" + std::to_string(p.ref_rank), "tucker2",
       {"--method", "flora", "--ranks", ints({p.ref_rank, p.ref_rank, 3, 3}), "--identity", "2,3"}, nullptr},
      {"CP R=16", "cp", {"--method", "flora", "--ranks", "16,16,16,16", "--core", "diagonal"}, nullptr},
  };
  const fs::path bench_file = out / "bench.json";
  {
    std::ifstream in(bench_file);
    const auto j = in ? json::parse(in, nullptr, false) : json();
    if (j.is_array() && j.size() == bench.size() && !do_bench)
      for (size_t i = 0; i < bench.size(); ++i) bench[i].result = j[i].value("result", json());
  }
  const int64_t bench_steps = a.quick ? 5 : 30;
  double bench_s = 0;
  if (do_bench) {
    if (!fs::exists(base)) throw Error("study: no pretrained base at '" + base + "' (hint: run --phase accuracy first)");
    const auto t0 = std::chrono::steady_clock::now();
    json all = json::array();
    for (auto& b : bench) {
      std::printf("bench step %-40s ...", b.label.c_str());
      std::fflush(stdout);
      std::vector<std::string> args{"bench", "step", "--model", "smallcnn", "--weights", base, "--num-classes", "10",
                                    "--batch-size", std::to_string(p.batch), "--image-size", "32", "--steps",
                                    std::to_string(bench_steps), "--warmup", "3", "--json"};
      args.insert(args.end(), b.args.begin(), b.args.end());
      double peak = 0;
      const std::string log = (tmp / ("bench_" + b.method + ".log")).string();
      const int rc = run_child(args, log, peak, "study");
      if (rc != 0) throw Error("study: bench step for " + b.label + " failed (exit " + std::to_string(rc) + "); see " + log);
      std::ifstream in(log);
      std::string line, last;
      while (std::getline(in, line))
        if (!line.empty() && line[0] == '{') last = line;
      b.result = json::parse(last);
      b.result["child_peak_rss_mb"] = peak;
      std::printf(" %.1f ms/step, %.0f MB\n", 1e3 * b.result.value("median_step_s", 0.0), peak);
      all.push_back({{"label", b.label}, {"method", b.method}, {"args", b.args}, {"result", b.result}});
    }
    bench_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    io::atomic_write(bench_file.string(), all.dump(1) + "\n");
  }

  // 4. Aggregate over seeds.
  std::map<std::string, Aggregate> agg;
  for (const auto& pl : planned) {
    const auto& res = results[pl.name()];
    if (!res.present) continue;
    auto& g = agg[pl.config->key];
    g.config = pl.config;
    g.adapter = res.r.adapter, g.trainable = res.r.trainable;
    g.top1[pl.seed] = res.r.top1;
    g.step_s.push_back(res.r.step_s), g.peak_mb.push_back(res.r.peak_mb), g.wall_s.push_back(res.r.wall_s);
  }
  const size_t missing = planned.size() - std::count_if(planned.begin(), planned.end(), [&](const Planned& pl) {
                           return results[pl.name()].present;
                         });
  std::vector<std::string> targets;
  for (const auto& k : plan.grid_keys)
    if (std::find(targets.begin(), targets.end(), by_key[k]->target) == targets.end()) targets.push_back(by_key[k]->target);
  auto keys_of = [&](const std::string& target, const std::string& family) {
    std::vector<const Aggregate*> v;
    for (const auto& k : plan.grid_keys)
      if (by_key[k]->target == target && by_key[k]->family == family && agg.count(k)) v.push_back(&agg[k]);
    return v;
  };
  static const std::vector<std::pair<std::string, std::string>> families{
      {"head", "head only"}, {"full", "full fine-tuning"}, {"lora", "LoRA (PEFT conv layout)"},
      {"flora", "FLoRA"},    {"tucker2", "Tucker-2 (LoCon)"}, {"cp", "CP"}};

  json j_configs = json::array();
  for (const auto& k : plan.grid_keys)
    if (agg.count(k)) {
      const auto& g = agg[k];
      json seeds = json::object();
      for (auto& [s, t] : g.top1) seeds[std::to_string(s)] = t;
      j_configs.push_back({{"key", k}, {"target", g.config->target}, {"family", g.config->family}, {"label", g.config->label},
                           {"adapter_params", g.adapter}, {"trainable", g.trainable}, {"top1", ms_json(g.acc())},
                           {"top1_by_seed", seeds}, {"median_step_s", ms_json(stats::mean_std(g.step_s))},
                           {"peak_rss_mb", ms_json(stats::mean_std(g.peak_mb))}, {"wall_s", ms_json(stats::mean_std(g.wall_s))}});
    }

  std::ostringstream md;
  md << "<!-- written by `flora bench study`; do not edit -->\n";
  json j_headline = json::array(), j_equal = json::array();
  for (const auto& t : targets) {
    // accuracy against parameters
    std::vector<Series> series;
    for (const auto& [fam, name] : families) {
      std::vector<Point> pts;
      for (const auto* g : keys_of(t, fam)) {
        const auto m = g->acc();
        pts.push_back({static_cast<double>(g->trainable), m.mean, m.std});
      }
      if (fam == "flora") {  // one curve per spatial rank
        for (auto k : p.flora_spatial) {  // ranks [r, r, k, k]
          std::vector<Point> sub;
          for (const auto* g : keys_of(t, fam))
            if (g->config->base.ranks.size() == 4 && g->config->base.ranks[2] == k) {
              const auto m = g->acc();
              sub.push_back({static_cast<double>(g->trainable), m.mean, m.std});
            }
          if (!sub.empty()) series.emplace_back("FLoRA spatial rank " + std::to_string(k), sub);
        }
      } else if (!pts.empty()) {
        series.emplace_back(name, pts);
      }
    }
    io::atomic_write((out / ("accuracy_" + t + ".svg")).string(),
                     svg_plot("smallcnn, shapes -> " + t + ": target top-1 vs trainable parameters (mean ± std over seeds)",
                              "trainable parameters (incl. the new head; log scale)", "top-1 %", true, series));
    // the table
    const auto loras = keys_of(t, "lora");
    const Aggregate* ref = nullptr;
    for (const auto* g : loras)
      if (g->config->base.rank == p.ref_rank) ref = g;
    md << "\n### Target `" << t << "`: " << plan.data.at(t) << "\n\n"
       << "| method | config | adapter params | trainable | % of LoRA r=" << p.ref_rank
       << " | top-1 % (mean ± std) | seeds | step ms | peak MB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (const auto& [fam, name] : families)
      for (const auto* g : keys_of(t, fam)) {
        char line[512];
        const std::string pct = ref && g->adapter > 0 ? std::to_string(static_cast<int>(std::lround(100.0 * g->adapter / ref->adapter))) + " %" : "-";
        std::snprintf(line, sizeof line, "| %s | %s | %s | %s | %s | %s | %lld | %.1f | %.0f |\n", name.c_str(), g->config->label.c_str(),
                      g->adapter ? format_count(g->adapter).c_str() : "-", format_count(g->trainable).c_str(), pct.c_str(),
                      pm(g->acc()).c_str(), (long long)g->top1.size(), 1e3 * stats::mean_std(g->step_s).mean,
                      stats::mean_std(g->peak_mb).mean);
        md << line;
      }
    // headline: FLoRA at about 20 % of each LoRA's adapter parameters, paired by seed
    const auto floras = keys_of(t, "flora");
    if (!floras.empty()) {
      std::vector<double> counts;
      for (const auto* f : floras) counts.push_back(static_cast<double>(f->adapter));
      md << "\n**Headline (" << t << ")**: FLoRA at about 20 % of LoRA's adapter parameters (the FLoRA config nearest by ratio), "
            "difference in top-1 paired by seed.\n\n| LoRA | LoRA params | LoRA top-1 | FLoRA | FLoRA params | ratio | FLoRA top-1 "
            "| FLoRA - LoRA (points) |\n|---|---:|---:|---|---:|---:|---:|---:|\n";
      for (const auto* l : loras) {
        const auto* f = floras[stats::nearest_by_ratio(counts, 0.2 * l->adapter)];
        if (std::abs(std::log(static_cast<double>(f->adapter) / (0.2 * l->adapter))) > std::log(1.6)) continue;  // none near 20 %
        std::vector<double> fa, la;
        for (auto& [s, v] : l->top1)
          if (f->top1.count(s)) la.push_back(v), fa.push_back(f->top1.at(s));
        if (la.empty()) continue;
        const auto d = stats::paired_difference(fa, la);
        const double ratio = static_cast<double>(f->adapter) / l->adapter;
        char line[512];
        std::snprintf(line, sizeof line, "| %s | %s | %s | %s | %s | %.0f %% | %s | %s |\n", l->config->label.c_str(),
                      format_count(l->adapter).c_str(), pm(l->acc()).c_str(), f->config->label.c_str(), format_count(f->adapter).c_str(),
                      100 * ratio, pm(f->acc()).c_str(), pm(d, 2).c_str());
        md << line;
        j_headline.push_back({{"target", t}, {"lora", l->config->label}, {"lora_params", l->adapter}, {"lora_top1", ms_json(l->acc())},
                              {"flora", f->config->label}, {"flora_params", f->adapter}, {"ratio", ratio},
                              {"flora_top1", ms_json(f->acc())}, {"difference", ms_json(d)},
                              {"reference", l->config->base.rank == p.ref_rank}});
      }
      // equal parameter counts: LoRA's curve (per seed, linear in log params) read at FLoRA's count
      md << "\n**Equal parameter counts (" << t << ")**: each FLoRA config against LoRA's accuracy interpolated at the same "
            "adapter count (per seed, linear in log parameters; '-' outside LoRA's range).\n\n| FLoRA | params | FLoRA top-1 | "
            "LoRA at that count | FLoRA - LoRA (points) |\n|---|---:|---:|---:|---:|\n";
      for (const auto* f : floras) {
        std::vector<double> fa, la;
        for (auto& [s, v] : f->top1) {
          std::vector<std::pair<double, double>> curve;
          for (const auto* l : loras)
            if (l->top1.count(s)) curve.emplace_back(static_cast<double>(l->adapter), l->top1.at(s));
          const double at = curve.empty() ? NAN : stats::interpolate_log_x(curve, static_cast<double>(f->adapter));
          if (!std::isnan(at)) fa.push_back(v), la.push_back(at);
        }
        const auto d = stats::paired_difference(fa, la);
        md << "| " << f->config->label << " | " << format_count(f->adapter) << " | " << pm(f->acc()) << " | "
           << pm(stats::mean_std(la)) << " | " << pm(d, 2) << " |\n";
        j_equal.push_back({{"target", t}, {"flora", f->config->label}, {"flora_params", f->adapter}, {"flora_top1", ms_json(f->acc())},
                           {"lora_interpolated_top1", ms_json(stats::mean_std(la))}, {"difference", ms_json(d)}});
      }
    }
  }

  // sweeps
  auto sweep = [&](const std::vector<std::string>& keys, const std::function<double(const train::TrainConfig&)>& x,
                   const std::function<std::string(const Config&)>& series_of) {
    std::map<std::string, std::vector<Point>> by;
    json j = json::array();
    for (const auto& k : keys) {
      if (!agg.count(k)) continue;
      const auto& g = agg[k];
      const auto m = g.acc();
      by[series_of(*g.config)].push_back({x(g.config->base), m.mean, m.std});
      j.push_back({{"key", k}, {"series", series_of(*g.config)}, {"x", x(g.config->base)}, {"target", g.config->target},
                   {"adapter_params", g.adapter}, {"top1", ms_json(m)}});
    }
    std::vector<Series> s(by.begin(), by.end());
    return std::make_pair(s, j);
  };
  auto scale_label = [](const Config& c) {
    return c.family == "flora-fc" ? std::string("linear: fc [8,8], kept head") : "conv: " + c.label + ", new head";
  };
  std::vector<std::string> scale_keys = plan.scale_conv_keys;
  scale_keys.insert(scale_keys.end(), plan.scale_linear_keys.begin(), plan.scale_linear_keys.end());
  auto [scale_series, j_scale] = sweep(scale_keys, [](const train::TrainConfig& c) { return c.scale; }, scale_label);
  const std::string sweep_target = plan.scale_conv_keys.empty() ? "" : by_key[plan.scale_conv_keys.front()]->target;
  io::atomic_write((out / "scale.svg").string(), svg_plot("FLoRA scale s on " + sweep_target + ": top-1 (mean ± std)", "s (log scale)",
                                                          "top-1 %", true, scale_series));
  auto [lr_series, j_lr] = sweep(plan.lr_keys, [](const train::TrainConfig& c) { return c.lr; }, [](const Config& c) { return c.label; });
  io::atomic_write((out / "lr.svg").string(), svg_plot("learning rate on " + sweep_target + ": top-1 (mean ± std)",
                                                       "peak learning rate (log scale)", "top-1 %", true, lr_series));
  md << "\n### Scale s (FLoRA, " << sweep_target << ")\n\n| adapter | s | top-1 % |\n|---|---:|---:|\n";
  for (const auto& r : j_scale)
    md << "| " << r["series"].get<std::string>() << " | " << num(r["x"]) << " | "
       << (r["top1"].is_null() ? "-" : pm({r["top1"]["mean"], r["top1"]["std"], r["top1"]["n"]})) << " |\n";
  md << "\n### Learning rate (" << sweep_target << ")\n\n| method | lr | top-1 % |\n|---|---:|---:|\n";
  for (const auto& r : j_lr)
    md << "| " << r["series"].get<std::string>() << " | " << num(r["x"]) << " | "
       << (r["top1"].is_null() ? "-" : pm({r["top1"]["mean"], r["top1"]["std"], r["top1"]["n"]})) << " |\n";
  md << "\n### Time and memory per training step (`flora bench step`, smallcnn, batch " << p.batch << ", 32 px, "
     << torch::get_num_threads() << " threads, " << bench_steps << " timed steps)\n\n"
     << "| method | trainable | median step ms | vs LoRA | peak RSS MB |\n|---|---:|---:|---:|---:|\n";
  double lora_step = 0;
  for (const auto& b : bench)
    if (b.method == "lora" && !b.result.is_null()) lora_step = b.result.value("median_step_s", 0.0);
  json j_bench = json::array();
  for (const auto& b : bench) {
    if (b.result.is_null()) continue;
    const double st = b.result.value("median_step_s", 0.0);
    char line[256];
    std::snprintf(line, sizeof line, "| %s | %s | %.1f | %s | %.0f |\n", b.label.c_str(),
                  format_count(b.result.value("trainable", int64_t(0))).c_str(), 1e3 * st,
                  lora_step > 0 ? (num(std::round(100 * st / lora_step) / 100) + "x").c_str() : "-",
                  b.result.value("child_peak_rss_mb", 0.0));
    md << line;
    j_bench.push_back({{"label", b.label}, {"method", b.method}, {"median_step_s", st}, {"peak_rss_mb", b.result["child_peak_rss_mb"]},
                       {"trainable", b.result["trainable"]}, {"conv_paths", b.result["conv_paths"]}});
  }

  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  double train_total = 0;  // every accuracy run's own wall time, reused ones included
  for (const auto& [k, g] : agg)
    for (double w : g.wall_s) train_total += w;
  json study = {
      {"command", command_line},
      {"quick", a.quick},
      {"phase", a.phase},
      {"hardware", {{"cpu", cpu_model()}, {"cores", std::thread::hardware_concurrency()}, {"threads", torch::get_num_threads()},
                    {"libtorch", std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                                     std::to_string(TORCH_VERSION_PATCH)}}},
      {"protocol", {{"model", "smallcnn"}, {"source", pre.data}, {"source_epochs", p.source_epochs}, {"pretrain_top1", pre_r.top1},
                    {"target_images", p.target_n}, {"target_epochs", p.target_epochs}, {"validation_images", p.val_n},
                    {"batch_size", p.batch}, {"lr", p.lr}, {"full_lr", p.full_lr}, {"flora_scale", p.scale},
                    {"lora_alpha", "2 r (scaling 2)"}, {"seeds", a.seeds}, {"data", plan.data},
                    {"sweep_seeds", p.sweep_seeds}, {"threads_per_run", a.threads_per_run}}},
      {"runs_planned", planned.size()},
      {"runs_missing", missing},
      {"runs_this_invocation", ran},
      {"wall_s", {{"this_invocation", total}, {"training_runs_this_invocation", train_s}, {"bench_phase", bench_s},
                  {"all_training_runs", train_total},
                  {"pretrain", pre_r.wall_s > 0 ? json(pre_r.wall_s) : json(nullptr)}}},  // null: reused
      {"configs", j_configs},
      {"headline", j_headline},
      {"equal_params", j_equal},
      {"scale_sweep", j_scale},
      {"lr_sweep", j_lr},
      {"bench", j_bench},
  };
  io::atomic_write((out / "study.json").string(), study.dump(1) + "\n");
  io::atomic_write((out / "tables.md").string(), md.str());
  std::printf("\n%s\n", md.str().c_str());
  std::printf("%zu runs planned: %zu run now, %zu reused, %zu missing%s; %.0f s of training in this invocation, %.0f s in all "
              "runs together\n",
              planned.size(), ran, reused, missing, missing ? " (run --phase accuracy)" : "", train_s, train_total);
  std::printf("wrote %s/study.json, tables.md, accuracy_*.svg, scale.svg, lr.svg, runs/*.json  (study took %.0f s)\n", a.out.c_str(), total);
  return 0;
}

}  // namespace

void add_study(CLI::App& bench, std::function<int()>& run) {
  auto a = std::make_shared<StudyArgs>();
  auto* c = bench.add_subcommand("study", "The seed's claims at CPU scale: transfer from procedural shapes to other tasks, "
                                          "accuracy vs trainable parameters per method over seeds, the headline check, scale and "
                                          "learning-rate sweeps, time and memory; JSON, SVG plots and tables under --out "
                                          "(docs/RESULTS.md)");
  c->add_option("--out", a->out, "Directory for study.json, tables.md, the plots, runs/*.json (and tmp/: run directories)")
      ->capture_default_str();
  c->add_flag("--quick", a->quick, "Smaller data and grid: the whole pipeline in a few minutes (accuracies indicative only)");
  c->add_option("--seeds", a->seeds, "Seeds per configuration (mean and standard deviation over them)")->capture_default_str();
  c->add_option("--targets", a->targets, "Procedural target tasks (glyphs: new classes, outlines: new domain)")
      ->delimiter(',')
      ->capture_default_str();
  c->add_option("--cifar10", a->cifar10, "Also adapt to CIFAR-10 (binary version directory; same step budget)");
  c->add_option("--mnist", a->mnist, "Also adapt to MNIST (IDX files directory; same step budget)");
  c->add_flag("--fresh", a->fresh, "Rerun the pretraining and every training run, ignoring the results already under --out "
                                   "(make results does; without it a run whose configuration is unchanged is reused)");
  c->add_option("--phase", a->phase, "all, accuracy (pretrain and training runs), bench (flora bench step per method: "
                                     "timing, run it on an idle machine) or report (rebuild the outputs only)")
      ->capture_default_str();
  c->add_option("--images", a->images, "Target training images per run (0: the protocol's 2000, or 500 with --quick)")
      ->capture_default_str();
  c->add_option("--epochs", a->epochs, "Target epochs per run (0: the protocol's 4, or 3 with --quick)")->capture_default_str();
  c->add_option("--source-images", a->source_images, "Pretraining images (0: the protocol's 6000, or 3000 with --quick)")
      ->capture_default_str();
  c->add_option("--jobs", a->jobs, "Training runs at a time (0: cores / --threads-per-run)")->capture_default_str();
  c->add_option("--threads-per-run", a->threads_per_run, "Intra-op threads of each training run (results depend on it, not on the load)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  c->callback([a, &run] {
    run = [a] {
      std::string cmd = "flora bench study --out " + a->out + (a->quick ? " --quick" : "") + " --seeds " + std::to_string(a->seeds);
      return run_study(*a, cmd);
    };
  });
}

}  // namespace cli
}  // namespace flora

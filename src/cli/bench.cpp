// `flora bench step`: the time and memory of one training (or inference) step of a whole model
// under each method, on random data: what PERFORMANCE.md's tables are made of.
//
// A step is what `flora train` does per batch: forward, cross-entropy, backward, one AdamW update
// of the trainable tensors. `frozen` is forward plus the input gradient with every weight frozen:
// the floor any adapter method pays (the gradient has to travel back to the first adapter).
// `--mode infer` times an eval-mode forward without gradients, adapters merged first: a merged
// model must run exactly as fast as the base.
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>

#include "commands.h"
#include "flora/flora.h"
#include "flora/io/safetensors.h"
#include "flora/layers.h"
#include "flora/model.h"
#include "flora/train.h"

namespace flora {
namespace cli {
namespace {

struct StepArgs {
  std::string model, weights, method = "flora", mode = "train", conv_path = "auto", targets, core = "full";
  std::string memory_format = "auto";
  std::vector<int64_t> ranks, identity;
  int64_t rank = 8, batch_size = 16, image_size = 64, steps = 10, warmup = 2, num_classes = 0;
  double scale = 4.0, alpha = 16.0;
  bool json = false;
  bool keep_inputs = false;          ///< nn::set_recompute_inputs(false) for the method's steps
  bool against_keep_inputs = false;  ///< the same for the --against baseline's steps
  std::string profile;  ///< Chrome trace of the timed steps (LibTorch's autograd profiler)
  std::string against;  ///< a baseline method stepped alternately in the same process
};

// Resident memory of this process from /proc/self/status (VmRSS now, VmHWM the peak), in MB.
double proc_status_mb(const std::string& field) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) / 1024.0;  // kB
  return 0;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// One model set up as `method` trains (or infers) on one fixed random batch, a step at a time.
struct Stepper {
  std::unique_ptr<Model> model;
  InjectionReport report;
  std::vector<std::pair<std::string, torch::Tensor>> params;
  std::unique_ptr<train::FlatAdamW> adam;  // as flora train steps
  std::string method, mode;
  bool keep_inputs = false;  // adapters keep their inputs (nn::set_recompute_inputs) in its steps
  torch::Tensor x, y;
  int64_t trainable = 0, steps = 0;

  Stepper(const StepArgs& a, const std::string& method_, bool keep_inputs_)
      : method(method_), mode(a.mode), keep_inputs(keep_inputs_) {
    train::TrainConfig c;
    c.model = a.model;
    c.method = method;
    c.ranks = a.ranks;
    c.rank = a.rank;
    c.scale = a.scale;
    c.alpha = a.alpha;
    c.conv_path = a.conv_path;
    c.core = a.core;
    c.identity = a.identity;
    c.targets = a.targets;
    c.num_classes = a.num_classes;
    c.memory_format = a.memory_format;
    torch::manual_seed(0);
    model = open_model(a.model);
    if (!a.weights.empty()) model->load_state(io::SafetensorsFile(a.weights).load_all(), /*strict=*/true);
    report = train::prepare_model(*model, c);
    if (mode == "train") {
      params = model->trainable_parameters();
      std::vector<torch::Tensor> tensors;
      for (auto& [n, p] : params) tensors.push_back(p);
      if (!tensors.empty()) adam = std::make_unique<train::FlatAdamW>(tensors);
    } else if (method == "flora" || method == "lora") {
      model->merge();
    }
    for (auto& [n, p] : model->trainable_parameters()) trainable += p.numel();
    x = torch::randn({a.batch_size, 3, a.image_size, a.image_size});
    int64_t classes = 0;
    {
      torch::NoGradGuard g;
      model->train(false);
      classes = model->forward(x.slice(0, 0, 1)).size(-1);
    }
    y = torch::randint(0, classes, {a.batch_size}, torch::kLong);
    model->train(mode == "train");
  }

  void step() {
    ++steps;
    nn::set_recompute_inputs(!keep_inputs);  // read in forward; the two steppers may differ
    if (mode == "infer") {
      torch::NoGradGuard g;
      model->forward(x);
      return;
    }
    auto input = method == "frozen" ? x.detach().requires_grad_(true) : x;
    auto loss = torch::nn::functional::cross_entropy(model->forward(input), y);
    loss.backward();
    if (adam) {
      std::vector<torch::Tensor> grads;
      for (auto& [n, p] : params) grads.push_back(p.grad().defined() ? p.grad() : torch::zeros_like(p));
      adam->step(grads, steps, 1e-4, 0.9, 0.999, 1e-8, 0.01);
      for (auto& [n, p] : params) p.mutable_grad() = torch::Tensor();
    }
  }
};

int run_step(const StepArgs& a) {
  auto check_method = [](const std::string& m, const char* flag) {
    if (!(m == "frozen" || m == "full" || m == "lora" || m == "flora"))
      throw InvalidArgument(std::string(flag) + " '" + m + "' is unknown (expected frozen, full, lora or flora)");
  };
  check_method(a.method, "--method");
  if (!a.against.empty()) check_method(a.against, "--against");
  if (a.mode != "train" && a.mode != "infer") throw InvalidArgument("--mode '" + a.mode + "' is unknown (expected train or infer)");
  parse_conv_path(a.conv_path);  // throws naming the value and the known paths
  train::TrainConfig layout;  // validates --memory-format before any model is built
  layout.memory_format = a.memory_format;
  const std::string memory_format = train::use_channels_last(layout) ? "channels-last" : "contiguous";

  if (a.against_keep_inputs && a.against.empty()) throw InvalidArgument("--against-keep-inputs needs --against METHOD");
  Stepper main(a, a.method, a.keep_inputs);
  std::unique_ptr<Stepper> base;
  if (!a.against.empty()) base = std::make_unique<Stepper>(a, a.against, a.against_keep_inputs);
  auto& model = main.model;
  const auto& report = main.report;
  const int64_t trainable = main.trainable;
  empty_cpu_cache();  // setup's blocks, as flora train does before its first step
  const double base_rss = proc_status_mb("VmRSS");

  // With --against, the baseline steps next to each step of the method, in this process: a slow
  // spell of a shared machine hits both alike, and the ratio is taken per pair.
  std::vector<double> times, cpu_times, ratios;
  std::unique_ptr<torch::autograd::profiler::RecordProfile> profiler;
  const std::string trace_tmp = a.profile + ".tmp";
  for (int64_t s = 0; s < a.warmup + a.steps; ++s) {
    if (s == a.warmup && !a.profile.empty())
      profiler = std::make_unique<torch::autograd::profiler::RecordProfile>(trace_tmp);
    // The baseline goes first in even pairs and second in odd ones: with the baseline always
    // first, the ratios differed by 1 to 2 % from those of the other order (docs/PERFORMANCE.md).
    double base_dt = 0;
    auto step_base = [&] {
      const auto b0 = std::chrono::steady_clock::now();
      base->step();
      base_dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - b0).count();
    };
    if (base && s % 2 == 0) step_base();
    const auto t0 = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    main.step();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double cpu = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
    if (base && s % 2 == 1) step_base();
    if (s >= a.warmup) {
      times.push_back(dt), cpu_times.push_back(cpu);
      if (base) ratios.push_back(dt / base_dt);
    }
  }

  if (profiler) {
    profiler.reset();  // writes the trace
    std::filesystem::rename(trace_tmp, a.profile);
  }

  std::map<std::string, int64_t> paths;
  nlohmann::json layers = nlohmann::json::array();
  std::map<std::string, nn::AdaptableLayer*> by_name;
  for (const auto& [name, layer] : model->layers()) by_name[name] = layer;
  for (const auto& ad : report.adapted) {
    std::string path = "-";
    auto* layer = by_name.count(ad.name) ? by_name[ad.name] : nullptr;
    if (layer && a.mode == "infer") path = "weights merged";  // the adapter is in W: a plain conv / matmul
    else if (auto* c2 = dynamic_cast<nn::ConvImpl<2>*>(layer)) path = to_string(c2->last_path());
    else if (auto* c1 = dynamic_cast<nn::ConvImpl<1>*>(layer)) path = to_string(c1->last_path());
    else if (auto* c3 = dynamic_cast<nn::ConvImpl<3>*>(layer)) path = to_string(c3->last_path());
    if (path != "-") ++paths[path];
    layers.push_back({{"name", ad.name}, {"kind", ad.kind}, {"shape", ad.shape}, {"ranks", ad.ranks}, {"path", path}});
  }
  const double med = median(times), peak = proc_status_mb("VmHWM");
  double mean = 0;
  for (double t : times) mean += t / times.size();
  if (a.json) {
    nlohmann::json j = {{"model", a.model},
                        {"method", a.method},
                        {"mode", a.mode},
                        {"batch_size", a.batch_size},
                        {"image_size", a.image_size},
                        {"steps", a.steps},
                        {"threads", torch::get_num_threads()},
                        {"memory_format", memory_format},
                        {"recompute_inputs", !a.keep_inputs},
                        {"median_step_s", med},
                        {"mean_step_s", mean},
                        {"min_step_s", *std::min_element(times.begin(), times.end())},
                        // CPU time of all threads: on a shared machine with --threads 1 it does not
                        // count the time other processes held the core
                        {"median_cpu_step_s", median(cpu_times)},
                        {"peak_rss_mb", peak},
                        {"base_rss_mb", base_rss},
                        {"trainable", trainable},
                        {"adapter_params", report.total_params()},
                        {"conv_paths", paths},
                        {"layers", layers}};
    if (base) j["against"] = {{"method", a.against}, {"recompute_inputs", !a.against_keep_inputs}, {"median_ratio", median(ratios)}};
    std::cout << j.dump() << "\n";
  } else {
    std::printf("%s %s (%s, %s): median step %.4f s (mean %.4f, %lld steps after %lld warm-up), peak RSS %.0f MB (%.0f MB before "
                "the first step), %s trainable",
                a.model.c_str(), a.method.c_str(), a.mode.c_str(), memory_format.c_str(), med, mean, (long long)a.steps, (long long)a.warmup, peak,
                base_rss, format_count(trainable).c_str());
    for (const auto& [p, n] : paths) std::printf(", %lld adapted layer(s) %s", (long long)n, p.c_str());
    std::printf("\n");
    if (base)
      std::printf("%s / %s step time, stepped alternately in this process: %.3fx (median of %zu pairs; peak RSS counts both models)\n",
                  a.method.c_str(), a.against.c_str(), median(ratios), ratios.size());
  }
  return 0;
}

}  // namespace

void add_bench(CLI::App& app, std::function<int()>& run) {
  auto* bench = app.add_subcommand("bench", "Benchmarks of whole models (step: docs/PERFORMANCE.md) and the study (docs/RESULTS.md)");
  bench->require_subcommand(1);
  auto a = std::make_shared<StepArgs>();
  auto* c = bench->add_subcommand("step", "Time and peak memory of training steps on random data: frozen (forward + input "
                                          "gradient), full, lora or flora; --mode infer for merged inference");
  c->add_option("--model", a->model, "Architecture name or TorchScript model (.pt)")->required();
  c->add_option("--weights", a->weights, "Base weights (.safetensors); random initialization otherwise");
  c->add_option("--method", a->method, "frozen, full, lora or flora")->capture_default_str();
  c->add_option("--mode", a->mode, "train (forward, backward, AdamW) or infer (eval forward, adapters merged)")->capture_default_str();
  c->add_option("--ranks", a->ranks, "FLoRA ranks per mode, e.g. 16,16,2,2 (default: --rank for channels, 2 for kernels)")->delimiter(',');
  c->add_option("--rank", a->rank, "LoRA rank, or FLoRA's channel rank")->capture_default_str();
  c->add_option("--scale", a->scale, "FLoRA scale s")->capture_default_str();
  c->add_option("--alpha", a->alpha, "LoRA alpha")->capture_default_str();
  c->add_option("--core", a->core, "FLoRA core: full, diagonal (cp) or identity")->capture_default_str();
  c->add_option("--identity", a->identity, "FLoRA modes with no factor, e.g. 2,3 (Tucker-2)")->delimiter(',');
  c->add_option("--targets", a->targets, "Modules to adapt, as flora train: names, a regex, all-linear or all-conv "
                                         "(default: every conv and linear but the head)");
  c->add_option("--conv-path", a->conv_path, "auto (cost model), merged, factorized, hybrid (groups-1 convs, no dropout) or separable (only depthwise Conv2d: restrict --targets to them, e.g. '.*block\\.0' on ConvNeXt)")->capture_default_str();
  c->add_option("--num-classes", a->num_classes, "New head with K classes (0: keep the model's)")->capture_default_str();
  c->add_option("--memory-format", a->memory_format, "Conv weights' layout, as flora train: auto (channels-last on cpu), "
                 "channels-last or contiguous")->capture_default_str();
  c->add_option("--batch-size", a->batch_size, "Batch size")->capture_default_str()->check(CLI::PositiveNumber);
  c->add_option("--image-size", a->image_size, "Image size (PX x PX, 3 channels)")->capture_default_str()->check(CLI::PositiveNumber);
  c->add_option("--steps", a->steps, "Timed steps")->capture_default_str()->check(CLI::PositiveNumber);
  c->add_option("--warmup", a->warmup, "Untimed steps first")->capture_default_str()->check(CLI::NonNegativeNumber);
  c->add_option("--profile", a->profile, "Write a Chrome trace (chrome://tracing) of the timed steps, every LibTorch op "
                 "with its time; the profiler slows the steps it records");
  c->add_option("--against", a->against, "Also build the model as this method (e.g. frozen) and step the two alternately in "
                 "this process (the baseline first in every other pair); prints the median per-pair step-time ratio, which a "
                 "shared machine's drifts cancel out of "
                 "(peak RSS then counts both models)");
  c->add_flag("--keep-inputs", a->keep_inputs, "Adapted Linears keep their inputs for backward instead of recomputing "
              "them from the GELU / LayerNorm / attention before them (native ConvNeXt and ViT; docs/DESIGN.md): for A/B "
              "memory measurements");
  c->add_flag("--against-keep-inputs", a->against_keep_inputs, "--keep-inputs for the --against baseline's steps "
              "(e.g. --method flora --against flora --against-keep-inputs: the time recomputation costs)");
  c->add_flag("--json", a->json, "Print one JSON object (median_step_s, peak_rss_mb, conv paths per layer, ...)");
  c->callback([a, &run] { run = [a] { return run_step(*a); }; });
  add_study(*bench, run);
}

}  // namespace cli
}  // namespace flora

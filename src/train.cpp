#include "flora/train.h"

#include <torch/torch.h>
#include <ATen/autocast_mode.h>
#include <yaml-cpp/yaml.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <unordered_set>

#include "flora/data.h"
#include "flora/distributed.h"
#include "flora/io/adapter_dir.h"
#include "flora/io/safetensors.h"
#include "flora/layers.h"
#include "flora/model.h"
#include "flora/procedural.h"
#include "flora/runtime.h"

namespace flora {
namespace train {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

volatile std::sig_atomic_t g_stop = 0;
void on_signal(int sig) { g_stop = sig; }

std::string normalize_key(std::string k) {
  for (auto& c : k)
    if (c == '-') c = '_';
  return k;
}

[[noreturn]] void bad_value(const std::string& key, const std::string& value, const std::string& expected) {
  throw InvalidArgument("config key '" + key + "': '" + value + "' is invalid (expected " + expected + ")");
}

int64_t to_int(const std::string& k, const std::string& v) {
  try {
    size_t pos = 0;
    const long long x = std::stoll(v, &pos);
    if (pos != v.size()) throw std::invalid_argument(v);
    return x;
  } catch (const std::exception&) {
    bad_value(k, v, "an integer");
  }
}

double to_double(const std::string& k, const std::string& v) {
  try {
    size_t pos = 0;
    const double x = std::stod(v, &pos);
    if (pos != v.size() || !std::isfinite(x)) throw std::invalid_argument(v);
    return x;
  } catch (const std::exception&) {
    bad_value(k, v, "a number");
  }
}

bool to_bool(const std::string& k, const std::string& v) {
  if (v == "true" || v == "1" || v == "yes" || v == "on") return true;
  if (v == "false" || v == "0" || v == "no" || v == "off") return false;
  bad_value(k, v, "true or false");
}

std::vector<std::string> split_list(const std::string& v) {
  std::vector<std::string> out;
  std::stringstream ss(v);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

std::string join_ints(const std::vector<int64_t>& v) {
  std::string s;
  for (auto x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

struct Key {
  std::function<void(TrainConfig&, const std::string&)> set;
  std::function<std::string(const TrainConfig&)> get;
};

#define STR_KEY(name) {#name, {[](TrainConfig& c, const std::string& v) { c.name = v; }, [](const TrainConfig& c) { return c.name; }}}
#define INT_KEY(name) {#name, {[](TrainConfig& c, const std::string& v) { c.name = to_int(#name, v); }, [](const TrainConfig& c) { return std::to_string(c.name); }}}
#define DBL_KEY(name) {#name, {[](TrainConfig& c, const std::string& v) { c.name = to_double(#name, v); }, [](const TrainConfig& c) { std::ostringstream o; o << c.name; return o.str(); }}}
#define BOOL_KEY(name) {#name, {[](TrainConfig& c, const std::string& v) { c.name = to_bool(#name, v); }, [](const TrainConfig& c) { return std::string(c.name ? "true" : "false"); }}}

const std::map<std::string, Key>& keys() {
  static const std::map<std::string, Key> k{
      STR_KEY(model), STR_KEY(weights), STR_KEY(method),
      {"ranks", {[](TrainConfig& c, const std::string& v) {
                   c.ranks.clear();
                   for (const auto& r : split_list(v)) c.ranks.push_back(to_int("ranks", r));
                 },
                 [](const TrainConfig& c) { return join_ints(c.ranks); }}},
      INT_KEY(rank), INT_KEY(spatial_rank), DBL_KEY(scale), DBL_KEY(alpha), STR_KEY(core),
      {"identity", {[](TrainConfig& c, const std::string& v) {
                      c.identity.clear();
                      for (const auto& m : split_list(v)) c.identity.push_back(to_int("identity", m));
                    },
                    [](const TrainConfig& c) { return join_ints(c.identity); }}},
      STR_KEY(conv_path), STR_KEY(targets), INT_KEY(num_classes),
      {"train_modules", {[](TrainConfig& c, const std::string& v) { c.train_modules = split_list(v); },
                         [](const TrainConfig& c) { return join(c.train_modules); }}},
      STR_KEY(data), STR_KEY(val_data), INT_KEY(image_size), INT_KEY(in_channels), STR_KEY(augment), INT_KEY(workers),
      INT_KEY(epochs), INT_KEY(steps), INT_KEY(batch_size), INT_KEY(grad_accum), DBL_KEY(lr), DBL_KEY(weight_decay),
      DBL_KEY(clip_grad), STR_KEY(schedule), INT_KEY(warmup_steps), STR_KEY(precision), BOOL_KEY(update_batchnorm),
      {"seed", {[](TrainConfig& c, const std::string& v) { c.seed = static_cast<uint64_t>(to_int("seed", v)); },
                [](const TrainConfig& c) { return std::to_string(c.seed); }}},
      STR_KEY(device), STR_KEY(memory_format), BOOL_KEY(recompute_inputs), STR_KEY(out), BOOL_KEY(resume), INT_KEY(log_every), INT_KEY(checkpoint_every), DBL_KEY(dist_timeout),
  };
  return k;
}

bool one_of(const std::string& v, std::initializer_list<const char*> options) {
  for (auto o : options)
    if (v == o) return true;
  return false;
}

void check_data_spec(const std::string& key, const std::string& spec) {
  const auto colon = spec.find(':');
  if (colon == std::string::npos) bad_value(key, spec, "imagefolder:DIR, cifar10:DIR, mnist:DIR or procedural:TASK");
  const std::string kind = spec.substr(0, colon), dir = spec.substr(colon + 1);
  if (!one_of(kind, {"imagefolder", "cifar10", "mnist", "procedural"}))
    bad_value(key, spec, "imagefolder:DIR, cifar10:DIR, mnist:DIR or procedural:TASK");
  if (kind == "procedural") {
    procedural::task(dir.substr(0, dir.find(':')));  // throws for an unknown task
    return;
  }
  if (!fs::is_directory(dir)) throw InvalidArgument("config key '" + key + "': directory '" + dir + "' does not exist");
}

// ------------------------------------------------------------------------------------------------
// Checkpoints: one safetensors file with the trainable tensors, AdamW's moments and the CPU RNG
// state; the loop position and the best evaluation in its metadata.

struct State {
  int64_t step = 0, epoch = 0, batch = 0;  // next optimizer step, current epoch, next micro-batch in it
  double best_top1 = -1;
  int64_t best_step = -1;
};

struct Optim {
  std::vector<std::pair<std::string, torch::Tensor>> params;
  std::unique_ptr<FlatAdamW> adam;  // the moments; params are views of its flat buffer
};

std::string fingerprint(const TrainConfig& c) {
  std::string f = c.model + "|" + c.method + "|" + join_ints(c.ranks) + "|" + std::to_string(c.rank) + "|" + c.targets + "|" +
                  std::to_string(c.num_classes) + "|" + join(c.train_modules);
  if (c.core != "full" || !c.identity.empty()) f += "|" + c.core + "|" + join_ints(c.identity);  // older checkpoints stay valid
  return f;
}

// Every rank's CPU generator state, in rank order (a collective in data-parallel runs).
std::vector<torch::Tensor> rng_states(dist::Group* group) {
  auto mine = at::detail::getDefaultCPUGenerator().get_state();
  if (!group) return {mine};
  return group->allgather(mine);
}

// Rank 0 writes; `rng` holds every rank's generator state ("rng.cpu" is rank 0's).
void save_checkpoint(const fs::path& path, const Optim& o, const State& s, const TrainConfig& c, const std::vector<torch::Tensor>& rng) {
  std::vector<std::pair<std::string, torch::Tensor>> t;
  for (size_t i = 0; i < o.params.size(); ++i) {
    t.emplace_back("param." + o.params[i].first, o.params[i].second.detach().cpu());
    t.emplace_back("exp_avg." + o.params[i].first, o.adam->exp_avg(i).cpu());
    t.emplace_back("exp_avg_sq." + o.params[i].first, o.adam->exp_avg_sq(i).cpu());
  }
  t.emplace_back("rng.cpu", rng.at(0));
  for (size_t r = 1; r < rng.size(); ++r) t.emplace_back("rng.cpu.rank" + std::to_string(r), rng[r]);
  std::map<std::string, std::string> meta{{"step", std::to_string(s.step)},       {"epoch", std::to_string(s.epoch)},
                                          {"batch", std::to_string(s.batch)},     {"best_top1", std::to_string(s.best_top1)},
                                          {"best_step", std::to_string(s.best_step)}, {"fingerprint", fingerprint(c)},
                                          {"world_size", std::to_string(rng.size())}};
  io::save_safetensors(path.string(), t, meta);
}

State load_checkpoint(const fs::path& path, Optim& o, const TrainConfig& c, int rank, int world) {
  io::SafetensorsFile f(path.string());
  const auto& meta = f.metadata();
  auto get = [&](const std::string& k) {
    auto it = meta.find(k);
    if (it == meta.end()) throw Error("checkpoint '" + path.string() + "' has no '" + k + "' (hint: not a flora checkpoint?)");
    return it->second;
  };
  if (get("fingerprint") != fingerprint(c))
    throw InvalidArgument("checkpoint '" + path.string() + "' was written for another setup (" + get("fingerprint") + ", now " +
                          fingerprint(c) + ") (hint: resume with the same model, method, ranks and targets, or use a new --out)");
  const int written = meta.count("world_size") ? std::stoi(meta.at("world_size")) : 1;
  if (written != world)
    throw InvalidArgument("checkpoint '" + path.string() + "' was written by " + std::to_string(written) + " process(es), now " +
                          std::to_string(world) + " (hint: resume with --nproc " + std::to_string(written) +
                          ": each rank's data shard and generator state belong to that layout)");
  std::map<std::string, torch::Tensor> all;
  for (auto& [k, v] : f.load_all()) all[k] = v;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < o.params.size(); ++i) {
    const auto& name = o.params[i].first;
    for (const char* prefix : {"param.", "exp_avg.", "exp_avg_sq."})
      if (!all.count(prefix + name) || all[prefix + name].sizes() != o.params[i].second.sizes())
        throw Error("checkpoint '" + path.string() + "' lacks or mis-shapes '" + prefix + name + "' (hint: use a new --out)");
    o.params[i].second.copy_(all["param." + name]);
    o.adam->exp_avg(i).copy_(all["exp_avg." + name]);
    o.adam->exp_avg_sq(i).copy_(all["exp_avg_sq." + name]);
  }
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    gen.set_state(all.at(rank == 0 ? std::string("rng.cpu") : "rng.cpu.rank" + std::to_string(rank)));
  }
  State s;
  s.step = std::stoll(get("step"));
  s.epoch = std::stoll(get("epoch"));
  s.batch = std::stoll(get("batch"));
  s.best_top1 = std::stod(get("best_top1"));
  s.best_step = std::stoll(get("best_step"));
  return s;
}

// ------------------------------------------------------------------------------------------------

class Progress {
 public:
  Progress(int64_t total, int64_t log_every, double images_per_step, bool enabled = true)
      : total_(total), every_(log_every), tty_(::isatty(2)), enabled_(enabled), images_per_step_(images_per_step) {}
  void update(int64_t step, int64_t epoch, int64_t epochs, double loss, double rate) {
    if (!enabled_) return;
    const double eta = rate > 0 ? (total_ - step) * images_per_step_ / rate : 0;
    char line[256];
    std::snprintf(line, sizeof line, "epoch %lld/%lld  step %lld/%lld  loss %.4f  %.1f img/s  ETA %02d:%02d",
                  (long long)epoch + 1, (long long)epochs, (long long)step, (long long)total_, loss, rate,
                  int(eta) / 60, int(eta) % 60);
    if (tty_) {
      const int width = 30, filled = total_ ? int(width * step / total_) : width;
      std::fprintf(stderr, "\r[%s%s] %s ", std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(), line);
      if (step == total_) std::fprintf(stderr, "\n");
    } else if (step % every_ == 0 || step == total_) {
      std::fprintf(stderr, "%s\n", line);
    }
  }
  void newline() {
    if (tty_ && enabled_) std::fprintf(stderr, "\n");
  }

 private:
  int64_t total_, every_;
  bool tty_, enabled_;
  double images_per_step_;
};

void write_report(const fs::path& dir, const TrainConfig& c) {
  std::vector<std::pair<double, double>> loss, top1, eval_loss;
  std::ifstream in(dir / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    const double step = j.value("step", 0.0);
    if (j.value("type", "") == "train") loss.emplace_back(step, j.value("loss", 0.0));
    if (j.value("type", "") == "eval") {
      top1.emplace_back(step, 100.0 * j.value("top1", 0.0));
      eval_loss.emplace_back(step, j.value("eval_loss", 0.0));
    }
  }
  std::ostringstream h;
  h << "<!doctype html><html><head><meta charset=\"utf-8\"><title>flora run " << c.out
    << "</title><style>body{font-family:sans-serif;max-width:900px;margin:2em auto}td{padding:2px 8px}"
       "pre{background:#f4f4f4;padding:8px}</style></head><body>\n<h1>flora training report</h1>\n";
  h << "<p>model <b>" << c.model << "</b>, method <b>" << c.method << "</b>, data <b>" << c.data << "</b></p>\n";
  h << svg_chart("training and evaluation loss", "step", {{"train loss", loss}, {"eval loss", eval_loss}}) << "\n";
  if (!top1.empty()) h << svg_chart("evaluation top-1 accuracy (%)", "step", {{"top-1", top1}}) << "\n";
  h << "<h2>configuration</h2><pre>" << c.to_yaml() << "</pre></body></html>\n";
  io::atomic_write((dir / "report.html").string(), h.str());
}

void append_line(const fs::path& p, const json& j) {
  std::ofstream out(p, std::ios::app);
  out << j.dump() << "\n";
}

torch::Tensor to_channels(const torch::Tensor& images, int64_t channels) {
  if (images.size(1) == 1 && channels == 3) return images.repeat({1, 3, 1, 1});
  return images;
}

data::Dataset load_for(const std::string& spec, data::Split split, int64_t image_size, int64_t in_channels, int workers) {
  auto d = data::load_dataset(spec, split, image_size, std::max(1, workers));
  d.images = to_channels(d.images, in_channels);
  return d;
}

struct Autocast {
  explicit Autocast(bool on) : on_(on) {
    if (!on_) return;
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  }
  ~Autocast() {
    if (!on_) return;
    at::autocast::clear_cache();
    at::autocast::set_cpu_enabled(false);
  }
  bool on_;
};

}  // namespace

// ------------------------------------------------------------------------------------------------

std::vector<std::string> config_keys() {
  std::vector<std::string> out;
  for (const auto& [k, v] : keys()) out.push_back(k);
  return out;
}

std::string config_value(const TrainConfig& c, const std::string& key) {
  auto it = keys().find(normalize_key(key));
  if (it == keys().end()) throw InvalidArgument("unknown config key '" + key + "'");
  return it->second.get(c);
}

void apply_override(TrainConfig& c, const std::string& key_in, const std::string& value) {
  const std::string key = normalize_key(key_in);
  auto it = keys().find(key);
  if (it == keys().end()) {
    throw InvalidArgument("unknown config key '" + key_in + "' (known: " + join(config_keys()) + ")");
  }
  it->second.set(c, value);
}

TrainConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  TrainConfig c;
  if (!path.empty()) {
    if (!fs::is_regular_file(path)) throw InvalidArgument("config file '" + path + "' does not exist");
    YAML::Node root;
    try {
      root = YAML::LoadFile(path);
    } catch (const YAML::Exception& e) {
      throw InvalidArgument("config file '" + path + "' is not valid YAML: " + e.what());
    }
    if (!root.IsMap() && !root.IsNull()) throw InvalidArgument("config file '" + path + "' must be a map of key: value");
    for (const auto& kv : root) {
      const auto key = kv.first.as<std::string>();
      std::string value;
      if (kv.second.IsSequence()) {
        for (const auto& item : kv.second) value += (value.empty() ? "" : ",") + item.as<std::string>();
      } else if (kv.second.IsScalar()) {
        value = kv.second.as<std::string>();
      } else if (!kv.second.IsNull()) {
        throw InvalidArgument("config file '" + path + "': key '" + key + "' must be a scalar or a list");
      }
      apply_override(c, key, value);
    }
  }
  for (const auto& o : overrides) {
    const auto eq = o.find('=');
    if (eq == std::string::npos || eq == 0) throw InvalidArgument("override '" + o + "' is not key=value");
    apply_override(c, o.substr(0, eq), o.substr(eq + 1));
  }
  return c;
}

std::string TrainConfig::to_yaml() const {
  std::ostringstream os;
  os << "# resolved flora train configuration\n";
  for (const auto& [k, key] : keys()) {
    const std::string v = key.get(*this);
    os << k << ": " << (v.empty() ? "\"\"" : (v.find_first_of(":#{}[]&*!|>'\"%@`") != std::string::npos ? "\"" + v + "\"" : v)) << "\n";
  }
  return os.str();
}

void TrainConfig::validate() const {
  if (model.empty()) throw InvalidArgument("no model (hint: --model M.pt or an architecture name)");
  if (model.size() > 3 && model.compare(model.size() - 3, 3, ".pt") == 0 && !fs::is_regular_file(model))
    throw InvalidArgument("model file '" + model + "' does not exist");
  if (!weights.empty() && !fs::is_regular_file(weights)) throw InvalidArgument("weights file '" + weights + "' does not exist");
  if (!one_of(method, {"flora", "lora", "full", "frozen"})) bad_value("method", method, "flora, lora, full or frozen");
  if (data.empty()) throw InvalidArgument("no training data (hint: --data imagefolder:DIR, cifar10:DIR or mnist:DIR)");
  check_data_spec("data", data);
  if (!val_data.empty()) check_data_spec("val_data", val_data);
  if (image_size < 0) bad_value("image_size", std::to_string(image_size), "a positive number of pixels");
  if (image_size == 0 && (data.rfind("imagefolder:", 0) == 0 || val_data.rfind("imagefolder:", 0) == 0))
    bad_value("image_size", "0", "a positive number of pixels for ImageFolder data (e.g. --image-size 64)");
  if (!one_of(core, {"full", "diagonal", "cp", "identity"})) bad_value("core", core, "full, diagonal (cp) or identity");
  for (auto m : identity)
    if (m < 0) bad_value("identity", join_ints(identity), "mode indices >= 0, e.g. 2,3 for Tucker-2 on a conv");
  if (method != "flora" && (core != "full" || !identity.empty()))
    bad_value(core != "full" ? "core" : "identity", core != "full" ? core : join_ints(identity), "only with method flora");
  if (!one_of(conv_path, {"auto", "merged", "factorized", "separable", "hybrid"}))
    bad_value("conv_path", conv_path, "auto, merged, factorized, separable or hybrid");
  if (!one_of(augment, {"none", "default"})) bad_value("augment", augment, "none or default");
  if (!one_of(schedule, {"constant", "linear", "cosine"})) bad_value("schedule", schedule, "constant, linear or cosine");
  if (!one_of(precision, {"fp32", "bf16"})) bad_value("precision", precision, "fp32 or bf16");
  if (!one_of(device, {"cpu", "cuda"})) bad_value("device", device, "cpu or cuda");
  use_channels_last(*this);  // checks memory_format
  if (device == "cuda" && !torch::cuda::is_available())
    throw InvalidArgument("device 'cuda' requested but LibTorch sees no CUDA device (hint: --device cpu, or a CUDA build of LibTorch)");
  if (rank < 1) bad_value("rank", std::to_string(rank), ">= 1");
  if (spatial_rank < 1) bad_value("spatial_rank", std::to_string(spatial_rank), ">= 1");
  for (auto r : ranks)
    if (r < 1) bad_value("ranks", join_ints(ranks), "positive ranks, e.g. 16,16,2,2");
  if (!ranks.empty() && ranks.size() < 2) bad_value("ranks", join_ints(ranks), "at least the output and input ranks, e.g. 16,16,2,2");
  if (steps < 0 || epochs < 1) bad_value(steps < 0 ? "steps" : "epochs", std::to_string(steps < 0 ? steps : epochs), ">= 1");
  if (batch_size < 1) bad_value("batch_size", std::to_string(batch_size), ">= 1");
  if (grad_accum < 1) bad_value("grad_accum", std::to_string(grad_accum), ">= 1");
  if (!(lr > 0)) bad_value("lr", std::to_string(lr), "> 0");
  if (weight_decay < 0) bad_value("weight_decay", std::to_string(weight_decay), ">= 0");
  if (clip_grad < 0) bad_value("clip_grad", std::to_string(clip_grad), ">= 0 (0 disables clipping)");
  if (warmup_steps < 0) bad_value("warmup_steps", std::to_string(warmup_steps), ">= 0");
  if (num_classes < 0) bad_value("num_classes", std::to_string(num_classes), ">= 1, or 0 to keep the head");
  if (in_channels != 1 && in_channels != 3) bad_value("in_channels", std::to_string(in_channels), "1 or 3");
  if (workers < 1) bad_value("workers", std::to_string(workers), ">= 1");
  if (log_every < 1) bad_value("log_every", std::to_string(log_every), ">= 1");
  if (checkpoint_every < 0) bad_value("checkpoint_every", std::to_string(checkpoint_every), ">= 0");
  if (out.empty()) throw InvalidArgument("no run directory (hint: --out runs/my-run)");
  if (!(dist_timeout > 0) || !std::isfinite(dist_timeout)) bad_value("dist_timeout", std::to_string(dist_timeout), "> 0 seconds");
}

double learning_rate(const std::string& schedule, double base, int64_t step, int64_t total, int64_t warmup) {
  if (warmup > 0 && step < warmup) return base * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (schedule == "constant" || total <= warmup) return base;
  const double t = std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(total - warmup));
  if (schedule == "linear") return base * (1.0 - t);
  return base * 0.5 * (1.0 + std::cos(M_PI * t));
}

void adamw_step(torch::Tensor& p, const torch::Tensor& g, torch::Tensor& m, torch::Tensor& v, int64_t step, double lr,
                double b1, double b2, double eps, double wd) {
  torch::NoGradGuard no_grad;
  p.mul_(1.0 - lr * wd);
  m.mul_(b1).add_(g, 1.0 - b1);
  v.mul_(b2).addcmul_(g, g, 1.0 - b2);
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step)), bc2 = 1.0 - std::pow(b2, static_cast<double>(step));
  auto denom = v.sqrt().div_(std::sqrt(bc2)).add_(eps);
  p.addcdiv_(m, denom, -lr / bc1);
}

FlatAdamW::FlatAdamW(std::vector<torch::Tensor> params) : params_(std::move(params)) {
  torch::NoGradGuard no_grad;
  bool uniform = !params_.empty();
  for (const auto& p : params_)
    uniform = uniform && p.scalar_type() == params_.front().scalar_type() && p.device() == params_.front().device();
  if (!uniform) {
    for (const auto& p : params_) m_.push_back(torch::zeros_like(p)), v_.push_back(torch::zeros_like(p));
    return;
  }
  constexpr int64_t kBucketElements = int64_t{1} << 18;  // a step's temporaries are about 2 buckets
  for (size_t i = 0; i < params_.size();) {
    Bucket b;
    b.begin = i;
    int64_t total = 0;
    do offsets_.push_back(total), total += params_[i++].numel();
    while (i < params_.size() && total + params_[i].numel() <= kBucketElements);
    b.end = i;
    const auto opt = params_[b.begin].options();
    b.p = torch::empty({total}, opt);
    b.m = torch::zeros({total}, opt);
    b.v = torch::zeros({total}, opt);
    for (size_t k = b.begin; k < b.end; ++k) {
      m_.push_back(b.m.narrow(0, offsets_[k], params_[k].numel()).view(params_[k].sizes()));
      v_.push_back(b.v.narrow(0, offsets_[k], params_[k].numel()).view(params_[k].sizes()));
    }
    rebind(b);  // copies each parameter into its slice and makes it a view of it
    buckets_.push_back(std::move(b));
  }
}

void FlatAdamW::rebind(const Bucket& b) {
  for (size_t i = b.begin; i < b.end; ++i) {
    auto& p = params_[i];
    auto slice = b.p.narrow(0, offsets_[i], p.numel());
    if (p.data_ptr() == slice.data_ptr() && p.is_contiguous() && p.numel() == slice.numel()) continue;
    slice.copy_(p.detach().reshape(-1));
    p.set_data(slice.view(p.sizes()));
  }
}

void FlatAdamW::step(const std::vector<torch::Tensor>& grads, int64_t step, double lr, double b1, double b2, double eps,
                     double wd) {
  if (grads.size() != params_.size())
    throw InvalidArgument("FlatAdamW::step: " + std::to_string(grads.size()) + " gradients for " +
                          std::to_string(params_.size()) + " parameters");
  if (buckets_.empty()) {
    for (size_t i = 0; i < params_.size(); ++i) adamw_step(params_[i], grads[i], m_[i], v_[i], step, lr, b1, b2, eps, wd);
    return;
  }
  torch::NoGradGuard no_grad;
  for (auto& b : buckets_) {
    rebind(b);
    std::vector<torch::Tensor> flat;
    for (size_t i = b.begin; i < b.end; ++i) flat.push_back(grads[i].reshape(-1));
    adamw_step(b.p, flat.size() == 1 ? flat.front() : torch::cat(flat), b.m, b.v, step, lr, b1, b2, eps, wd);
  }
}

EvalResult evaluate(Model& model, const std::string& spec, int64_t image_size, int64_t in_channels, int64_t batch_size,
                    int workers, dist::Group* group) {
  const auto d = load_for(spec, data::Split::Val, image_size, in_channels, workers);
  data::LoaderOptions lo;
  lo.batch_size = batch_size;
  lo.shuffle = false;
  lo.workers = workers;
  if (group) lo.shard_index = group->rank(), lo.shard_count = group->size();  // disjoint, unpadded: each sample once
  data::Loader loader(d, lo, 0);
  model.train(false);
  torch::NoGradGuard no_grad;
  EvalResult r;
  double loss = 0;
  int64_t correct = 0;
  const auto named = model.named_parameters();  // evaluate where the model is
  const torch::Device device = named.empty() ? torch::Device(torch::kCPU) : named.front().second.device();
  torch::Tensor x, y;
  while (loader.next(x, y)) {
    x = x.to(device);
    y = y.to(device);
    auto logits = model.forward(x);
    if (logits.dim() != 2)
      throw Error("model output has shape " + format_shape(logits.sizes().vec()) + ", expected [batch, classes] (hint: a classifier)");
    if (y.max().item<int64_t>() >= logits.size(1))
      throw Error("data '" + spec + "' has " + std::to_string(d.classes.size()) + " classes but the model outputs " +
                  std::to_string(logits.size(1)) + " (hint: --num-classes " + std::to_string(d.classes.size()) + ")");
    loss += torch::nn::functional::cross_entropy(logits.to(torch::kFloat32), y,
                                                torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)).item<double>();
    correct += logits.argmax(1).eq(y).sum().item<int64_t>();
    r.samples += y.size(0);
  }
  if (group) {
    auto totals = torch::tensor({loss, static_cast<double>(correct), static_cast<double>(r.samples)}, torch::kFloat64);
    group->allreduce_sum(totals);
    loss = totals[0].item<double>();
    correct = static_cast<int64_t>(totals[1].item<double>());
    r.samples = static_cast<int64_t>(totals[2].item<double>());
  }
  r.loss = loss / std::max<int64_t>(1, r.samples);
  r.top1 = static_cast<double>(correct) / std::max<int64_t>(1, r.samples);
  return r;
}

std::string svg_chart(const std::string& title, const std::string& x_label,
                      const std::vector<std::pair<std::string, std::vector<std::pair<double, double>>>>& series) {
  const double W = 640, H = 320, L = 60, R = 20, T = 30, B = 40;
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  for (const auto& [name, pts] : series)
    for (const auto& [x, y] : pts) {
      if (!std::isfinite(y)) continue;
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
    }
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W << " " << H
    << "\"><title>" << title << "</title><rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    << "<text x=\"" << W / 2 << "\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">" << title << "</text>";
  if (x0 > x1) return s.str() + "<text x=\"" + std::to_string(W / 2) + "\" y=\"160\" text-anchor=\"middle\">no data</text></svg>";
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) y1 = y0 + 1;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); };
  s << "<line x1=\"" << L << "\" y1=\"" << H - B << "\" x2=\"" << W - R << "\" y2=\"" << H - B << "\" stroke=\"black\"/>"
    << "<line x1=\"" << L << "\" y1=\"" << T << "\" x2=\"" << L << "\" y2=\"" << H - B << "\" stroke=\"black\"/>";
  char buf[64];
  for (int i = 0; i <= 4; ++i) {
    const double y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    std::snprintf(buf, sizeof buf, "%.3g", y);
    s << "<text x=\"" << L - 4 << "\" y=\"" << py(y) + 4 << "\" text-anchor=\"end\" font-size=\"10\">" << buf << "</text>";
    std::snprintf(buf, sizeof buf, "%.4g", x);
    s << "<text x=\"" << px(x) << "\" y=\"" << H - B + 14 << "\" text-anchor=\"middle\" font-size=\"10\">" << buf << "</text>";
  }
  s << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 8 << "\" text-anchor=\"middle\" font-size=\"11\">" << x_label << "</text>";
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"};
  for (size_t k = 0; k < series.size(); ++k) {
    const auto& pts = series[k].second;
    if (pts.empty()) continue;
    s << "<polyline fill=\"none\" stroke=\"" << colors[k % 5] << "\" stroke-width=\"1.5\" points=\"";
    for (const auto& [x, y] : pts)
      if (std::isfinite(y)) s << px(x) << "," << py(y) << " ";
    s << "\"/>";
    if (pts.size() == 1) s << "<circle cx=\"" << px(pts[0].first) << "\" cy=\"" << py(pts[0].second) << "\" r=\"3\" fill=\"" << colors[k % 5] << "\"/>";
    s << "<text x=\"" << W - R - 4 << "\" y=\"" << T + 14 * (k + 1) << "\" text-anchor=\"end\" font-size=\"11\" fill=\"" << colors[k % 5]
      << "\">" << series[k].first << "</text>";
  }
  s << "</svg>";
  return s.str();
}

InjectionReport prepare_model(Model& model, const TrainConfig& c) {
  InjectionReport report;
  if (c.num_classes > 0) model.set_num_classes(c.num_classes, c.seed);
  if (c.method == "flora" || c.method == "lora") {
    InjectOptions o;
    const bool flora = c.method == "flora";
    o.adapter = AdapterOptions().method(flora ? Method::Flora : Method::Lora).rank(c.rank).spatial_rank(c.spatial_rank)
                    .scale(c.scale).alpha(c.alpha).clip_ranks(true).conv_path(parse_conv_path(c.conv_path));
    if (flora) {
      o.adapter.core(parse_core_kind(c.core));
      // A CP rank may exceed a mode's size (it counts rank-1 terms); clipping would unequal the ranks.
      if (c.core != "full") o.adapter.allow_redundant_ranks(true);
    }
    if (flora && (!c.ranks.empty() || !c.identity.empty())) {
      const auto ranks = c.ranks;
      const auto identity = c.identity;
      o.per_layer = [ranks, identity](const TargetInfo& t, AdapterOptions& a) {
        if (!ranks.empty()) {
          std::vector<int64_t> r(t.shape.size());
          for (size_t n = 0; n < r.size(); ++n) r[n] = ranks[std::min(n, ranks.size() - 1)];
          a.ranks(r);
        }
        if (!identity.empty()) {
          std::vector<bool> id(t.shape.size(), false);
          for (auto m : identity)
            if (m < static_cast<int64_t>(id.size())) id[m] = true;
          a.identity_modes(id);
        }
      };
    }
    const std::string head = model.head_name();
    if (c.targets.empty() || c.targets == "all-conv") {  // every conv (and linear) layer but the head
      for (const auto& [name, layer] : model.layers()) {
        const auto kind = layer->target_info().kind;
        if ((kind == LayerKind::Conv || (kind == LayerKind::Linear && c.targets.empty())) && name != head) o.targets.names.push_back(name);
      }
      if (o.targets.names.empty())
        throw InvalidArgument("model '" + c.model + "' has no " + (c.targets.empty() ? "conv or linear" : "conv") +
                              " layer besides the head (hint: --targets)");
    } else if (c.targets == "all-linear") {
      o.targets.all_linear = true;
    } else if (c.targets.find_first_of("*[]()|^$\\+?") != std::string::npos) {
      o.targets.regex = c.targets;
    } else {
      o.targets.names = split_list(c.targets);
    }
    if (c.num_classes > 0) o.targets.exclude.push_back(head);
    report = model.inject(o);
  } else if (c.method == "full") {
    model.unfreeze_all();
  } else {  // frozen: only the head and the train modules below learn
    for (auto& [name, p] : model.named_parameters()) p.requires_grad_(false);
  }
  if (c.num_classes > 0) model.train_modules({model.head_name()});  // inject froze it; trained fully
  if (!c.train_modules.empty()) model.train_modules(c.train_modules);
  model.set_channels_last(use_channels_last(c));
  return report;
}

bool use_channels_last(const TrainConfig& c) {
  if (!one_of(c.memory_format, {"auto", "channels-last", "contiguous"}))
    bad_value("memory_format", c.memory_format, "auto, channels-last or contiguous");
  return c.memory_format == "channels-last" || (c.memory_format == "auto" && c.device == "cpu");
}

int run_training(const TrainConfig& c) {
  c.validate();
  const fs::path out = c.out, ckpt_dir = out / "checkpoints", ckpt = ckpt_dir / "last.safetensors";
  if (!c.resume && fs::exists(ckpt))
    throw InvalidArgument("run directory '" + c.out + "' already has a checkpoint (hint: --resume to continue it, or another --out)");
  const bool resuming = c.resume && fs::exists(ckpt);
  // From here on SIGINT/SIGTERM only set a flag: the loop checkpoints and stops at the next step.
  // (Set early: a data-parallel launcher may signal a worker that is still setting up.)
  auto previous_int = std::signal(SIGINT, on_signal);
  auto previous_term = std::signal(SIGTERM, on_signal);
  struct RestoreSignals {
    decltype(previous_int) a, b;
    ~RestoreSignals() {
      std::signal(SIGINT, a);
      std::signal(SIGTERM, b);
    }
  } restore_signals{previous_int, previous_term};
  g_stop = 0;
  // Data-parallel when launched so (torchrun, SLURM, --nproc): joined before the model is built,
  // so a bad launch fails fast. Rank 0 alone prints progress and writes files.
  const auto launch = dist::launch_from_env();
  std::unique_ptr<dist::Group> group;
  if (launch.world_size > 1) group = dist::Group::connect(launch, c.dist_timeout, c.device == "cuda" ? "nccl" : "gloo");
  const bool lead = launch.rank == 0;
  const int world = launch.world_size;
  if (c.resume && !resuming && lead) std::cerr << "flora: note: no checkpoint in '" << c.out << "'; starting a new run\n";

  // Model, adapters and data, all checked before the first step.
  torch::manual_seed(c.seed);
  auto model = open_model(c.model);
  if (!c.weights.empty()) {
    auto tensors = io::SafetensorsFile(c.weights).load_all();
    if (c.num_classes > 0) model->adopt_shapes(tensors, model->head_name() + ".");  // the head is replaced below
    model->load_state(tensors, /*strict=*/true);
  }
  const auto report = prepare_model(*model, c);
  if (!report.adapted.empty() && lead) std::cerr << report.format();
  const auto train_data = load_for(c.data, data::Split::Train, c.image_size, c.in_channels, c.workers);
  if (c.num_classes == 0 || c.num_classes < static_cast<int64_t>(train_data.classes.size())) {
    // the head must cover the labels: probe it once
    torch::NoGradGuard g;
    model->train(false);
    auto probe = model->forward((train_data.images.slice(0, 0, 1).to(torch::kFloat32) / 255.0));
    if (probe.dim() != 2 || probe.size(1) < static_cast<int64_t>(train_data.classes.size()))
      throw InvalidArgument("model output " + format_shape(probe.sizes().vec()) + " does not cover the " +
                            std::to_string(train_data.classes.size()) + " classes of '" + c.data + "' (hint: --num-classes " +
                            std::to_string(train_data.classes.size()) + ")");
  }
  // The device: CPU, or under data parallelism with --device cuda this rank's GPU (LOCAL_RANK).
  const torch::Device device = c.device == "cuda" ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(launch.local_rank))
                                                  : torch::Device(torch::kCPU);
  model->to(device);
  Optim opt;
  opt.params = model->trainable_parameters();
  if (opt.params.empty())
    throw InvalidArgument("nothing to train: method '" + c.method + "' with no adapters, head or train modules (hint: --num-classes K or --train-modules)");
  int64_t trainable = 0;
  {
    std::vector<torch::Tensor> tensors;
    for (auto& [n, p] : opt.params) tensors.push_back(p), trainable += p.numel();
    opt.adam = std::make_unique<FlatAdamW>(tensors);
  }
  int64_t all = 0;
  for (auto& [n, p] : model->named_parameters()) all += p.numel();
  for (auto& [n, p] : model->adapter_parameters()) all += p.numel();
  if (lead) std::cerr << nn::format_summary({trainable, all}) << "\n";

  std::unique_ptr<dist::GradientReducer> reducer;
  if (group) {
    std::vector<torch::Tensor> params;
    for (auto& [n, p] : opt.params) params.push_back(p);
    {
      torch::NoGradGuard g;
      group->broadcast(params);  // identical starting values on every rank, whatever their RNG did
    }
    reducer = std::make_unique<dist::GradientReducer>(*group, params);
    if (lead)
      std::fprintf(stderr, "flora: data-parallel: %d processes (%s, %s), global batch %lld; %lld bucket(s), %s bytes all-reduced per step (%.2f %% of the model's %s)\n",
                   world, group->backend().c_str(), launch.source == "slurm" ? "SLURM variables" : "RANK/WORLD_SIZE variables", (long long)(c.batch_size * c.grad_accum * world),
                   (long long)reducer->buckets(), format_count(reducer->bytes_per_step()).c_str(),
                   100.0 * static_cast<double>(trainable) / static_cast<double>(std::max<int64_t>(1, all)),
                   (format_count(all * 4) + " bytes").c_str());
  }

  if (lead) {
    fs::create_directories(ckpt_dir);
    io::atomic_write((out / "config.yaml").string(), c.to_yaml());
  }
  State st;
  if (resuming) {
    st = load_checkpoint(ckpt, opt, c, launch.rank, world);
    // drop metrics logged after the checkpoint (they will be logged again)
    std::ifstream in(out / "metrics.jsonl");
    std::string kept;
    for (std::string line; std::getline(in, line);) {
      auto j = json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.value("step", int64_t{0}) <= st.step) kept += line + "\n";
    }
    if (lead) {
      io::atomic_write((out / "metrics.jsonl").string(), kept);
      std::cerr << "flora: resuming '" << c.out << "' at step " << st.step << " (epoch " << st.epoch + 1 << ")\n";
    }
  } else if (lead) {
    io::atomic_write((out / "metrics.jsonl").string(), "");
  }

  data::LoaderOptions lo;
  lo.batch_size = c.batch_size;
  lo.shuffle = true;
  lo.augment = c.augment == "default";
  lo.seed = c.seed;
  lo.workers = c.workers;
  lo.shard_index = launch.rank;
  lo.shard_count = world;
  lo.pad_shards = world > 1;  // equal step counts on every rank
  const int64_t shard_size = (train_data.size() + world - 1) / world;
  const int64_t micro_per_epoch = (shard_size + c.batch_size - 1) / c.batch_size;
  const int64_t steps_per_epoch = std::max<int64_t>(1, micro_per_epoch / c.grad_accum);
  const int64_t total = c.steps > 0 ? c.steps : c.epochs * steps_per_epoch;
  const int64_t epochs = (total + steps_per_epoch - 1) / steps_per_epoch;
  const bool bf16 = c.precision == "bf16";
  struct RecomputeSwitch {  // the run's setting, and the caller's back afterwards
    bool before = flora::nn::recompute_inputs();
    explicit RecomputeSwitch(bool on) { flora::nn::set_recompute_inputs(on); }
    ~RecomputeSwitch() { flora::nn::set_recompute_inputs(before); }
  } recompute_switch(c.recompute_inputs);


  auto save_adapter_to = [&](const fs::path& dir) {
    if (!lead) return;
    if (c.method == "flora" || c.method == "lora") io::save_adapter(model->layers(), dir.string(), {"default", c.model});
    if (c.method == "full" || c.method == "frozen" || c.num_classes > 0 || !c.train_modules.empty()) {
      // fully trained tensors (head, train modules, or everything): PEFT's modules_to_save role
      std::vector<std::pair<std::string, torch::Tensor>> t;
      std::unordered_set<std::string> params;
      for (auto& [n, p] : model->named_parameters()) {
        params.insert(n);
        if (p.requires_grad()) t.emplace_back(n, p.detach());
      }
      if (c.update_batchnorm)  // the statistics were trained too: keep them with the weights
        for (auto& [n, b] : model->state_dict())
          if (!params.count(n)) t.emplace_back(n, b);
      fs::create_directories(dir);
      io::save_safetensors((dir / "trained_modules.safetensors").string(), t, {{"format", "pt"}});
    }
  };
  // With --update-batchnorm each rank's running statistics drift apart: as DDP does, rank 0's
  // are broadcast before they are used (evaluation) or saved.
  auto sync_buffers = [&] {
    if (!group || !c.update_batchnorm) return;
    std::unordered_set<std::string> params;
    for (auto& [n, p] : model->named_parameters()) params.insert(n);
    std::vector<torch::Tensor> buffers;
    for (auto& [n, b] : model->state_dict())
      if (!params.count(n)) buffers.push_back(b);
    torch::NoGradGuard g;
    group->broadcast(buffers);
  };
  auto evaluate_now = [&](int64_t epoch) {
    sync_buffers();
    if (c.val_data.empty()) return;
    empty_cpu_cache();  // evaluation's tensor sizes are not training's: start it without their blocks
    const auto r = evaluate(*model, c.val_data, c.image_size, c.in_channels, c.batch_size, c.workers, group.get());
    if (lead) {
      append_line(out / "metrics.jsonl", {{"type", "eval"}, {"step", st.step}, {"epoch", epoch + 1}, {"eval_loss", r.loss},
                                          {"top1", r.top1}, {"samples", r.samples}});
      std::fprintf(stderr, "eval epoch %lld step %lld: loss %.4f top-1 %.2f %%\n", (long long)epoch + 1, (long long)st.step, r.loss,
                   100 * r.top1);
    }
    if (r.top1 > st.best_top1) {
      st.best_top1 = r.top1;
      st.best_step = st.step;
      save_adapter_to(out / "best");
    }
  };

  // A signal during setup stops before any step (nothing to checkpoint). With several ranks the
  // first step's control all-reduce decides instead, so that they all stop together.
  if (g_stop && !group) {
    std::cerr << "flora: " << (g_stop == SIGTERM ? "terminated" : "interrupted") << " during setup; no step was taken\n";
    return 130;
  }
  Progress progress(total, c.log_every, static_cast<double>(c.batch_size * c.grad_accum * world), lead);
  double window_loss = 0, window_images = 0, step_loss = 0, step_images = 0;
  auto window_start = std::chrono::steady_clock::now();
  for (int64_t epoch = st.epoch; epoch < epochs && st.step < total; ++epoch) {
    data::Loader loader(train_data, lo, epoch, epoch == st.epoch ? st.batch : 0);
    model->train(true, c.update_batchnorm);
    empty_cpu_cache();  // nor setup's or evaluation's blocks: the peak is the training step's
    torch::Tensor x, y;
    int64_t micro = epoch == st.epoch ? st.batch : 0;
    while (st.step < total && loader.next(x, y)) {
      x = x.to(device);
      y = y.to(device);
      torch::Tensor loss;
      {
        Autocast ac(bf16);
        loss = torch::nn::functional::cross_entropy(model->forward(x).to(torch::kFloat32), y);
      }
      const double value = loss.item<double>();
      if (!std::isfinite(value)) {
        progress.newline();
        throw Error("loss is " + std::string(std::isnan(value) ? "NaN" : "infinite") + " at step " + std::to_string(st.step + 1) +
                    " (epoch " + std::to_string(epoch + 1) + "); stopped, the last good checkpoint is '" + ckpt.string() +
                    "' (hint: lower --lr, or --clip-grad)");
      }
      const bool ends_step = (micro + 1) % c.grad_accum == 0 || micro + 1 >= micro_per_epoch;
      if (reducer && ends_step) reducer->arm();  // its hooks start the all-reduce during this backward
      (loss / static_cast<double>(c.grad_accum)).backward();
      step_loss += value * y.size(0);
      step_images += y.size(0);
      ++micro;
      if (!ends_step) continue;
      // one optimizer step
      bool stop = g_stop != 0;
      if (reducer) {  // average the gradients; agree on stopping; the global loss for the log
        auto control = torch::tensor({stop ? 1.0 : 0.0, step_loss, step_images}, torch::kFloat64);
        reducer->finish(control);
        stop = control[0].item<double>() > 0;
        step_loss = control[1].item<double>();
        step_images = control[2].item<double>();
      }
      window_loss += step_loss;
      window_images += step_images;
      step_loss = step_images = 0;
      std::vector<torch::Tensor> grads;
      for (auto& [n, p] : opt.params) grads.push_back(p.grad().defined() ? p.grad() : torch::zeros_like(p));
      if (c.clip_grad > 0) {
        auto norm2 = torch::zeros({}, grads.front().options().dtype(torch::kFloat64));
        for (auto& g : grads) norm2 += g.pow(2).sum().to(torch::kFloat64);
        const double norm = std::sqrt(norm2.item<double>());
        if (norm > c.clip_grad)
          for (auto& g : grads) g.mul_(c.clip_grad / (norm + 1e-6));
      }
      const double lr = learning_rate(c.schedule, c.lr, st.step, total, c.warmup_steps);
      opt.adam->step(grads, st.step + 1, lr, 0.9, 0.999, 1e-8, c.weight_decay);
      for (auto& [n, p] : opt.params) p.mutable_grad() = torch::Tensor();
      ++st.step;
      st.batch = micro;
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - window_start).count();
      const double rate = window_images / std::max(secs, 1e-9);  // all ranks' images
      progress.update(st.step, epoch, epochs, window_loss / std::max(1.0, window_images), rate);
      if (st.step % c.log_every == 0 || st.step == total) {
        json line{{"type", "train"}, {"step", st.step}, {"epoch", epoch + 1}, {"loss", window_loss / window_images},
                  {"lr", lr}, {"images_per_s", rate}, {"loader_wait_s", loader.wait_seconds()}};
        if (reducer) line["allreduce_bytes_per_step"] = reducer->bytes_per_step(), line["processes"] = world;
        if (lead) append_line(out / "metrics.jsonl", line);
        window_loss = window_images = 0;
        window_start = std::chrono::steady_clock::now();
      }
      const bool epoch_end = micro >= micro_per_epoch;
      if (stop || (c.checkpoint_every > 0 && st.step % c.checkpoint_every == 0)) {
        State s = st;
        if (epoch_end) s.epoch = epoch + 1, s.batch = 0;
        else s.epoch = epoch;
        const auto rng = rng_states(group.get());
        if (lead) save_checkpoint(ckpt, opt, s, c, rng);
      }
      if (stop) {
        progress.newline();
        if (lead)
          std::cerr << "flora: " << (g_stop == SIGTERM ? "terminated" : "interrupted") << " at step " << st.step
                    << "; checkpoint saved to '" << ckpt.string() << "' (resume with --resume)\n";
        if (group) group->barrier();  // the checkpoint is complete before any rank exits
        return 130;
      }
    }
    if (micro >= micro_per_epoch) {  // the epoch is complete
      st.epoch = epoch + 1;
      st.batch = 0;
    } else {  // stopped by --steps inside the epoch: a longer resumed run continues from here
      st.epoch = epoch;
      st.batch = micro;
    }
    evaluate_now(epoch);
    const auto rng = rng_states(group.get());
    if (lead) save_checkpoint(ckpt, opt, st, c, rng);
  }
  sync_buffers();
  save_adapter_to(out / "adapter");
  if (group) group->barrier();  // every file is written before any rank reports success
  if (!lead) return 0;
  write_report(out, c);
  std::cerr << "flora: done: " << st.step << " steps; adapter in '" << (out / "adapter").string() << "'"
            << (st.best_step >= 0 ? ", best top-1 " + std::to_string(100 * st.best_top1) + " % at step " + std::to_string(st.best_step) : "")
            << "\n";
  return 0;
}

}  // namespace train
}  // namespace flora

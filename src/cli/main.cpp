// The `flora` command line. Every subcommand is one row of kCommands: its flags are declared on
// a CLI11 app (which also generates --help), and it returns an exit code.
// Exit codes: 0 success, 1 runtime error, 2 usage error (bad flag or value). Errors print one
// line on stderr.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <numeric>
#include <tuple>

#include "flora/flora.h"
#include "flora/io/safetensors.h"
#include "flora/train.h"
#include "commands.h"

namespace {

int g_threads_flag = 0;  // --threads, for doctor

using flora::format_count;
using flora::format_shape;

// ---------------------------------------------------------------------------------------------
// flora params

struct ParamsArgs {
  std::vector<int64_t> shape;
  std::string method = "flora";
  std::vector<int64_t> ranks;
  int64_t rank = 8;
  int64_t spatial_rank = 2;
  std::string kind = "auto";
  int64_t groups = 1;
  std::vector<int64_t> identity;
  std::string core = "full";
  bool json = false;
};

flora::LayerKind parse_kind(const std::string& kind, size_t order) {
  if (kind == "auto") return order == 2 ? flora::LayerKind::Linear : order >= 3 && order <= 5 ? flora::LayerKind::Conv : flora::LayerKind::Parameter;
  if (kind == "linear") return flora::LayerKind::Linear;
  if (kind == "conv") return flora::LayerKind::Conv;
  if (kind == "embedding") return flora::LayerKind::Embedding;
  if (kind == "param") return flora::LayerKind::Parameter;
  throw flora::InvalidArgument("unknown --kind '" + kind + "', expected auto, linear, conv, embedding or param");
}

int run_params(const ParamsArgs& a) {
  flora::TargetInfo t{"--shape", parse_kind(a.kind, a.shape.size()), a.shape, a.groups};
  flora::AdapterOptions o;
  o.method(flora::parse_method(a.method)).rank(a.rank).spatial_rank(a.spatial_rank).ranks(a.ranks)
      .core(flora::parse_core_kind(a.core));
  if (!a.identity.empty()) {
    std::vector<bool> id(a.shape.size(), false);
    for (int64_t n : a.identity) {
      if (n < 0 || n >= static_cast<int64_t>(a.shape.size()))
        throw flora::InvalidArgument("--identity mode " + std::to_string(n) + " is out of range for shape " +
                                     format_shape(a.shape) + " (expected 0.." + std::to_string(a.shape.size() - 1) + ")");
      id[n] = true;
    }
    o.identity_modes(id);
  }
  const auto spec = flora::resolve_spec(o, t);
  const int64_t trainable = flora::parameter_count(spec);
  const int64_t lora_rank = spec.ranks[0];  // LoRA: its rank; FLoRA: compare at the output-channel rank
  const int64_t lora = flora::lora_parameter_count(a.shape, lora_rank);
  int64_t core_params = 1;
  for (auto d : spec.core_param_shape()) core_params *= d;
  if (spec.core == flora::CoreKind::Identity) core_params = 0;
  std::vector<int64_t> factor_params;
  for (size_t n = 0; n < spec.ranks.size(); ++n)
    factor_params.push_back(spec.identity[n] ? 0 : a.shape[n] * spec.ranks[n]);

  if (a.json) {
    nlohmann::json j = {{"method", flora::to_string(spec.method)},
                        {"kind", flora::to_string(t.kind)},
                        {"shape", a.shape},
                        {"groups", a.groups},
                        {"ranks", spec.ranks},
                        {"identity", spec.identity},
                        {"core", flora::to_string(spec.core)},
                        {"trainable", trainable},
                        {"core_params", core_params},
                        {"factor_params", factor_params},
                        {"lora_rank", lora_rank},
                        {"lora_trainable", lora},
                        {"notes", spec.notes}};
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::cout << (spec.method == flora::Method::Flora ? "FLoRA" : "LoRA (PEFT layout)") << " adapter for a "
            << flora::to_string(t.kind) << " weight " << format_shape(a.shape) << "\n";
  std::cout << "  ranks " << format_shape(spec.ranks) << ": core " << format_count(core_params) << " + factors";
  for (size_t n = 0; n < factor_params.size(); ++n)
    if (!spec.identity[n]) std::cout << " " << format_count(factor_params[n]);
  std::cout << "\n";
  for (auto& note : spec.notes) std::cout << "  note: " << note << "\n";
  std::cout << "trainable params: " << format_count(trainable) << "\n";
  if (spec.method == flora::Method::Flora) {
    const double pct = 100.0 * static_cast<double>(trainable) / static_cast<double>(lora);
    std::printf("  LoRA (PEFT layout) at r=%lld: %s; FLoRA is %.2f %% of it (%+.2f %%)\n",
                static_cast<long long>(lora_rank), format_count(lora).c_str(), pct, pct - 100.0);
  }
  return 0;
}

void add_params(CLI::App& app, std::function<int()>& run) {
  auto a = std::make_shared<ParamsArgs>();
  auto* c = app.add_subcommand("params", "Count an adapter's trainable parameters for one weight shape");
  c->add_option("--shape", a->shape, "Weight shape in its own order, e.g. 512,256,3,3 ([out, in/groups, k...])")
      ->required()->delimiter(',');
  c->add_option("--method", a->method, "flora or lora (PEFT layout)")->capture_default_str();
  c->add_option("--ranks", a->ranks, "FLoRA: one rank per mode, e.g. 32,32,2,2")->delimiter(',');
  c->add_option("--rank", a->rank, "LoRA rank; FLoRA rank of every channel mode without --ranks")->capture_default_str();
  c->add_option("--spatial-rank", a->spatial_rank, "FLoRA rank of kernel modes without --ranks")->capture_default_str();
  c->add_option("--kind", a->kind, "auto (2-D linear, 3..5-D conv), linear, conv, embedding, param")->capture_default_str();
  c->add_option("--groups", a->groups, "Conv groups (the shape's second mode is already in/groups)")->capture_default_str();
  c->add_option("--identity", a->identity, "FLoRA: modes with no factor, e.g. 2,3 for Tucker-2")->delimiter(',');
  c->add_option("--core", a->core, "FLoRA core: full, diagonal (cp) or identity")->capture_default_str();
  c->add_flag("--json", a->json, "Print one JSON object");
  c->callback([a, &run] { run = [a] { return run_params(*a); }; });
}

// ---------------------------------------------------------------------------------------------
// flora doctor

std::string loaded_blas() {
  std::ifstream maps("/proc/self/maps");
  std::string line, found;
  while (std::getline(maps, line)) {
    auto pos = line.find('/');
    if (pos == std::string::npos) continue;
    std::string path = line.substr(pos);
    if (path.find("blas") != std::string::npos || path.find("mkl") != std::string::npos) {
      found = path;
      break;
    }
  }
  return found.empty() ? "unknown" : found;
}

int run_doctor() {
  std::cout << "flora " << flora::version() << "\n";
  std::cout << "LibTorch " << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "." << TORCH_VERSION_PATCH << "\n";
  std::cout << "threads: " << at::get_num_threads() << " (from "
            << (g_threads_flag > 0 ? std::string("--threads") : flora::default_threads().source) << "; hardware "
            << std::thread::hardware_concurrency() << ")\n";
  std::cout << "oneDNN (mkldnn): " << (at::hasMKLDNN() ? "yes" : "no") << "\n";
  std::cout << "flora's loops: " << (flora::parallel_loops() ? "on LibTorch's threads (OpenMP)" : "one thread (built without OpenMP)")
            << "; " << (flora::avx512_kernels() ? "AVX2 + FMA kernels, AVX-512 for the narrow GEMMs"
                        : flora::avx2_kernels() ? "AVX2 + FMA kernels"
                                                : "portable kernels (no AVX2 + FMA, or FLORA_NO_AVX2 set)")
            << "\n";
  const auto cache = flora::cpu_cache_stats();
  if (cache.limit_bytes > 0)
    std::cout << "CPU block cache: on, up to " << (cache.limit_bytes >> 20) << " MB cached (FLORA_CPU_CACHE_MB=0 turns it off)\n";
  else
    std::cout << "CPU block cache: off (glibc malloc; FLORA_CPU_CACHE_MB unset or > 0 turns it on)\n";
  const int64_t n = 1024;
  auto a = torch::randn({n, n});
  a.mm(a);  // warm up (loads the BLAS)
  std::cout << "BLAS library: " << loaded_blas() << "\n";
  if (flora::blas_threads() > 0) {
    const std::string how = flora::blas_threading();
    std::cout << "BLAS threads: " << flora::blas_threads() << " (set with the intra-op threads; "
              << (how == "openmp" ? "OpenMP, sharing LibTorch's threads" : how) << ")\n";
    if (how == "pthreads" && at::get_num_threads() > 1)
      std::cout << "warning: OpenBLAS's pthreads build competes with LibTorch's OpenMP threads; GEMM-heavy models "
                   "train up to 5x slower at more than 1 thread (hint: apt-get install libopenblas0-openmp and rebuild, "
                   "or run with OMP_WAIT_POLICY=PASSIVE)\n";
  }
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    auto c = a.mm(a);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  const double gflops = 2.0 * n * n * n / best / 1e9;
  std::printf("GEMM %lldx%lldx%lld float32: %.1f GFLOP/s\n", (long long)n, (long long)n, (long long)n, gflops);
  if (gflops < 20.0)
    std::cout << "warning: GEMM is slow; the reference BLAS may be in use (hint: apt-get install libopenblas0-openmp)\n";
  const bool cuda = torch::cuda::is_available();
  std::cout << "CUDA: " << (cuda ? std::to_string(torch::cuda::device_count()) + " device(s)" : "not available") << "\n";
  return 0;
}

void add_doctor(CLI::App& app, std::function<int()>& run) {
  auto* c = app.add_subcommand("doctor", "Report LibTorch, BLAS speed, threads, flora's loops (OpenMP, AVX2), the CPU block cache and CUDA devices");
  c->callback([&run] { run = run_doctor; });
}

// ---------------------------------------------------------------------------------------------
// flora inspect

struct InspectArgs {
  std::string path, model;
  std::vector<std::string> plan;  // key=value of the train config: method, ranks, rank, ...
  bool json = false;
};

int run_inspect(const InspectArgs& a) {
  const std::string& path = a.path;
  const bool json = a.json;
  if (!a.model.empty() || !a.plan.empty()) {
    if (!path.empty()) throw flora::InvalidArgument("inspect takes a PATH or --model, not both");
    if (a.model.empty()) throw flora::InvalidArgument("--method, --ranks, --rank, ... need --model");
    if (a.plan.empty()) return flora::cli::inspect_model(a.model, nullptr, json);
    auto config = flora::train::load_config("", a.plan);
    config.model = a.model;
    return flora::cli::inspect_model(a.model, &config, json);
  }
  if (path.empty()) throw flora::InvalidArgument("inspect needs a PATH or --model (hint: flora inspect --help)");
  if (std::filesystem::is_directory(path)) return flora::cli::inspect_adapter(path, json);
  const bool is_safetensors = path.size() >= 12 && path.compare(path.size() - 12, 12, ".safetensors") == 0;
  const bool is_script = path.size() >= 3 && path.compare(path.size() - 3, 3, ".pt") == 0;
  if (is_script) return flora::cli::inspect_model(path, nullptr, json);
  if (!is_safetensors)
    throw flora::InvalidArgument("inspect reads a .safetensors file, an adapter directory or a TorchScript .pt model; '" +
                                 path + "' is none of these");
  flora::io::SafetensorsFile f(path);
  int64_t total = 0;
  uint64_t bytes = 0;
  for (const auto& t : f.tensors()) {
    total += t.numel();
    bytes += t.end - t.begin;
  }
  if (json) {
    nlohmann::json j = {{"file", path}, {"metadata", f.metadata()}, {"tensors", nlohmann::json::array()},
                        {"total_params", total}, {"total_bytes", bytes}};
    for (const auto& t : f.tensors())
      j["tensors"].push_back({{"name", t.name}, {"dtype", t.dtype}, {"shape", t.shape}, {"count", t.numel()}});
    std::cout << j.dump() << "\n";
    return 0;
  }
  size_t width = 4;
  for (const auto& t : f.tensors()) width = std::max(width, t.name.size());
  std::printf("%-*s  %-6s  %-22s %14s\n", static_cast<int>(width), "name", "dtype", "shape", "count");
  for (const auto& t : f.tensors())
    std::printf("%-*s  %-6s  %-22s %14s\n", static_cast<int>(width), t.name.c_str(), t.dtype.c_str(),
                format_shape(t.shape).c_str(), format_count(t.numel()).c_str());
  std::printf("%zu tensors, %s parameters, %s bytes\n", f.tensors().size(), format_count(total).c_str(),
              format_count(static_cast<int64_t>(bytes)).c_str());
  for (const auto& [k, v] : f.metadata()) std::printf("metadata %s = %s\n", k.c_str(), v.c_str());
  return 0;
}

void add_inspect(CLI::App& app, std::function<int()>& run) {
  auto a = std::make_shared<InspectArgs>();
  auto* c = app.add_subcommand("inspect", "List the tensors of a .safetensors file, an adapter directory's modules, or a "
                                          "model's parameters; with --model and --method, what each layer would get");
  c->add_option("path", a->path, "FILE.safetensors, ADAPTER_DIR or MODEL.pt");
  c->add_option("--model", a->model, "Architecture name or TorchScript model (.pt)");
  // the plan: the same keys as flora train
  for (const auto& [flag, key, help] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"--method", "method", "flora, lora, full or frozen"},
           {"--ranks", "ranks", "FLoRA ranks per mode, e.g. 16,16,2,2"},
           {"--rank", "rank", "LoRA rank, or FLoRA's rank for every channel mode"},
           {"--spatial-rank", "spatial_rank", "FLoRA rank of kernel modes without --ranks"},
           {"--scale", "scale", "FLoRA scale s"},
           {"--alpha", "alpha", "LoRA alpha"},
           {"--core", "core", "FLoRA core: full, diagonal (cp) or identity"},
           {"--identity", "identity", "FLoRA modes with no factor, e.g. 2,3 (Tucker-2)"},
           {"--targets", "targets", "Modules: names / dotted suffixes, a regex, all-linear or all-conv"},
           {"--num-classes", "num_classes", "New head with K classes"}}) {
    c->add_option_function<std::string>(flag, [a, key = key](const std::string& v) { a->plan.push_back(key + "=" + v); }, help);
  }
  c->add_flag("--json", a->json, "Print one JSON object");
  c->callback([a, &run] { run = [a] { return run_inspect(*a); }; });
}

// ---------------------------------------------------------------------------------------------

using Adder = void (*)(CLI::App&, std::function<int()>&);
const Adder kCommands[] = {flora::cli::add_train_commands, add_params, add_inspect, flora::cli::add_adapter_commands, add_doctor, flora::cli::add_demo, flora::cli::add_bench};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flora: FLoRA (Tucker-decomposed) and LoRA fine-tuning for LibTorch models", "flora"};
  app.set_version_flag("--version", flora::version());
  int threads = 0;
  app.add_option("--threads", threads, "Intra-op threads (default: OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK, else the CPUs this process may use)")
      ->check(CLI::Range(1, 1 << 16));
  app.require_subcommand(1);
  std::function<int()> run;
  for (auto add : kCommands) add(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    g_threads_flag = threads;
    flora::configure_threads(threads);
    flora::configure_allocator();
    return run ? run() : 2;
  } catch (const flora::InvalidArgument& e) {
    std::cerr << "flora: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "flora: error: " << e.what() << "\n";
    return 1;
  }
}

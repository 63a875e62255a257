// Layer benchmark: one training step (forward + backward) of an adapted layer against the frozen
// base layer (forward + input gradient only: the floor any adapter method pays).
//
//   build/bin/flora_bench [--benchmark_min_time=0.5] [--benchmark_filter=conv]
//
// After Google Benchmark's table, a second table gives each variant's time as a ratio to the
// frozen layer of the same shape, measured in the same run. Method: docs/PERFORMANCE.md.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>

#include "flora/flora.h"

namespace {

enum class Variant { Frozen, Full, FloraAuto, FloraMerged, FloraFactorized, FloraChain, FloraHybrid, FloraSeparable, Lora };
const char* variant_name(Variant v) {
  switch (v) {
    case Variant::Frozen: return "frozen";
    case Variant::Full: return "full";
    case Variant::FloraAuto: return "flora_auto";
    case Variant::FloraMerged: return "flora_merged";
    case Variant::FloraFactorized: return "flora_factorized";
    case Variant::FloraChain: return "flora_chain";
    case Variant::FloraHybrid: return "flora_hybrid";
    case Variant::FloraSeparable: return "flora_separable";
    case Variant::Lora: return "lora_r16";
  }
  return "?";
}

struct ConvShape {
  int64_t channels, pixels;
};
const ConvShape kConvShapes[] = {{64, 56}, {128, 28}, {256, 14}, {512, 7}};
// ResNet-18's 3x3 convs at 64x64 images (the whole-model table's size, `flora bench step`).
const ConvShape kSmallConvShapes[] = {{64, 16}, {128, 8}, {256, 4}, {512, 2}};
// ConvNeXt-tiny's depthwise 7x7 convs at 64x64 images (stages 1-4).
const ConvShape kDepthwiseShapes[] = {{96, 16}, {192, 8}, {384, 4}, {768, 2}};
// ConvNeXt-tiny's stem and downsampling convs at 64x64 images: kernel = stride, no padding.
struct PatchShape {
  int64_t in, out, kernel, pixels;
};
const PatchShape kPatchShapes[] = {{3, 96, 4, 64}, {96, 192, 2, 16}, {192, 384, 2, 8}, {384, 768, 2, 4}};
const int64_t kBatch = 16;

// Sets the layer up for `v`: frozen weights, an adapter, or fully trainable weights.
void prepare(flora::nn::AdaptableLayer& layer, Variant v, std::vector<int64_t> flora_ranks) {
  switch (v) {
    case Variant::Frozen: layer.weight.requires_grad_(false); if (layer.bias.defined()) layer.bias.requires_grad_(false); break;
    case Variant::Full: break;
    case Variant::Lora: layer.add_adapter("a", flora::AdapterOptions().method(flora::Method::Lora).rank(16).alpha(16)); break;
    default: {
      auto path = v == Variant::FloraMerged       ? flora::ConvPath::Merged
                  : v == Variant::FloraFactorized || v == Variant::FloraChain ? flora::ConvPath::Factorized
                  : v == Variant::FloraSeparable  ? flora::ConvPath::Separable
                  : v == Variant::FloraHybrid     ? flora::ConvPath::Hybrid
                                                  : flora::ConvPath::Auto;
      auto a = layer.add_adapter("a", flora::AdapterOptions().ranks(flora_ranks).clip_ranks(true).conv_path(path));
      torch::NoGradGuard g;
      a->core_parameter().normal_(0, 0.1);  // a trained-looking core (the zero init is a special case)
    }
  }
}

// Times `step` against `frozen_step` interleaved (frozen, variant, frozen, variant, ...), so
// that machine drift hits both alike; reports the variant's time and the median per-round ratio.
template <typename Step, typename FrozenStep>
void interleaved(benchmark::State& state, Step step, FrozenStep frozen_step) {
  using clock = std::chrono::steady_clock;
  for (int i = 0; i < 2; ++i) {  // warm-up: oneDNN builds its primitives on first use
    step();
    frozen_step();
  }
  std::vector<double> ratios;
  for (auto _ : state) {
    auto t0 = clock::now();
    frozen_step();
    auto t1 = clock::now();
    step();
    auto t2 = clock::now();
    const double frozen = std::chrono::duration<double>(t1 - t0).count();
    const double variant = std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(variant);
    ratios.push_back(variant / frozen);
  }
  std::sort(ratios.begin(), ratios.end());
  state.counters["x_frozen"] = ratios[ratios.size() / 2];
}

template <typename Layer>
auto training_step(Layer& layer, const torch::Tensor& x, const torch::Tensor& gy) {
  return [&layer, x, gy]() mutable {
    auto y = layer(x);
    y.backward(gy);
    x.mutable_grad() = torch::Tensor();
    for (auto& p : layer->parameters()) p.mutable_grad() = torch::Tensor();
  };
}

// channels_last: input, output gradient and both layers' weights in NHWC (torch.channels_last),
// for the frozen layer as for the adapted one.
void conv_step(benchmark::State& state, torch::nn::Conv2dOptions opt, int64_t pixels, Variant v, bool channels_last) {
  torch::manual_seed(0);
  const bool depthwise = opt.groups() > 1;
  flora::nn::Conv2d conv(opt), frozen(opt);
  const auto format = channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
  for (auto* layer : {conv.get(), frozen.get()}) {
    torch::NoGradGuard g;
    layer->weight.set_data(layer->weight.contiguous(format));
  }
  prepare(*conv, v, {16, depthwise ? 1 : 16, 2, 2});
  prepare(*frozen, Variant::Frozen, {});
  auto x = torch::randn({kBatch, opt.in_channels(), pixels, pixels}).contiguous(format).requires_grad_(true);
  auto gy = frozen(x).detach().normal_().contiguous(format);
  if (v == Variant::FloraChain) {  // the factorized path as its op chain, never the fused node
    namespace F = flora::functional;
    auto a = conv->adapter();
    auto chain = [&conv, a, x, gy]() mutable {
      const auto& geo = conv->geometry();
      auto y = F::conv_nd(x, conv->weight, conv->bias, geo) + F::conv_branch(x, a->core(), a->factors(), a->scale(), geo);
      y.backward(gy);
      x.mutable_grad() = torch::Tensor();
      for (auto& p : conv->parameters()) p.mutable_grad() = torch::Tensor();
    };
    interleaved(state, chain, training_step(frozen, x, gy));
    return;
  }
  interleaved(state, training_step(conv, x, gy), training_step(frozen, x, gy));
  if (v == Variant::FloraAuto) state.SetLabel(flora::to_string(conv->last_path()));
}

void linear_step(benchmark::State& state, int64_t features, Variant v) {
  torch::manual_seed(0);
  flora::nn::Linear fc(features, features), frozen(features, features);
  prepare(*fc, v, {16, 16});
  prepare(*frozen, Variant::Frozen, {});
  auto x = torch::randn({kBatch * 64, features}).requires_grad_(true);
  auto gy = torch::randn({kBatch * 64, features});
  interleaved(state, training_step(fc, x, gy), training_step(frozen, x, gy));
}

// Records each benchmark's time, then prints ratios to the frozen variant of the same shape.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const auto& r : runs) {
      // With --benchmark_repetitions, only the median aggregate is used for ratios.
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name != "median") continue;
      std::string name = r.run_name.function_name;
      auto it = r.counters.find("x_frozen");
      if (it != r.counters.end()) ratios_[name] = it->second;
    }
  }
  void Finalize() override {
    ConsoleReporter::Finalize();
    std::printf("\nStep time / frozen step time (median of interleaved rounds; same run):\n");
    std::map<std::string, std::map<std::string, double>> table;
    for (const auto& [name, ratio] : ratios_) {
      const auto slash = name.rfind('/');
      table[name.substr(0, slash)][name.substr(slash + 1)] = ratio;
    }
    std::printf("%-28s", "shape");
    for (auto v : kShown) std::printf(" %17s", variant_name(v));
    std::printf("\n");
    for (const auto& [shape, row] : table) {
      std::printf("%-28s", shape.c_str());
      for (auto v : kShown) {
        auto it = row.find(variant_name(v));
        if (it == row.end()) std::printf(" %17s", "-");
        else std::printf(" %16.2fx", it->second);
      }
      std::printf("\n");
    }
  }

 private:
  static constexpr Variant kShown[] = {Variant::FloraAuto, Variant::FloraMerged, Variant::FloraFactorized,
                                       Variant::FloraChain, Variant::FloraHybrid, Variant::FloraSeparable, Variant::Lora, Variant::Full};
  std::map<std::string, double> ratios_;
};

}  // namespace

int main(int argc, char** argv) {
  flora::configure_threads();
  flora::configure_allocator();  // as the flora command does (FLORA_MALLOC_TUNING=0 to compare without)
  const Variant all[] = {Variant::FloraAuto, Variant::FloraMerged, Variant::FloraFactorized, Variant::FloraChain,
                         Variant::FloraHybrid, Variant::Lora, Variant::Full};
  auto add = [](const std::string& name, torch::nn::Conv2dOptions opt, int64_t pixels, Variant v, bool cl) {
    benchmark::RegisterBenchmark(name.c_str(), conv_step, opt, pixels, v, cl)->Unit(benchmark::kMillisecond)->UseManualTime();
  };
  for (const auto* shapes : {&kConvShapes, &kSmallConvShapes})
    for (const auto& s : *shapes)
      for (auto v : all)
        for (bool cl : {false, true})
          add("conv3x3_c" + std::to_string(s.channels) + "_p" + std::to_string(s.pixels) + "_b16" + (cl ? "_nhwc/" : "/") +
                  variant_name(v),
              torch::nn::Conv2dOptions(s.channels, s.channels, 3).padding(1).bias(false), s.pixels, v, cl);
  for (const auto& s : kDepthwiseShapes)
    for (auto v : {Variant::FloraAuto, Variant::FloraMerged, Variant::FloraSeparable, Variant::Lora})
      for (bool cl : {false, true})
        add("dw7x7_c" + std::to_string(s.channels) + "_p" + std::to_string(s.pixels) + "_b16" + (cl ? "_nhwc/" : "/") +
                variant_name(v),
            torch::nn::Conv2dOptions(s.channels, s.channels, 7).padding(3).groups(s.channels), s.pixels, v, cl);
  for (const auto& s : kPatchShapes)
    for (auto v : all)
      add("patch" + std::to_string(s.kernel) + "_c" + std::to_string(s.in) + "to" + std::to_string(s.out) + "_p" +
              std::to_string(s.pixels) + "_b16_nhwc/" + variant_name(v),
          torch::nn::Conv2dOptions(s.in, s.out, s.kernel).stride(s.kernel), s.pixels, v, true);
  for (int64_t f : {768, 2048})
    for (auto v : {Variant::FloraAuto, Variant::Lora, Variant::Full}) {
      const std::string name = "linear_" + std::to_string(f) + "_tokens1024/" + variant_name(v);
      benchmark::RegisterBenchmark(name.c_str(), linear_step, f, v)->Unit(benchmark::kMillisecond)->UseManualTime();
    }
  benchmark::Initialize(&argc, argv);
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}

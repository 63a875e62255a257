// `flora demo`: a self-contained example of the library on one convolution.
// A frozen Conv2d W0 must learn to imitate a "teacher" conv W0 + dW*, where dW* is an unknown
// update of Tucker rank [8, 8, 2, 2]. FLoRA, LoRA at the same rank and LoRA at FLoRA's parameter
// count are trained on the same random inputs; the table shows how close each gets.
#include <torch/torch.h>

#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>

#include "commands.h"
#include "flora/flora.h"

namespace flora {
namespace cli {
namespace {

struct DemoArgs {
  int steps = 300;
  int64_t seed = 0;
};

struct Row {
  std::string name;
  int64_t params;
  double mse0, mse;
  double step_ms;
  double merge_err;
};

Row train_one(const std::string& name, const AdapterOptions& opt, const torch::Tensor& w0,
              const torch::Tensor& teacher_w, int steps, int64_t seed) {
  torch::manual_seed(seed);
  nn::Conv2d conv(torch::nn::Conv2dOptions(w0.size(1), w0.size(0), 3).padding(1).bias(false));
  {
    torch::NoGradGuard g;
    conv->weight.copy_(w0);
  }
  conv->add_adapter("default", opt);
  std::vector<torch::Tensor> params;
  for (auto& p : conv->parameters())
    if (p.requires_grad()) params.push_back(p);
  torch::optim::AdamW optim(params, torch::optim::AdamWOptions(1e-2).weight_decay(0.0));
  functional::ConvGeometry geo{{1, 1}, {1, 1}, {1, 1}, 1, functional::PaddingMode::Zeros};
  auto loss_on = [&](const torch::Tensor& x) {
    return torch::mse_loss(conv(x), functional::conv_nd(x, teacher_w, {}, geo));
  };
  torch::manual_seed(seed + 1);
  auto x_eval = torch::randn({16, w0.size(1), 12, 12});
  double mse0 = loss_on(x_eval).item<double>();
  auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) {
    auto x = torch::randn({16, w0.size(1), 12, 12});
    optim.zero_grad();
    auto loss = loss_on(x);
    loss.backward();
    optim.step();
  }
  double step_ms = 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
  torch::NoGradGuard g;
  double mse = loss_on(x_eval).item<double>();
  auto y = conv(x_eval);
  conv->merge();
  double merge_err = (conv(x_eval) - y).abs().max().item<double>();
  return {name, count_parameters(*conv).trainable, mse0, mse, step_ms, merge_err};
}

int run_demo(const DemoArgs& a) {
  torch::manual_seed(a.seed);
  const int64_t cin = 32, cout = 64;
  auto w0 = torch::randn({cout, cin, 3, 3}) * 0.1;
  // The unknown update: Tucker rank [8, 8, 2, 2].
  auto core = torch::randn({8, 8, 2, 2});
  std::vector<torch::Tensor> f{torch::randn({cout, 8}), torch::randn({cin, 8}), torch::randn({3, 2}),
                               torch::randn({3, 2})};
  auto d = functional::tucker_delta(core, f, 1.0);
  auto teacher_w = w0 + d / d.norm() * w0.norm() * 0.5;

  const int64_t flora_params = parameter_count(
      resolve_spec(AdapterOptions().ranks({8, 8, 2, 2}), {"demo", LayerKind::Conv, {cout, cin, 3, 3}, 1}));
  // LoRA rank whose PEFT-layout count is closest to FLoRA's.
  int64_t r_eq = std::max<int64_t>(1, (flora_params + (cout + cin * 9) / 2) / (cout + cin * 9));
  std::printf("flora demo: a frozen Conv2d(%lld, %lld, 3) learns a hidden update of Tucker rank [8, 8, 2, 2]\n",
              (long long)cin, (long long)cout);
  std::printf("(%d AdamW steps on random 12x12 inputs, batch 16; the teacher differs from W0 by 50 %% in norm)\n\n",
              a.steps);
  std::vector<Row> rows;
  rows.push_back(train_one("FLoRA [8,8,2,2] s=1", AdapterOptions().ranks({8, 8, 2, 2}), w0, teacher_w, a.steps, a.seed));
  rows.push_back(train_one("LoRA r=8", AdapterOptions().method(Method::Lora).rank(8).alpha(8), w0, teacher_w, a.steps, a.seed));
  rows.push_back(train_one("LoRA r=" + std::to_string(r_eq) + " (FLoRA's count)",
                           AdapterOptions().method(Method::Lora).rank(r_eq).alpha(static_cast<double>(r_eq)), w0,
                           teacher_w, a.steps, a.seed));
  const double lora_params = static_cast<double>(rows[1].params);
  std::printf("%-26s %10s %11s %12s %12s %10s %12s\n", "method", "params", "% of LoRA8", "MSE before", "MSE after",
              "ms/step", "merge err");
  for (auto& r : rows)
    std::printf("%-26s %10s %10.1f%% %12.3e %12.3e %10.2f %12.2e\n", r.name.c_str(), format_count(r.params).c_str(),
                100.0 * r.params / lora_params, r.mse0, r.mse, r.step_ms, r.merge_err);
  std::printf("\nmerge err: max |merged(x) - adapted(x)| after merging W0 + dW into the weight.\n");
  return 0;
}

}  // namespace

void add_demo(CLI::App& app, std::function<int()>& run) {
  auto a = std::make_shared<DemoArgs>();
  auto* c = app.add_subcommand("demo", "Small self-contained example: FLoRA vs LoRA on one convolution");
  c->add_option("--steps", a->steps, "Training steps per method")->capture_default_str()->check(CLI::PositiveNumber);
  c->add_option("--seed", a->seed, "Random seed")->capture_default_str();
  c->callback([a, &run] { run = [a] { return run_demo(*a); }; });
}

}  // namespace cli
}  // namespace flora

// `flora train`, `flora eval` and `flora forward`. The train flags come from one table (kFlags)
// that both declares them on the CLI11 app (so --help lists them) and maps them onto the
// configuration keys that a YAML file and key=value overrides also set.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <iostream>
#include <map>

#include "commands.h"
#include "flora/flora.h"
#include "flora/io/adapter_dir.h"
#include "flora/io/safetensors.h"
#include "flora/model.h"
#include "flora/train.h"

namespace flora {
namespace cli {
namespace {

namespace fs = std::filesystem;

struct Flag {
  const char* key;  // config key; the flag is --key with '_' -> '-'
  const char* help;
};

const Flag kFlags[] = {
    {"model", "TorchScript model (M.pt) or an architecture name (smallcnn, resnet18/34/50, convnext_tiny/small/base, vit_b_16, vit_s_16)"},
    {"weights", "Base weights (.safetensors state dict) for an architecture"},
    {"data", "Training data: imagefolder:DIR, cifar10:DIR, mnist:DIR or procedural:TASK[:N] (shapes, glyphs, outlines)"},
    {"val_data", "Evaluation data (same forms), evaluated each epoch"},
    {"method", "flora, lora, full or frozen"},
    {"ranks", "FLoRA ranks per mode, e.g. 16,16,2,2 (the last one repeats for further modes)"},
    {"rank", "LoRA rank, or FLoRA's rank for every channel mode"},
    {"spatial_rank", "FLoRA rank of kernel modes when --ranks is not given"},
    {"scale", "FLoRA scale s"},
    {"alpha", "LoRA alpha"},
    {"core", "FLoRA core: full, diagonal (cp: with equal ranks, e.g. --ranks 8,8,8,8) or identity"},
    {"identity", "FLoRA modes with no factor, e.g. 2,3 (Tucker-2 / LoCon on convs; a layer's missing modes are ignored)"},
    {"conv_path", "Adapted conv forward: auto (cost model), merged, factorized, hybrid (groups-1 convs, no dropout) or separable (only depthwise Conv2d: restrict --targets to them, e.g. '.*block\\.0' on ConvNeXt)"},
    {"targets", "Modules: a comma list of names / dotted suffixes, a regex, all-linear or all-conv (default: every conv and linear but the head)"},
    {"num_classes", "Re-initialize the classifier head for K classes and train it fully"},
    {"train_modules", "Comma list of modules trained fully (like PEFT's modules_to_save)"},
    {"image_size", "Resize images to PX x PX (required for ImageFolder)"},
    {"in_channels", "Model input channels (1-channel data is repeated to 3)"},
    {"augment", "none or default (random crop and flip)"},
    {"workers", "Data loader threads"},
    {"epochs", "Epochs"},
    {"steps", "Optimizer steps (overrides --epochs)"},
    {"batch_size", "Batch size"},
    {"grad_accum", "Gradient accumulation (micro-batches per optimizer step)"},
    {"lr", "Peak learning rate (AdamW)"},
    {"weight_decay", "AdamW weight decay"},
    {"clip_grad", "Clip the gradient norm to this (0: off)"},
    {"schedule", "constant, linear or cosine (after warmup)"},
    {"warmup_steps", "Linear warmup steps"},
    {"precision", "fp32 or bf16 (autocast)"},
    {"update_batchnorm", "Update BatchNorm statistics (default: kept fixed)"},
    {"seed", "Random seed (data order, augmentation, initialization)"},
    {"device", "cpu or cuda"},
    {"memory_format", "Conv weights' layout: auto (channels-last on cpu), channels-last or contiguous"},
    {"recompute_inputs", "Adapted Linears after a GELU, LayerNorm or attention recompute their input in backward instead of keeping it (less memory, a few % more time; native ConvNeXt and ViT)"},
    {"out", "Run directory"},
    {"log_every", "Log a metrics line every N steps"},
    {"checkpoint_every", "Checkpoint every N steps (0: each epoch)"},
    {"dist_timeout", "Data-parallel: seconds a rendezvous or collective may take before the job fails"},
};

std::string flag_name(const char* key) {
  std::string s = std::string("--") + key;
  for (auto& c : s)
    if (c == '_') c = '-';
  return s;
}

struct TrainArgs {
  std::vector<std::string> positional;  // [CONFIG.yaml] [key=value ...]
  std::map<std::string, std::string> flags;
  bool resume = false;
  int nproc = 1;
};

train::TrainConfig config_from(const TrainArgs& a, const std::map<std::string, CLI::Option*>& options, CLI::Option* resume) {
  std::string yaml;
  std::vector<std::string> overrides;
  for (const auto& p : a.positional) {
    if (p.find('=') != std::string::npos) overrides.push_back(p);
    else if (yaml.empty()) yaml = p;
    else throw InvalidArgument("unexpected argument '" + p + "' (one CONFIG.yaml, then key=value overrides)");
  }
  // Precedence: YAML < flags < key=value overrides.
  std::vector<std::string> all;
  for (const auto& [key, opt] : options)
    if (opt->count() > 0) all.push_back(key + "=" + a.flags.at(key));
  if (resume->count() > 0) all.push_back("resume=true");
  all.insert(all.end(), overrides.begin(), overrides.end());
  return train::load_config(yaml, all);
}

int run_train(const TrainArgs& a, const std::map<std::string, CLI::Option*>& options, CLI::Option* resume) {
  const auto config = config_from(a, options, resume);
  if (a.nproc == 1) return train::run_training(config);
  config.validate();  // one error here rather than one per worker
  // The same command in N workers, each with its share of the threads; they join through the
  // environment launch_local_workers sets, as under torchrun.
  std::vector<std::string> args{"train"};
  args.insert(args.end(), a.positional.begin(), a.positional.end());
  for (const auto& [key, opt] : options)
    if (opt->count() > 0) args.push_back(flag_name(key.c_str())), args.push_back(a.flags.at(key));
  if (resume->count() > 0) args.push_back("--resume");
  return launch_local_workers(a.nproc, args, std::max(1, torch::get_num_threads() / a.nproc));
}

void add_train(CLI::App& app, std::function<int()>& run) {
  auto a = std::make_shared<TrainArgs>();
  auto options = std::make_shared<std::map<std::string, CLI::Option*>>();
  auto* c = app.add_subcommand("train", "Fine-tune a model: flora train [CONFIG.yaml] [--flags] [key=value ...]");
  c->add_option("args", a->positional, "A YAML config, then key=value overrides of any key below (with '_')");
  const train::TrainConfig defaults;
  for (const auto& f : kFlags) {
    const std::string d = train::config_value(defaults, f.key);
    (*options)[f.key] = c->add_option(flag_name(f.key), a->flags[f.key], std::string(f.help) + (d.empty() ? "" : " [default: " + d + "]"));
  }
  auto* resume = c->add_flag("--resume", a->resume, "Continue from RUN_DIR/checkpoints/last.safetensors");
  c->add_option("--nproc", a->nproc,
                "Data-parallel: start N local worker processes (Gloo); --batch-size is per process. "
                "torchrun and srun launches need no flag (docs/DISTRIBUTED.md)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  c->footer("Writes RUN_DIR/adapter/, checkpoints/, metrics.jsonl, config.yaml and report.html. "
            "SIGINT/SIGTERM save a checkpoint and exit 130.");
  c->callback([a, options, resume, &run] { run = [a, options, resume] { return run_train(*a, *options, resume); }; });
}

// ---------------------------------------------------------------------------------------------

struct EvalArgs {
  std::string model, weights, adapter, data, input, output;
  int64_t image_size = 0, batch_size = 64, in_channels = 3, num_classes = 0;
};

std::unique_ptr<Model> prepare(const EvalArgs& a) {
  if (!a.adapter.empty() && fs::exists(fs::path(a.adapter) / "adapter_config.json"))
    io::read_adapter(a.adapter);  // a bad directory fails before the model loads
  auto model = open_model(a.model);
  std::vector<std::pair<std::string, torch::Tensor>> weights;
  if (!a.weights.empty()) weights = io::SafetensorsFile(a.weights).load_all();
  // --num-classes K: a merged model's file has the K-class head, so the head is replaced before
  // the weights load; the base model's file has its original head, and the adapter directory
  // brings the trained one (its trained modules), so the head is replaced after them.
  bool head_after = false;
  if (a.num_classes > 0) {
    const std::string head = model->head_name() + ".weight";
    int64_t file_classes = 0;
    for (const auto& [name, t] : weights)
      if (name == head && t.dim() == 2) file_classes = t.size(0);
    head_after = file_classes > 0 && file_classes != a.num_classes;
    if (head_after && a.adapter.empty())
      throw InvalidArgument("--num-classes " + std::to_string(a.num_classes) + ", but '" + a.weights + "' has a " +
                            std::to_string(file_classes) + "-class head and no --adapter brings a trained " +
                            std::to_string(a.num_classes) +
                            "-class one (hint: pass the run's adapter directory, or drop --num-classes)");
    if (!head_after) model->set_num_classes(a.num_classes, 0);
  }
  if (!weights.empty()) model->load_state(weights, true);
  if (head_after) model->set_num_classes(a.num_classes, 0);
  if (!a.adapter.empty()) model->load_adapter_dir(a.adapter);
  model->train(false);
  return model;
}

int run_eval(const EvalArgs& a) {
  if (a.data.empty()) throw InvalidArgument("--data is required");
  auto model = prepare(a);
  const auto r = train::evaluate(*model, a.data, a.image_size, a.in_channels, a.batch_size, 2);
  std::cout << nlohmann::json{{"loss", r.loss}, {"top1", r.top1}, {"samples", r.samples}, {"data", a.data}}.dump() << "\n";
  return 0;
}

int run_forward(const EvalArgs& a) {
  io::SafetensorsFile in(a.input);
  bool found = false;
  for (const auto& t : in.tensors()) found = found || t.name == "input";
  if (!found) throw InvalidArgument("'" + a.input + "' has no tensor named 'input'");
  auto model = prepare(a);
  torch::NoGradGuard g;
  auto y = model->forward(in.load("input").to(torch::kFloat32));
  io::save_safetensors(a.output, {{"output", y.contiguous()}}, {{"format", "pt"}});
  std::cout << "output " << format_shape(y.sizes().vec()) << " -> " << a.output << "\n";
  return 0;
}

void add_model_options(CLI::App* c, EvalArgs& a) {
  c->add_option("--model", a.model, "TorchScript model (M.pt) or an architecture name")->required();
  c->add_option("--weights", a.weights, "Base weights (.safetensors state dict)");
  c->add_option("--adapter", a.adapter, "Adapter directory (RUN_DIR/adapter) to apply");
  c->add_option("--num-classes", a.num_classes, "Head size the adapter was trained with (read from the adapter when saved)");
}

void add_eval(CLI::App& app, std::function<int()>& run) {
  auto a = std::make_shared<EvalArgs>();
  auto* c = app.add_subcommand("eval", "Evaluate: prints {\"loss\", \"top1\", \"samples\"} as JSON");
  add_model_options(c, *a);
  c->add_option("--data", a->data, "imagefolder:DIR, cifar10:DIR (test batch) or mnist:DIR (t10k files)")->required();
  c->add_option("--image-size", a->image_size, "Resize images to PX x PX");
  c->add_option("--in-channels", a->in_channels, "Model input channels (1-channel data is repeated to 3)");
  c->add_option("--batch-size", a->batch_size, "Batch size")->capture_default_str();
  c->callback([a, &run] { run = [a] { return run_eval(*a); }; });
}

void add_forward(CLI::App& app, std::function<int()>& run) {
  auto a = std::make_shared<EvalArgs>();
  auto* c = app.add_subcommand("forward", "Run the model (eval mode) on the tensor 'input' of a .safetensors file");
  add_model_options(c, *a);
  c->add_option("--input", a->input, "IN.safetensors holding a tensor named 'input'")->required();
  c->add_option("--output", a->output, "OUT.safetensors to write the tensor 'output' to")->required();
  c->callback([a, &run] { run = [a] { return run_forward(*a); }; });
}

}  // namespace

void add_train_commands(CLI::App& app, std::function<int()>& run) {
  add_train(app, run);
  add_eval(app, run);
  add_forward(app, run);
}

}  // namespace cli
}  // namespace flora

// Subcommands implemented outside main.cpp. Each adds itself to the app and sets `run`.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace flora {
namespace train {
struct TrainConfig;
}
namespace cli {
void add_demo(CLI::App& app, std::function<int()>& run);
/// bench step and bench study.
void add_bench(CLI::App& app, std::function<int()>& run);
/// bench study (study.cpp), added under `bench`.
void add_study(CLI::App& bench, std::function<int()>& run);
/// train, eval and forward.
void add_train_commands(CLI::App& app, std::function<int()>& run);
/// merge and export.
void add_adapter_commands(CLI::App& app, std::function<int()>& run);
/// inspect for an adapter directory / a model (main.cpp handles .safetensors files).
int inspect_adapter(const std::string& path, bool json);
/// A model's parameters (TorchScript .pt or an architecture name), or with `plan` what each
/// layer would get under that method (the injection report, ranks clipped and said so).
int inspect_model(const std::string& model, const train::TrainConfig* plan, bool json);
/// `flora train --nproc N`: runs `flora WORKER_ARGS...` in N processes with torchrun's variables
/// (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...) and supervises them; the first failing worker stops
/// the others (SIGTERM, SIGKILL after 10 s). Returns 0, 130 when interrupted, else the failure's code.
int launch_local_workers(int nproc, const std::vector<std::string>& worker_args, int threads_per_worker);
}  // namespace cli
}  // namespace flora

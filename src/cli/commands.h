// Subcommands implemented outside main.cpp. Each adds itself to the app and sets `run`.
#pragma once

#include <functional>
#include <string>

namespace CLI {
class App;
}

namespace flora {
namespace cli {
void add_demo(CLI::App& app, std::function<int()>& run);
/// bench step (and later study).
void add_bench(CLI::App& app, std::function<int()>& run);
/// train, eval and forward.
void add_train_commands(CLI::App& app, std::function<int()>& run);
/// merge and export.
void add_adapter_commands(CLI::App& app, std::function<int()>& run);
/// inspect for an adapter directory / a TorchScript model (main.cpp handles .safetensors files).
int inspect_adapter(const std::string& path, bool json);
int inspect_script(const std::string& path, bool json);
}  // namespace cli
}  // namespace flora

// Subcommands implemented outside main.cpp. Each adds itself to the app and sets `run`.
#pragma once

#include <functional>

namespace CLI {
class App;
}

namespace flora {
namespace cli {
void add_demo(CLI::App& app, std::function<int()>& run);
}  // namespace cli
}  // namespace flora

// flora/runtime.h: process-wide LibTorch settings every entry point applies once.
#pragma once

#include <string>

namespace flora {

/// Sets LibTorch's intra-op threads: `requested` if > 0, else OMP_NUM_THREADS if set, else the
/// hardware concurrency (Debian's LibTorch otherwise starts with 1 thread). Returns the count.
int configure_threads(int requested = 0);

/// flora's version, "0.1.0".
std::string version();

}  // namespace flora

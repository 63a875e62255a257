#include "flora/runtime.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <string>
#include <thread>

#include "flora/spec.h"

namespace flora {

int configure_threads(int requested) {
  int n = requested;
  if (n <= 0) {
    if (const char* env = std::getenv("OMP_NUM_THREADS"); env && *env) {
      char* end = nullptr;
      const long v = std::strtol(env, &end, 10);
      if (*end != '\0' || v <= 0)
        throw InvalidArgument(std::string("OMP_NUM_THREADS='") + env + "' is not a positive integer (hint: unset it or set e.g. 2)");
      n = static_cast<int>(v);
    } else {
      n = static_cast<int>(std::thread::hardware_concurrency());
    }
  }
  if (n <= 0) n = 1;
  at::set_num_threads(n);
  return n;
}

std::string version() { return "0.1.0"; }

}  // namespace flora

// libFuzzer target: any byte string given to the safetensors reader either parses into a header
// whose byte ranges lie inside the buffer, or throws flora::Error. Never a crash, never a read
// out of bounds (AddressSanitizer watches the parse and every load).
//   tests/fuzz/run_fuzz.sh [SECONDS]   builds with clang and runs on tests/fuzz/corpus
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "flora/io/safetensors.h"
#include "flora/spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Copy into an exactly-sized heap buffer so ASan sees any read past the end.
  std::vector<uint8_t> buf(data, data + size);
  try {
    flora::io::SafetensorsFile f(buf.data(), buf.size(), "fuzz");
    uint64_t covered = 0;
    for (const auto& t : f.tensors()) {
      if (t.end < t.begin || t.end > size) std::abort();  // validated ranges must lie in the buffer
      covered += t.end - t.begin;
      try {
        auto x = f.load(t.name);
        if (static_cast<uint64_t>(x.numel()) * x.element_size() != t.end - t.begin) std::abort();
      } catch (const flora::Error&) {
        // dtypes LibTorch lacks (U16, U32, U64, F8_*) are listed but not loadable
      }
    }
    if (covered > size) std::abort();
  } catch (const flora::Error&) {
  }
  return 0;
}

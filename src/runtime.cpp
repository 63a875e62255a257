#include "flora/runtime.h"
#include "flora/detail/narrow_gemm.h"

#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "flora/spec.h"

namespace flora {

namespace {

// A positive integer from an environment variable, 0 when unset or empty; anything else is an
// error naming the variable. OpenMP's list form ("8,4": threads per nesting level) gives its
// first element, the only level LibTorch's intra-op pool uses.
int positive_env(const char* name) {
  const char* env = std::getenv(name);
  if (!env || !*env) return 0;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  if ((*end != '\0' && *end != ',') || v <= 0 || v > (1 << 20))
    throw InvalidArgument(std::string(name) + "='" + env + "' is not a positive integer (hint: unset it or set e.g. 2)");
  return static_cast<int>(v);
}

}  // namespace

int usable_cpus() {
  // A dynamically sized set: a fixed cpu_set_t holds 1024 CPUs, and sched_getaffinity fails
  // (EINVAL) on kernels configured for more; double the size until the mask fits.
  for (int cpus = CPU_SETSIZE; cpus <= (1 << 20); cpus *= 2) {
    cpu_set_t* set = CPU_ALLOC(cpus);
    if (!set) break;
    const std::size_t bytes = CPU_ALLOC_SIZE(cpus);
    CPU_ZERO_S(bytes, set);
    const int rc = sched_getaffinity(0, bytes, set);
    const int n = rc == 0 ? CPU_COUNT_S(bytes, set) : 0;
    const int err = errno;
    CPU_FREE(set);
    if (rc == 0 && n > 0) return n;
    if (rc != 0 && err != EINVAL) break;
  }
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

ThreadChoice default_threads() {
  if (const int n = positive_env("OMP_NUM_THREADS")) return {n, "OMP_NUM_THREADS"};
  if (const int n = positive_env("SLURM_CPUS_PER_TASK")) return {n, "SLURM_CPUS_PER_TASK"};
  const int cpus = usable_cpus();
  const int all = static_cast<int>(std::thread::hardware_concurrency());
  return {cpus, cpus < all ? "the CPUs this process may run on (" + std::to_string(cpus) + " of " + std::to_string(all) + ")"
                           : "the core count"};
}

int configure_threads(int requested) {
  int n = requested > 0 ? requested : default_threads().count;
  if (n <= 0) n = 1;
  at::set_num_threads(n);
  // OpenBLAS keeps its own thread pool, sized to the cores, which at::set_num_threads does not
  // reach: with --threads 1 its GEMMs still ran a second thread (a step's CPU time was twice its
  // wall time). Looked up at run time, so other BLAS libraries (and MKL builds) are unaffected.
  if (auto set = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) set(n);
  if (n > 1 && blas_threading() == "pthreads") {  // braces: the macro is an if/else of its own
    TORCH_WARN_ONCE("flora: OpenBLAS's pthreads build is loaded with ", n, " threads: its pool competes with LibTorch's "
                    "OpenMP threads and GEMM-heavy models train up to 5x slower (hint: link OpenBLAS's OpenMP build, "
                    "Debian's libopenblas0-openmp, as flora's CMakeLists.txt does, or set OMP_WAIT_POLICY=PASSIVE)");
  }
  return n;
}

int blas_threads() {
  if (auto get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"))) return get();
  return -1;
}

std::string blas_threading() {
  auto get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_parallel"));
  if (!get) return "";
  switch (get()) {
    case 0: return "sequential";
    case 1: return "pthreads";
    case 2: return "openmp";
    default: return "unknown";
  }
}

bool parallel_loops() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

bool avx2_kernels() { return detail::avx2_fma_enabled(); }
bool avx512_kernels() { return detail::avx512_enabled(); }

namespace {

// Freed CPU blocks of 128 KiB and more, kept by rounded size for the next tensor that fits.
// Blocks are anonymous mappings (page-aligned, so LibTorch's 64-byte alignment holds); the
// deleter of every tensor it hands out, large or small, is release(): small ones came from
// c10::alloc_cpu and go back to c10::free_cpu, so raw_allocate/raw_deallocate work too.
class BlockCache final : public c10::Allocator {
 public:
  // Sizes round up to 64 KiB below 1 MiB and to 1 MiB above. The floor is glibc's default mmap
  // threshold: below it glibc's heap serves and reuses blocks well. From there to 1 MiB (a ViT's
  // activations at 17 tokens, a small conv's outputs) glibc's heap kept the peak of every size
  // class resident: ViT-S/16 at 64 px peaked 31 MB higher frozen and 55 MB higher with FLoRA
  // when this cache started at 1 MiB (docs/PERFORMANCE.md).
  static constexpr std::size_t kSmallest = std::size_t(128) << 10;
  static constexpr std::size_t kSmallGranule = std::size_t(64) << 10;
  static constexpr std::size_t kGranule = std::size_t(1) << 20;

  c10::DataPtr allocate(std::size_t n) const override {
    if (n < kSmallest) {
      void* p = c10::alloc_cpu(n);
      return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
    }
    const std::size_t granule = n < kGranule ? kSmallGranule : kGranule;
    const std::size_t size = (n + granule - 1) / granule * granule;
    void* p = take(size);
    if (p == nullptr) {
      p = map(size);
      if (p == nullptr) {  // out of address space or memory: give the cache back and retry once
        trim(0);
        p = map(size);
      }
      if (p == nullptr)
        throw std::bad_alloc();
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = size;
      live_bytes_ += size;
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  // PyTorch >= 2.3 declares this pure virtual; before, it is simply an extra member.
  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }

  std::size_t empty() const {
    const std::size_t before = stats().cached_bytes;
    trim(0);
    return before;
  }
  void set_limit(std::size_t bytes) {
    { std::lock_guard<std::mutex> lock(mu_); limit_ = bytes; }
    trim(bytes);
  }
  CpuCacheStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    CpuCacheStats s;
    s.live_bytes = live_bytes_;
    s.cached_bytes = cached_bytes_;
    s.limit_bytes = limit_;
    s.hits = hits_;
    s.misses = misses_;
    s.released = released_;
    return s;
  }

 private:
  static void release(void* p);

  // A cached block of `size` to 2 `size` bytes, or nullptr after trimming the cache down to its limit
  // (a miss will map a new block).
  void* take(std::size_t size) const {
    std::vector<std::pair<void*, std::size_t>> drop;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Best fit up to twice the size: a cached block is already resident, a new one is not,
      // so even a larger block costs less memory than mapping afresh.
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= 2 * size) {
        const std::size_t have = it->first;
        p = it->second;
        free_.erase(it);
        cached_bytes_ -= have;
        live_[p] = have;
        live_bytes_ += have;
        ++hits_;
        return p;
      }
      ++misses_;
      collect(limit_ > size ? limit_ - size : 0, drop);
    }
    for (const auto& [q, s] : drop) ::munmap(q, s);
    return nullptr;
  }
  void trim(std::size_t bytes) const {
    std::vector<std::pair<void*, std::size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      collect(bytes, drop);
    }
    for (const auto& [q, s] : drop) ::munmap(q, s);
  }
  // Under mu_: removes cached blocks, largest first, until at most `bytes` stay cached.
  void collect(std::size_t bytes, std::vector<std::pair<void*, std::size_t>>& drop) const {
    while (cached_bytes_ > bytes && !free_.empty()) {
      auto last = std::prev(free_.end());
      drop.emplace_back(last->second, last->first);
      cached_bytes_ -= last->first;
      ++released_;
      free_.erase(last);
    }
  }
  static void* map(std::size_t size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }
  // Returns true if `p` was one of ours (now cached, or unmapped if caching it would exceed the
  // limit: the largest cached blocks go first), false for a small block.
  bool put_back(void* p) const {
    std::vector<std::pair<void*, std::size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      if (it == live_.end()) return false;
      const std::size_t size = it->second;
      live_.erase(it);
      live_bytes_ -= size;
      free_.emplace(size, p);
      cached_bytes_ += size;
      collect(limit_, drop);
    }
    for (const auto& [q, s] : drop) ::munmap(q, s);
    return true;
  }

  mutable std::mutex mu_;
  mutable std::unordered_map<void*, std::size_t> live_;
  mutable std::multimap<std::size_t, void*> free_;
  mutable std::size_t live_bytes_ = 0, cached_bytes_ = 0, limit_ = 0;
  mutable std::size_t hits_ = 0, misses_ = 0, released_ = 0;
};

// Never destroyed: tensors freed during static destruction still call release().
BlockCache* const g_cache = new BlockCache();

void BlockCache::release(void* p) {
  if (p != nullptr && !g_cache->put_back(p)) c10::free_cpu(p);
}

}  // namespace

bool configure_allocator(long limit_mb) {
  if (limit_mb < 0) {
    if (const char* env = std::getenv("FLORA_CPU_CACHE_MB"); env && *env) {
      char* end = nullptr;
      const long v = std::strtol(env, &end, 10);
      if (*end != '\0' || v < 0)
        throw InvalidArgument(std::string("FLORA_CPU_CACHE_MB='") + env +
                              "' is not a non-negative integer (hint: 0 turns the CPU block cache off, e.g. 4096 keeps up to 4 GB)");
      limit_mb = v;
    } else {
      const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
      limit_mb = pages > 0 && page > 0 ? static_cast<long>(static_cast<double>(pages) * page / 2 / (1 << 20)) : 1024;
    }
  }
  const bool installed = c10::GetCPUAllocator() == g_cache;
  if (limit_mb == 0 && !installed) return false;
  g_cache->set_limit(static_cast<std::size_t>(limit_mb) << 20);
  if (!installed) {
    c10::SetCPUAllocator(g_cache, /*priority=*/1);
    c10::SetAllocator(c10::DeviceType::CPU, g_cache, /*priority=*/1);
  }
  return c10::GetCPUAllocator() == g_cache;
}

std::size_t empty_cpu_cache() { return c10::GetCPUAllocator() == g_cache ? g_cache->empty() : 0; }

CpuCacheStats cpu_cache_stats() {
  return c10::GetCPUAllocator() == g_cache ? g_cache->stats() : CpuCacheStats{};
}

std::string version() { return "0.1.0"; }

}  // namespace flora

// flora/runtime.h: process-wide LibTorch settings every entry point applies once.
#pragma once

#include <cstddef>
#include <string>

namespace flora {

/// The intra-op thread count a process gets when none is asked for, and where it came from.
struct ThreadChoice {
  int count = 1;
  std::string source;  ///< "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "the core count", ...
};
/// OMP_NUM_THREADS if set, else SLURM_CPUS_PER_TASK if set (an srun task's allotment), else the
/// CPUs this process may run on (its affinity mask: taskset, cgroup cpusets, SLURM's binding),
/// which is the core count on an unrestricted machine. OpenMP's list form (OMP_NUM_THREADS=8,4)
/// counts its first element. A set variable that is not a positive integer is an
/// InvalidArgument naming it.
ThreadChoice default_threads();
/// CPUs in this process's affinity mask (the hardware concurrency if that cannot be read).
int usable_cpus();
/// Sets LibTorch's intra-op threads: `requested` if > 0, else default_threads() (Debian's
/// LibTorch otherwise starts with 1 thread). Returns the count. OpenBLAS's own thread pool, when
/// OpenBLAS is the BLAS, is set to the same count; with OpenBLAS's pthreads build and more than 1
/// thread it warns once (TORCH_WARN), as that build is slow there (see blas_threading()).
int configure_threads(int requested = 0);
/// OpenBLAS's thread count, or -1 when the BLAS in use is not OpenBLAS.
int blas_threads();
/// How OpenBLAS runs its threads: "openmp" (on LibTorch's OpenMP threads), "pthreads" (its own
/// pool, which competes with LibTorch's spinning OpenMP workers for the cores: slow at more than
/// 1 thread, docs/PERFORMANCE.md "Threads and BLAS"), "sequential", or "" when not OpenBLAS.
std::string blas_threading();

/// Whether flora's own parallel loops (the fused conv's im2col, the narrow GEMMs) run on LibTorch's
/// threads: flora compiled with OpenMP, which CMake does for GCC against a LibTorch that links the
/// system libgomp.so.1 (Debian's). Otherwise they run on one thread.
bool parallel_loops();
/// Whether flora's hand-written loops run their AVX2 + FMA copies (an x86 CPU with both, built by
/// GCC or Clang, FLORA_NO_AVX2 unset).
bool avx2_kernels();
/// Whether the narrow GEMMs also run their AVX-512 copy (avx2_kernels(), an AVX-512F CPU,
/// FLORA_NO_AVX512 unset).
bool avx512_kernels();

/// What the CPU block cache holds and has done (all zero until configure_allocator installs it).
struct CpuCacheStats {
  std::size_t live_bytes = 0;    ///< in tensors now (blocks of 128 KiB and more, rounded up)
  std::size_t cached_bytes = 0;  ///< freed blocks kept for reuse
  std::size_t limit_bytes = 0;   ///< cached bytes above this are unmapped when a new block is needed
  std::size_t hits = 0, misses = 0, released = 0;  ///< reuses, fresh mappings, blocks unmapped
};

/// Installs flora's CPU block cache as LibTorch's CPU allocator. Without it, glibc maps every
/// tensor of more than a few MB afresh and unmaps it on free, so each activation of a training
/// step page-faults on first touch (about 7 ms for a 12.8 MB tensor here, a third of a
/// 64-channel 56x56 conv's forward); raising glibc's thresholds does not help, as its
/// 64-byte-aligned allocations fragment the heap. The cache keeps freed blocks of 128 KiB and more
/// (sizes rounded up to 64 KiB below 1 MiB, to 1 MiB above; the untouched tail costs no memory)
/// and hands them out again, the smallest that fits and is at most twice the size, as the next
/// step asks for the same sizes; smaller tensors go to LibTorch's allocator.
/// Cached bytes never exceed the limit (a free beyond it, or a new block, unmaps the largest
/// cached blocks first), so shapes that never come back (a last partial batch) cannot pile up.
/// `limit_mb` < 0: FLORA_CPU_CACHE_MB if set, else half the physical memory. 0 (or
/// FLORA_CPU_CACHE_MB=0): not installed, returns false. Called again, it changes only the limit.
/// Returns whether the cache is LibTorch's CPU allocator afterwards.
bool configure_allocator(long limit_mb = -1);

/// Unmaps every cached block (tensors in use keep theirs) and returns the bytes released, as
/// torch.cuda.empty_cache() does. Training calls it when it switches between setup, training and
/// evaluation, whose tensor sizes differ, so that one phase's blocks do not add to the next
/// one's peak. 0 when the cache is not installed.
std::size_t empty_cpu_cache();

/// The cache's counters, e.g. to check that a training loop's blocks are reused (hits).
CpuCacheStats cpu_cache_stats();

/// flora's version, "0.1.0".
std::string version();

}  // namespace flora

#!/usr/bin/env bash
# Builds the safetensors fuzz target with clang (libFuzzer + AddressSanitizer) and runs it for a
# bounded time on the committed seed corpus. Usage: run_fuzz.sh [SECONDS] [BUILD_DIR]
set -euo pipefail
seconds=${1:-30}
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${2:-$root/build}/fuzz
cxx=$(command -v clang++-14 || command -v clang++ || true)
if [[ -z $cxx ]] || ! ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  echo "fuzz: skipped (clang++ or libFuzzer missing; scripts/setup.sh installs them)"; exit 0
fi
mkdir -p "$out"
bin=$out/fuzz_safetensors
srcs=("$root/tests/fuzz/fuzz_safetensors.cpp" "$root/src/io/safetensors.cpp" "$root/src/spec.cpp")
if [[ ! -x $bin ]] || [[ -n $(find "${srcs[@]}" "$root/include" -newer "$bin" -print -quit) ]]; then
  "$cxx" -std=c++17 -O1 -g -fsanitize=fuzzer,address -I"$root/include" \
    -I/usr/include/torch/csrc/api/include "${srcs[@]}" -o "$bin" -ltorch -ltorch_cpu -lc10
fi
work=$out/corpus
mkdir -p "$work"
cp -n "$root"/tests/fuzz/corpus/* "$work"/ 2>/dev/null || true
# Leaks are not the target here (LibTorch's static registries look like leaks to LSan). A fixed
# seed makes a red run reproducible (the same inputs in the same order, up to where the time ran
# out); FLORA_FUZZ_SEED=<n> explores elsewhere.
seed=${FLORA_FUZZ_SEED:-1}
ASAN_OPTIONS=detect_leaks=0 "$bin" -seed="$seed" -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 "$work" 2>&1 | tail -12
echo "fuzz: ${seconds}s (seed $seed) without a crash"

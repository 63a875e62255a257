#!/usr/bin/env bash
# Installs what flora needs to build and test, from Debian's archive. Idempotent and quiet when
# everything is already there. Usage: scripts/setup.sh
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache
  libtorch-dev libopenblas0-openmp       # LibTorch 1.13 (CPU); OpenBLAS on OpenMP: ~30x faster GEMM than reference BLAS
  nlohmann-json3-dev libcli11-dev        # JSON, command line
  libgloo-dev                            # c10d Gloo headers (data-parallel training; the library is in LibTorch)
  libyaml-cpp-dev libstb-dev             # trainer configs; image decoding (PNG, JPEG, BMP)
  googletest libgtest-dev libgmock-dev libbenchmark-dev
  python3-torch python3-torchvision      # tests only: independent reference values (torchvision: tests/vision)
  clang-14 libfuzzer-14-dev libclang-rt-14-dev  # tests only: the safetensors fuzz target
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

#!/usr/bin/env bash
# torchvision equivalence (ctest's `vision` entry): tests/vision/make_refs.py writes every
# architecture of flora/vision.h with random weights and one input/output pair from torchvision;
# the Vision* gtests load each state dict strictly into the native model and compare outputs.
# Usage: run_vision.sh BUILD_BIN_DIR
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$1"
python="${FLORA_PYTHON:-/usr/bin/python3}"  # not a pyenv/venv python: it must see python3-torchvision
if ! "$python" -c 'import torch, torchvision' >/dev/null 2>&1; then
  echo "vision: FAIL: $python cannot import torch and torchvision (hint: apt-get install python3-torchvision, or set FLORA_PYTHON)" >&2
  exit 1
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/flora-vision.XXXXXX")"  # ~1.3 GB of state dicts
trap 'rm -rf "$work"' EXIT

"$python" "$here/make_refs.py" "$work"
FLORA_VISION_DIR="$work" "$bin/flora_tests" --gtest_filter='Vision*' --gtest_brief=1
echo "vision: OK"

#!/usr/bin/env bash
# PyTorch interop, end to end (ctest's `interop` entry):
#   1. tests/interop/make_models.py writes a scripted and a traced model with Debian's PyTorch;
#   2. the ScriptInterop gtests adapt them here (FLoRA and LoRA; every adaptable kind and a free
#      parameter), check training, save/load and merge/unmerge, and save adapters and outputs;
#   3. the `flora` command line merges (.pt and .safetensors), exports (peft-lora, lycoris) and
#      inspects what was written;
#   4. tests/interop/check_merged.py checks in PyTorch that every output reproduces the adapted
#      model to 1e-5.
# Usage: run_interop.sh BUILD_BIN_DIR
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$1"
python="${FLORA_PYTHON:-/usr/bin/python3}"  # not a pyenv/venv python: it must see python3-torch
if ! "$python" -c 'import torch' >/dev/null 2>&1; then
  echo "interop: FAIL: $python cannot import torch (hint: apt-get install python3-torch, or set FLORA_PYTHON)" >&2
  exit 1
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/flora-interop.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$python" "$here/make_models.py" "$work"
FLORA_INTEROP_DIR="$work" "$bin/flora_tests" --gtest_filter='Models/ScriptInterop.*' --gtest_brief=1

flora="$bin/flora"
for model in scripted traced; do
  for variant in a b c; do
    d="$work/${model}_$variant"
    "$flora" merge --model "$work/$model.pt" --adapter "$d/adapter" --out "$d/merged.pt"
    "$flora" merge --model "$work/$model.pt" --adapter "$d/adapter" --out "$d/merged.safetensors"
    case $variant in
      a) # every layer kind -> PEFT LoRA; the PEFT directory loads back and merges the same
        "$flora" export --adapter "$d/adapter" --format peft-lora --out "$d/peft"
        "$flora" merge --model "$work/$model.pt" --adapter "$d/peft" --out "$d/merged_peft.pt" >/dev/null ;;
      b) # a free parameter has no LyCORIS form: a clear error and no output file
        if "$flora" export --adapter "$d/adapter" --format lycoris --out "$d/locon.safetensors" 2>"$d/err"; then
          echo "interop: FAIL: a free parameter exported to LyCORIS" >&2; exit 1
        fi
        grep -q "module 'pos': LyCORIS LoCon has no Parameter form" "$d/err"
        [[ ! -e "$d/locon.safetensors" ]] ;;
      c) # convolutions and linear -> LyCORIS LoCon (Tucker mid) and PEFT LoRA
        "$flora" export --adapter "$d/adapter" --format lycoris --out "$d/locon.safetensors"
        "$flora" export --adapter "$d/adapter" --format peft-lora --out "$d/peft" >/dev/null ;;
    esac
    "$flora" inspect "$d/adapter" >/dev/null
    "$flora" inspect "$d/adapter" --json | "$python" -c 'import json,sys; j=json.load(sys.stdin); assert j["total_params"] > 0, j'
    "$python" "$here/check_merged.py" "$work/$model.pt" "$d"
  done
  "$flora" inspect "$work/$model.pt" | tail -1
done
echo "interop: OK"

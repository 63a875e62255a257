#!/usr/bin/env bash
# End-to-end checks of the command line: `flora params` (the seed's worked numbers, --json, error
# exits), `flora inspect` on safetensors files written by an independent Python writer, and the
# error paths of inspect / merge / export (their successful runs are in tests/interop).
# Usage: test_cli.sh PATH/TO/flora
set -u
flora=$1
pass=0 fail=0
check() {  # check NAME EXPECTED_RC EXPECTED_SUBSTRING -- ARGS...
  local name=$1 want_rc=$2 want=$3; shift 4
  local out rc
  out=$("$flora" "$@" 2>&1); rc=$?
  if [[ $rc -eq $want_rc && $out == *"$want"* ]]; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1)); echo "FAIL $name: rc=$rc (want $want_rc), output:"; echo "$out"
  fi
}
check "flora conv"        0 "trainable params: 28,684" -- params --shape 512,256,3,3 --method flora --ranks 32,32,2,2
check "lora conv"         0 "trainable params: 90,112" -- params --shape 512,256,3,3 --method lora --rank 32
check "flora linear"      0 "trainable params: 25,600" -- params --shape 512,256 --ranks 32,32
check "linear vs lora"    0 "(+4.17 %)"                -- params --shape 512,256 --ranks 32,32
check "lora linear"       0 "trainable params: 24,576" -- params --shape 512,256 --method lora --rank 32
check "json"              0 '"trainable":28684'        -- params --shape 512,256,3,3 --ranks 32,32,2,2 --json
check "json method"       0 '"method":"flora"'         -- params --shape 512,256,3,3 --ranks 32,32,2,2 --json
check "json lora"         0 '"ranks":[32,256,3,3]'     -- params --shape 512,256,3,3 --method lora --rank 32 --json
check "tucker2"           0 "trainable params: 3,840"  -- params --shape 64,32,3,3 --ranks 16,16,3,3 --identity 2,3
check "depthwise clip"    0 "16->1"                    -- params --shape 96,1,7,7 --groups 96 --rank 16
check "rank 0"            2 "rank 0"                   -- params --shape 512,256,3,3 --ranks 0,32,2,2
check "rank > mode"       2 "rank 4 for mode 2"        -- params --shape 512,256,3,3 --ranks 32,32,4,2
check "rank count"        2 "got 3 ranks"              -- params --shape 512,256,3,3 --ranks 32,32,2
check "bad method"        2 "unknown adapter method 'dora'" -- params --shape 8,8 --method dora
check "bad groups"        2 "groups 3"                 -- params --shape 8,2,3,3 --groups 3
check "missing shape"     2 "--shape"                  -- params
check "unknown command"   2 ""                         -- frobnicate
check "help"              0 "--ranks"                  -- params --help

# inspect: files written by a few lines of Python (struct + json, torch for the bytes).
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  /usr/bin/python3 - "$tmp" <<'PY'
import json, struct, sys, torch
d = sys.argv[1]
t = {"layer1.0.conv1.weight": torch.randn(64, 64, 3, 3), "fc.bias": torch.zeros(10, dtype=torch.float16)}
hdr, off, blobs = {"__metadata__": {"format": "pt"}}, 0, []
for k, v in t.items():
    b = v.numpy().tobytes()
    hdr[k] = {"dtype": {torch.float32: "F32", torch.float16: "F16"}[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
    off += len(b); blobs.append(b)
h = json.dumps(hdr).encode()
whole = struct.pack("<Q", len(h)) + h + b"".join(blobs)
open(f"{d}/ok.safetensors", "wb").write(whole)
open(f"{d}/trunc.safetensors", "wb").write(whole[:-3])
PY
  check "inspect table"   0 "layer1.0.conv1.weight  F32     [64, 64, 3, 3]" -- inspect "$tmp/ok.safetensors"
  check "inspect totals"  0 "2 tensors, 36,874 parameters" -- inspect "$tmp/ok.safetensors"
  check "inspect json"    0 '"total_params":36874'   -- inspect "$tmp/ok.safetensors" --json
  check "inspect trunc"   1 "truncated file?"        -- inspect "$tmp/trunc.safetensors"
else
  echo "inspect checks skipped: /usr/bin/python3 has no torch"
fi
check "inspect missing"   1 "cannot open"            -- inspect "$tmp/none.safetensors"
check "inspect other"     2 "is none of these"       -- inspect notes.txt
check "inspect no model"  1 "no such file"           -- inspect "$tmp/none.pt"
echo "not a zip" > "$tmp/bad.pt"
check "inspect bad model" 1 "not a loadable TorchScript archive" -- inspect "$tmp/bad.pt"
mkdir -p "$tmp/empty_adapter"
check "inspect bad dir"   1 "missing adapter_config.json" -- inspect "$tmp/empty_adapter"

# merge / export: validation happens before any work (the PyTorch round trips are ctest's interop)
check "merge out ext"     2 "must end in .pt"        -- merge --model m.pt --adapter "$tmp/empty_adapter" --out merged.bin
check "merge native pt"   2 "merges into a state dict" -- merge --model smallcnn --adapter "$tmp/empty_adapter" --out m.pt
check "merge no model"    2 "does not exist"         -- merge --model "$tmp/none.pt" --adapter "$tmp/empty_adapter" --out m.safetensors
check "merge out dir"     2 "does not exist"         -- merge --model m.pt --adapter "$tmp/empty_adapter" --out "$tmp/no/m.pt"
check "merge bad adapter" 2 "holds neither"          -- merge --model smallcnn --adapter "$tmp/empty_adapter" --out "$tmp/m.safetensors"
check "merge needs args"  2 "--adapter"              -- merge --model m.pt
check "export format"     2 "export format 'gguf' is unknown" -- export --adapter "$tmp/empty_adapter" --format gguf --out x
check "export bad dir"    1 "missing adapter_config.json" -- export --adapter "$tmp/empty_adapter" --format lycoris --out "$tmp/x.safetensors"
check "export help"       0 "peft-lora"              -- export --help
[[ ! -e "$tmp/m.pt" && ! -e "$tmp/x.safetensors" ]] || { echo "FAIL: a failed command left output"; fail=$((fail + 1)); }

# bench step: one JSON object per run; the methods train what they say
for m in frozen full lora flora; do
  out=$("$flora" bench step --model smallcnn --method $m --batch-size 2 --image-size 16 --steps 2 --warmup 1 --json 2>&1)
  if /usr/bin/python3 -c '
import json, sys
j = json.loads(sys.argv[1]); m = sys.argv[2]
assert j["median_step_s"] > 0 and j["peak_rss_mb"] >= j["base_rss_mb"] > 0, j
assert (j["trainable"] == 0) == (m == "frozen") and (j["adapter_params"] > 0) == (m in ("lora", "flora")), j
assert m not in ("lora", "flora") or sum(j["conv_paths"].values()) == 5, j
' "$out" $m; then pass=$((pass + 1)); else echo "FAIL bench step $m: $out"; fail=$((fail + 1)); fi
done
check "inspect plan"      0 "ranks clipped to mode sizes: in 16->3" -- inspect --model smallcnn --method flora --ranks 16,16,2,2
check "inspect plan json" 0 '"adapter_params":15621' -- inspect --model smallcnn --method flora --ranks 16,16,2,2 --json
check "inspect arch"      0 "6 adaptable layers"     -- inspect --model smallcnn
check "inspect no model"  2 "need --model"           -- inspect --method flora
check "bench infer"       0 "5 adapted layer(s) weights merged"           -- bench step --model smallcnn --method flora --mode infer --batch-size 2 --image-size 16 --steps 1
check "bench bad method"  2 "frozen, full, lora or flora" -- bench step --model smallcnn --method dora
# the CPU block cache follows FLORA_CPU_CACHE_MB; a bad value stops before any work
for row in "64|0|CPU block cache: on, up to 64 MB" "0|0|CPU block cache: off" "lots|2|FLORA_CPU_CACHE_MB='lots'"; do
  IFS='|' read -r v want_rc want <<<"$row"
  out=$(FLORA_CPU_CACHE_MB=$v "$flora" doctor 2>&1); rc=$?
  if [[ $rc -eq $want_rc && $out == *"$want"* ]]; then pass=$((pass + 1)); else echo "FAIL doctor cache $v: rc=$rc $out"; fail=$((fail + 1)); fi
done
# the default thread count: OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK, else the affinity mask
for row in "OMP_NUM_THREADS=1 SLURM_CPUS_PER_TASK=2|0|threads: 1 (from OMP_NUM_THREADS;" \
           "SLURM_CPUS_PER_TASK=1|0|threads: 1 (from SLURM_CPUS_PER_TASK;" \
           "OMP_NUM_THREADS=1,2|0|threads: 1 (from OMP_NUM_THREADS;" \
           "SLURM_CPUS_PER_TASK=x2|2|SLURM_CPUS_PER_TASK='x2' is not a positive integer" \
           "OMP_NUM_THREADS=0|2|OMP_NUM_THREADS='0' is not a positive integer"; do
  IFS='|' read -r vars want_rc want <<<"$row"
  out=$(env -u OMP_NUM_THREADS -u SLURM_CPUS_PER_TASK $vars "$flora" doctor 2>&1); rc=$?
  if [[ $rc -eq $want_rc && $out == *"$want"* ]]; then pass=$((pass + 1)); else echo "FAIL doctor threads $vars: rc=$rc $out"; fail=$((fail + 1)); fi
done
out=$(env -u OMP_NUM_THREADS -u SLURM_CPUS_PER_TASK "$flora" --threads 1 doctor 2>&1)
if [[ $out == *"threads: 1 (from --threads;"* ]]; then pass=$((pass + 1)); else echo "FAIL doctor --threads: $out"; fail=$((fail + 1)); fi
check "threads negative"  2 "--threads"              -- --threads -1 doctor
# flora's own loops: on LibTorch's threads where CMake built flora with OpenMP (it says which in
# FLORA_EXPECT_PARALLEL_LOOPS); the AVX2 kernels off under FLORA_NO_AVX2.
if [[ -n ${FLORA_EXPECT_PARALLEL_LOOPS:-} ]]; then
  want="one thread (built without OpenMP)"; [[ $FLORA_EXPECT_PARALLEL_LOOPS == 1 ]] && want="on LibTorch's threads (OpenMP)"
  out=$("$flora" doctor 2>&1)
  if [[ $out == *"flora's loops: $want"* ]]; then pass=$((pass + 1)); else echo "FAIL doctor loops (want '$want'): $out"; fail=$((fail + 1)); fi
fi
out=$(FLORA_NO_AVX2=1 "$flora" doctor 2>&1)
if [[ $out == *"portable kernels"* ]]; then pass=$((pass + 1)); else echo "FAIL doctor FLORA_NO_AVX2: $out"; fail=$((fail + 1)); fi
if grep -qw avx512f /proc/cpuinfo 2>/dev/null && grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo; then
  out=$("$flora" doctor 2>&1)
  if [[ $out == *"AVX-512 for the narrow GEMMs"* ]]; then pass=$((pass + 1)); else echo "FAIL doctor AVX-512 CPU: $out"; fail=$((fail + 1)); fi
fi
out=$(FLORA_NO_AVX512=1 "$flora" doctor 2>&1)
if [[ $out != *"AVX-512"* ]]; then pass=$((pass + 1)); else echo "FAIL doctor FLORA_NO_AVX512: $out"; fail=$((fail + 1)); fi

# BLAS: with OpenBLAS's OpenMP build installed, the binary loads it whatever the system's
# alternative says (CMakeLists.txt, FLORA_OPENMP_BLAS); the pthreads build is reported with a warning
omp_dir=/usr/lib/x86_64-linux-gnu/openblas-openmp pth_dir=/usr/lib/x86_64-linux-gnu/openblas-pthread
if [[ -e $omp_dir/libblas.so.3 ]] && readelf -d "$flora" | grep -q "openblas-openmp"; then
  out=$("$flora" --threads 2 doctor 2>&1)
  if [[ $out == *"BLAS library: $omp_dir/"*"(set with the intra-op threads; OpenMP, sharing LibTorch's threads)"* && $out != *"pthreads build competes"* ]]
  then pass=$((pass + 1)); else echo "FAIL doctor blas openmp: $out"; fail=$((fail + 1)); fi
  if [[ -e $pth_dir/libblas.so.3 ]]; then
    out=$(LD_LIBRARY_PATH=$pth_dir "$flora" --threads 2 doctor 2>&1)
    if [[ $out == *"OpenBLAS's pthreads build is loaded with 2 threads"*"pthreads)"*"warning: OpenBLAS's pthreads build competes"* ]]
    then pass=$((pass + 1)); else echo "FAIL doctor blas pthreads: $out"; fail=$((fail + 1)); fi
  fi
fi
if [[ $(nproc --all) -gt 1 ]] && command -v taskset >/dev/null; then  # one CPU allowed: one thread, and said why
  out=$(env -u OMP_NUM_THREADS -u SLURM_CPUS_PER_TASK taskset -c 0 "$flora" doctor 2>&1)
  if [[ $out == *"threads: 1 (from the CPUs this process may run on (1 of"* ]]; then pass=$((pass + 1)); else echo "FAIL doctor taskset: $out"; fail=$((fail + 1)); fi
fi
check "bench bad against" 2 "--against 'dora' is unknown" -- bench step --model smallcnn --method flora --against dora
# --against: both models step, one ratio per timed step; the method's own fields are unchanged
out=$("$flora" bench step --model smallcnn --method flora --against frozen --batch-size 2 --image-size 16 --steps 3 --warmup 1 --json 2>&1)
if /usr/bin/python3 -c '
import json, sys
j = json.loads(sys.argv[1])
assert j["against"]["method"] == "frozen" and j["against"]["median_ratio"] > 0, j
assert j["adapter_params"] > 0 and sum(j["conv_paths"].values()) == 5, j
' "$out"; then pass=$((pass + 1)); else echo "FAIL bench step --against: $out"; fail=$((fail + 1)); fi
check "bench keep alone"  2 "--against-keep-inputs needs --against METHOD" -- bench step --model smallcnn --against-keep-inputs
# --keep-inputs / --against-keep-inputs: reported per side (vit_s_16's Linears recompute their inputs)
out=$("$flora" bench step --model vit_s_16 --method lora --rank 2 --targets '.*mlp\.3' --against lora --against-keep-inputs --batch-size 1 --image-size 16 --steps 2 --warmup 0 --json 2>&1)
if /usr/bin/python3 -c '
import json, sys
j = json.loads(sys.argv[1])
assert j["recompute_inputs"] is True and j["against"]["recompute_inputs"] is False, j
assert j["against"]["median_ratio"] > 0, j
' "$out"; then pass=$((pass + 1)); else echo "FAIL bench step --against-keep-inputs: $out"; fail=$((fail + 1)); fi
check "bench bad model"   2 "neither a TorchScript"  -- bench step --model resnet999
# conv paths: hybrid runs on every groups-1 conv; grouped convs and unknown names are refused first
check "bench bad path"    2 "separable or hybrid"    -- bench step --model smallcnn --conv-path bogus
check "bench hybrid dw"   2 "needs groups == 1, got groups 96" -- bench step --model convnext_tiny --conv-path hybrid --batch-size 2 --image-size 16 --steps 1
check "bench hybrid"      0 '"conv_paths":{"hybrid":5}' -- bench step --model smallcnn --conv-path hybrid --batch-size 2 --image-size 16 --steps 1 --warmup 0 --json
check "bench bad layout"  2 "'memory_format': 'nhwc' is invalid" -- bench step --model smallcnn --memory-format nhwc
# the layout each run used: channels-last by default on the CPU, contiguous when asked
for row in "auto|channels-last" "contiguous|contiguous" "channels-last|channels-last"; do
  IFS='|' read -r f want <<<"$row"
  out=$("$flora" bench step --model smallcnn --memory-format $f --batch-size 2 --image-size 16 --steps 1 --warmup 0 --json 2>&1)
  if [[ $out == *"\"memory_format\":\"$want\""* ]]; then pass=$((pass + 1)); else echo "FAIL bench layout $f: $out"; fail=$((fail + 1)); fi
done

echo "cli: $pass passed, $fail failed"
[[ $fail -eq 0 ]]

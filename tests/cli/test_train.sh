#!/usr/bin/env bash
# End to end: `flora train`, `eval` and `forward` on tiny generated data (tests/cli/make_data.py
# writes MNIST, CIFAR-10 and ImageFolder files): the run directory's contents, a resume after
# SIGKILL ending with the same adapter as an uninterrupted run, SIGINT saving a checkpoint, a
# TorchScript model from PyTorch, and every input error exiting non-zero with its message
# before training starts.
# Usage: test_train.sh BUILD_BIN_DIR
set -u
bin="$(cd "$1" && pwd)"
flora="$bin/flora"
python="${FLORA_PYTHON:-/usr/bin/python3}"
here="$(cd "$(dirname "$0")" && pwd)"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
"$python" "$here/make_data.py" data 24 || { echo "FAIL: make_data.py"; exit 1; }
pass=0 fail=0
ok() { pass=$((pass + 1)); }
no() { fail=$((fail + 1)); echo "FAIL $1"; }
check() {  # check NAME EXPECTED_RC EXPECTED_SUBSTRING -- ARGS...
  local name=$1 want_rc=$2 want=$3; shift 4
  local out rc
  out=$("$flora" "$@" 2>&1); rc=$?
  if [[ $rc -eq $want_rc && $out == *"$want"* ]]; then ok; else no "$name: rc=$rc (want $want_rc)"; echo "$out" | tail -5; fi
}
same() {  # same A.safetensors B.safetensors: equal to 1e-6
  INTEROP="$here/../interop" "$python" -c '
import os, sys
sys.path.insert(0, os.environ["INTEROP"]); import st
a, b = st.load(sys.argv[1]), st.load(sys.argv[2])
assert a.keys() == b.keys(), (sorted(a), sorted(b))
d = max((a[k] - b[k]).abs().max().item() for k in a)
print("max diff", d); sys.exit(0 if d <= 1e-6 else 1)' "$1" "$2"
}

common=(--model smallcnn --num-classes 10 --batch-size 8 --lr 3e-3 --log-every 2)
# 1. The three data formats, and what a run directory holds.
check "train folder" 0 "flora: done" -- train "${common[@]}" --data imagefolder:data/folder/train \
  --val-data imagefolder:data/folder/val --image-size 16 --epochs 2 --out run_folder
for f in adapter/adapter_config.json adapter/adapter_model.safetensors adapter/trained_modules.safetensors \
         best/adapter_config.json checkpoints/last.safetensors metrics.jsonl config.yaml report.html; do
  [[ -s run_folder/$f ]] && ok || no "run dir lacks $f"
done
grep -q '"type":"eval"' run_folder/metrics.jsonl && grep -q '"top1"' run_folder/metrics.jsonl && ok || no "metrics: eval lines"
grep -q '"images_per_s"' run_folder/metrics.jsonl && grep -q '"lr"' run_folder/metrics.jsonl && ok || no "metrics: train lines"
grep -q "<svg" run_folder/report.html && grep -q "<polyline" run_folder/report.html && ok || no "report has no SVG curve"
grep -q "^method: flora" run_folder/config.yaml && grep -q "^image_size: 16" run_folder/config.yaml && ok || no "config.yaml"
check "train mnist lora" 0 "flora: done" -- train "${common[@]}" --data mnist:data/mnist --method lora --rank 4 --steps 6 --out run_mnist
grep -q '"peft_type": "LORA"' run_mnist/adapter/adapter_config.json && ok || no "lora adapter is PEFT LORA"
check "train cifar yaml" 0 "flora: done" -- train "$here/train_example.yaml" data=cifar10:data/cifar out=run_yaml steps=4
grep -q "^ranks: 8,8,2,2" run_yaml/config.yaml && grep -q "^steps: 4" run_yaml/config.yaml && ok || no "yaml + override resolved"

# 2. eval and forward with the trained adapter.
check "eval" 0 '"top1"' -- eval --model smallcnn --adapter run_folder/adapter --data imagefolder:data/folder/val --image-size 16
HERE="$here" "$python" -c '
import os, sys; sys.path.insert(0, os.path.join(os.environ["HERE"], "..", "interop")); import st, torch
st.save("in.safetensors", {"input": torch.randn(2, 3, 16, 16)})'
check "forward" 0 "output [2, 10]" -- forward --model smallcnn --adapter run_folder/adapter --input in.safetensors --output out.safetensors
check "forward no input" 1 "" -- forward --model smallcnn --input none.safetensors --output out2.safetensors
# merge a native model's run (adapters and the new head) into a state dict: the same outputs.
# The base is a saved state (a 2-step full run with BatchNorm updates writes every tensor).
check "base weights" 0 "flora: done" -- train --model smallcnn --data procedural:shapes:20 --method full --steps 2 \
  --batch-size 8 --image-size 16 update_batchnorm=true --out run_base
check "adapt base" 0 "flora: done" -- train "${common[@]}" --weights run_base/adapter/trained_modules.safetensors \
  --data procedural:glyphs:20 --image-size 16 --steps 3 --out run_adapt num_classes=12
w=(--model smallcnn --weights run_base/adapter/trained_modules.safetensors)
check "forward adapted" 0 "output [2, 12]" -- forward "${w[@]}" --adapter run_adapt/adapter --input in.safetensors --output out_a.safetensors
# --num-classes as trained, with the base file's original head: replaced after the weights load.
check "forward adapted, K given" 0 "output [2, 12]" -- forward "${w[@]}" --num-classes 12 --adapter run_adapt/adapter \
  --input in.safetensors --output out_k.safetensors
same out_a.safetensors out_k.safetensors && ok || no "--num-classes changed the adapted output"
check "K without a head" 2 "no --adapter brings a trained 12-class one" -- forward "${w[@]}" --num-classes 12 \
  --input in.safetensors --output out_x.safetensors
mkdir -p head_only && cp run_adapt/adapter/trained_modules.safetensors head_only/
check "forward head only" 0 "output [2, 12]" -- forward "${w[@]}" --adapter head_only --input in.safetensors --output out_b.safetensors
check "merge native" 0 "merged 5 adapted" -- merge "${w[@]}" --adapter run_adapt/adapter --out merged.safetensors
check "merged needs K"  1 "another class count: --num-classes K" -- forward --model smallcnn --weights merged.safetensors --input in.safetensors --output out_m.safetensors
check "forward merged" 0 "output [2, 12]" -- forward --model smallcnn --num-classes 12 --weights merged.safetensors --input in.safetensors --output out_m.safetensors
HERE="$here" "$python" -c '
import os, sys; sys.path.insert(0, os.path.join(os.environ["HERE"], "..", "interop")); import st
a, m = st.load("out_a.safetensors")["output"], st.load("out_m.safetensors")["output"]
b = st.load("out_b.safetensors")["output"]  # the same head without the adapters
d, e = (a - m).abs().max().item(), (a - b).abs().max().item()
print("merged vs adapted", d, "adapters change the output by", e); sys.exit(0 if d <= 1e-5 and e > 1e-4 else 1)' && ok || no "merged native model differs from the adapted one"

# 3. SIGKILL, then --resume: the same adapter as an uninterrupted run.
base=("${common[@]}" --data cifar10:data/cifar --val-data cifar10:data/cifar --checkpoint-every 3)
long=("${base[@]}" --steps 60)
"$flora" train "${long[@]}" --out run_a >/dev/null 2>&1 || no "uninterrupted run"
"$flora" train "${long[@]}" --out run_b >/dev/null 2>&1 & pid=$!
for _ in $(seq 1 1200); do [[ -e run_b/checkpoints/last.safetensors ]] && break; sleep 0.05; done  # up to 60 s on a loaded machine
sleep 0.2; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
check "resume needs flag" 2 "already has a checkpoint" -- train "${long[@]}" --out run_b
check "resume" 0 "flora: done" -- train "${long[@]}" --out run_b --resume
same run_a/adapter/adapter_model.safetensors run_b/adapter/adapter_model.safetensors && ok || no "resumed adapter differs"
same run_a/adapter/trained_modules.safetensors run_b/adapter/trained_modules.safetensors && ok || no "resumed head differs"
[[ $(grep -c '"type":"train"' run_a/metrics.jsonl) -eq $(grep -c '"type":"train"' run_b/metrics.jsonl) ]] && ok || no "resumed metrics duplicate or miss lines"

# 4. SIGINT saves a checkpoint and exits 130.
"$flora" train "${base[@]}" --steps 100000 --out run_int >/dev/null 2>int.err & pid=$!
for _ in $(seq 1 1200); do [[ -e run_int/metrics.jsonl && -s run_int/metrics.jsonl ]] && break; sleep 0.05; done
kill -INT $pid; wait $pid; rc=$?
[[ $rc -eq 130 ]] && grep -q "checkpoint saved" int.err && [[ -s run_int/checkpoints/last.safetensors ]] && ok || { no "SIGINT: rc=$rc"; cat int.err | tail -3; }

# 5. A TorchScript model exported by PyTorch trains too.
"$python" "$here/../interop/make_models.py" . && check "train torchscript" 0 "flora: done" -- train --model scripted.pt \
  --data imagefolder:data/folder/train --image-size 8 --num-classes 4 --steps 3 --batch-size 4 --out run_ts
[[ -s run_ts/adapter/adapter_model.safetensors ]] && ok || no "torchscript adapter"

# 5a. Recomputed adapter inputs (ViT: LayerNorm, attention and GELU before its Linears; ConvNeXt:
# a channels-last LayerNorm and GELU) train the same adapter as kept inputs.
for m in vit_s_16 convnext_tiny; do
  for r in true false; do
    check "$m recompute $r" 0 "flora: done" -- train --model $m --targets all-linear --ranks 4,4 --data procedural:shapes \
      --num-classes 10 --image-size 32 --batch-size 4 --steps 3 --lr 1e-2 --recompute-inputs $r --out run_${m}_$r
  done
  same run_${m}_true/adapter/adapter_model.safetensors run_${m}_false/adapter/adapter_model.safetensors && ok || no "$m recompute: adapters differ"
done

# 5b. A NaN loss stops the run with a clear message and keeps the last good checkpoint.
check "nan loss" 1 "loss is NaN" -- train --model smallcnn --data mnist:data/mnist --num-classes 10 --lr 1e30 --clip-grad 0 \
  --steps 30 --checkpoint-every 1 --batch-size 8 --out run_nan
[[ -s run_nan/checkpoints/last.safetensors ]] && ok || no "NaN run lost its checkpoint"

# 6. Bad input: a clear error before any training.
mkdir -p empty/cls bad/cls; echo "not an image" > bad/cls/x.png
check "missing dir"   2 "does not exist"          -- train --model smallcnn --data imagefolder:nope --image-size 8 --out r1
check "no images"     1 "no images"               -- train --model smallcnn --data imagefolder:empty --image-size 8 --out r2
check "bad image"     1 "cannot decode"           -- train --model smallcnn --data imagefolder:bad --image-size 8 --out r3
check "image size 0"  2 "image_size"              -- train --model smallcnn --data imagefolder:data/folder/train --out r4
check "bad method"    2 "flora, lora, full or frozen" -- train --model smallcnn --data mnist:data/mnist --method dora --out r5
check "bad ranks"     2 "positive ranks"                  -- train --model smallcnn --data mnist:data/mnist --ranks 0,8,2,2 --out r6
check "unknown key"   2 "unknown config key 'lr_max'" -- train --model smallcnn --data mnist:data/mnist lr_max=1 --out r7
check "bad number"    2 "'fast' is invalid"       -- train --model smallcnn --data mnist:data/mnist --lr fast --out r8
check "bad model"     2 "neither a TorchScript"   -- train --model resnet999 --data mnist:data/mnist --out r9
check "no out"        2 "no run directory"        -- train --model smallcnn --data mnist:data/mnist
check "classes"       2 "--num-classes 10"        -- train --model scripted.pt --data cifar10:data/cifar --steps 1 --out r10
check "bad kind"      2 "imagefolder:DIR"         -- train --model smallcnn --data svhn:data --out r11
check "help"          0 "--num-classes"           -- train --help
check "bad task"      2 "procedural task 'faces'"  -- train --model smallcnn --data procedural:faces --out r12
check "frozen no head" 2 "nothing to train"       -- train --model smallcnn --data procedural:shapes:20 --method frozen --out r13

# 5. The demo's mechanics (--quick: tiny data; the accuracies mean nothing): a pretrained base,
# five runs, the table, the report; the second run reuses the cached base.
check "demo" 0 "LoRA r=8" -- demo --quick --out demo
for f in report.html results.json pretrain/adapter/trained_modules.safetensors runs/flora/adapter/adapter_model.safetensors \
         runs/lora_eq/adapter/adapter_config.json runs/full/adapter/trained_modules.safetensors; do
  [[ -s demo/$f ]] && ok || no "demo lacks $f"
done
"$python" -c '
import json, sys
r = {x["name"]: x for x in json.load(open(sys.argv[1]))["runs"]}
assert sorted(r) == ["flora", "full", "head", "lora", "lora_eq"], sorted(r)
assert r["head"]["trainable"] == 1290 and r["head"]["adapter_params"] == 0, r["head"]
assert 0 < r["flora"]["adapter_params"] < r["lora"]["adapter_params"], (r["flora"], r["lora"])
assert abs(r["lora_eq"]["adapter_params"] - r["flora"]["adapter_params"]) < abs(r["lora"]["adapter_params"] - r["flora"]["adapter_params"])
assert all(x["peak_rss_mb"] > 50 and x["median_step_s"] > 0 and 0 <= x["top1"] <= 100 for x in r.values()), r
' demo/results.json && ok || no "demo results.json"
check "demo cached" 0 "reusing" -- demo --quick --out demo
# 5c. The study's mechanics (bench study --quick, shrunk further: one seed, one target, tiny runs; the
# accuracies mean nothing): every method, the bench phase, the outputs, counts equal to `flora params`.
check "study" 0 "study took" -- bench study --quick --seeds 1 --targets glyphs --images 64 --epochs 1 \
  --source-images 300 --out study
for f in study.json tables.md accuracy_glyphs.svg scale.svg lr.svg bench.json; do
  [[ -s study/$f ]] && ok || no "study lacks $f"
done
"$python" - "$flora" study <<'PY' && ok || no "study results"
import glob, json, subprocess, sys, xml.etree.ElementTree as ET
flora, d = sys.argv[1], sys.argv[2]
s = json.load(open(d + "/study.json"))
assert s["runs_missing"] == 0 and s["runs_planned"] == len(glob.glob(d + "/runs/*.json")), s["runs_planned"]
assert {c["family"] for c in s["configs"]} == {"head", "full", "lora", "flora", "tucker2", "cp"}, s["configs"]
assert [b["method"] for b in s["bench"]] == ["frozen", "full", "lora", "flora", "tucker2", "cp"], s["bench"]
assert all(b["median_step_s"] > 0 and b["peak_rss_mb"] > 50 for b in s["bench"]), s["bench"]
assert any(h["reference"] for h in s["headline"]) and s["scale_sweep"] and s["lr_sweep"], s["headline"]
for f in glob.glob(d + "/*.svg"):
    ET.parse(f)
shapes = [[32, 3, 3, 3], [64, 32, 3, 3], [64, 64, 3, 3], [128, 64, 3, 3], [128, 128, 3, 3]]  # smallcnn's convs
def count(r):  # the adapters' parameters by `flora params`, layer by layer (ranks clipped as train clips them)
    total = 0
    for sh in shapes:
        if r["core"] == "diagonal":  # CP: R core values + R per index of every mode (R may exceed a mode)
            total += r["ranks"][0] * (1 + sum(sh)); continue
        a = ["--method", "lora", "--rank", str(r["rank"])] if r["method"] == "lora" else \
            ["--ranks", ",".join(str(min(x, n)) for x, n in zip(r["ranks"], sh))] + \
            (["--identity", ",".join(map(str, r["identity"]))] if r["identity"] else [])
        out = subprocess.run([flora, "params", "--shape", ",".join(map(str, sh)), "--json"] + a, capture_output=True, text=True, check=True)
        total += json.loads(out.stdout)["trainable"]
    return total
for f in glob.glob(d + "/runs/*.json"):
    r = json.load(open(f))
    assert 0 <= r["top1"] <= 100 and r["top1_per_epoch"] and r["peak_rss_mb"] > 50 and r["wall_s"] > 0, r["name"]
    if r["method"] in ("lora", "flora") and r["targets"] == "":
        assert r["adapter_params"] == count(r), (r["name"], r["adapter_params"], count(r))
    if r["method"] == "frozen":
        assert r["trainable"] == 1290 and r["adapter_params"] == 0, r
PY
check "study cached" 0 "0 run now" -- bench study --quick --seeds 1 --targets glyphs --images 64 --epochs 1 \
  --source-images 300 --out study --phase report
check "study fresh" 0 "(0 reused)" -- bench study --quick --seeds 1 --targets glyphs --images 64 --epochs 1 \
  --source-images 300 --out study --phase accuracy --fresh
check "study bad phase" 2 "--phase 'x'" -- bench study --phase x --out study
for r in r1 r2 r3 r4 r5 r6 r7 r8 r9 r10 r11 r12 r13; do [[ ! -e $r/checkpoints/last.safetensors ]] || no "$r trained despite an error"; done

echo "train: $pass passed, $fail failed"
[[ $fail -eq 0 ]]

#!/usr/bin/env bash
# Data-parallel training end to end on loopback (Gloo): 2 processes with batch B end with the
# adapter 1 process with batch 2B ends with (--augment none, fixed BatchNorm statistics), whether
# started by `flora train --nproc 2`, by torchrun or by SLURM's variables; rank 0 alone writes;
# evaluation covers the whole validation set once; an interrupted 2-process run resumes to the
# uninterrupted adapter; a killed or a hung worker ends the whole job, in bounded time, with a
# message; bad launches are refused before any work.
# Usage: test_distributed.sh BUILD_BIN_DIR
set -u
bin="$(cd "$1" && pwd)"
flora="$bin/flora"
python="${FLORA_PYTHON:-/usr/bin/python3}"
here="$(cd "$(dirname "$0")" && pwd)"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"; pkill -P $$ 2>/dev/null' EXIT
cd "$tmp"
pass=0 fail=0
ok() { pass=$((pass + 1)); }
no() { fail=$((fail + 1)); echo "FAIL $1"; }
# diff A.safetensors B.safetensors: prints the largest absolute difference over all tensors
diff_st() {
  INTEROP="$here/../interop" "$python" -c '
import os, sys
sys.path.insert(0, os.environ["INTEROP"]); import st
a, b = st.load(sys.argv[1]), st.load(sys.argv[2])
assert a.keys() == b.keys(), (sorted(a), sorted(b))
print(max((a[k] - b[k]).abs().max().item() for k in a))' "$1" "$2"
}
# within LIMIT A B DIFF: DIFF <= LIMIT ; beyond LIMIT DIFF: DIFF > LIMIT
within() { "$python" -c 'import sys; sys.exit(0 if float(sys.argv[2]) <= float(sys.argv[1]) else 1)' "$1" "$2"; }
port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# 256 training images: 16 steps of 16; 500 validation images (not a multiple of 2 x 8). One
# epoch at lr 3e-4: float32 sums in another order drift apart with more Adam steps, faster than
# linearly (32 steps at lr 1e-3 exceeded 1e-5 for 4 of 5 seeds; docs/DISTRIBUTED.md).
common=(--model smallcnn --num-classes 10 --data procedural:shapes:256 --val-data procedural:shapes:512 --augment none
        --epochs 1 --seed 5 --log-every 4 --workers 1 --lr 3e-4)
adapter=adapter/adapter_model.safetensors

"$flora" train "${common[@]}" --batch-size 16 --out one_2b >one_2b.log 2>&1 || no "1 process, batch 2B"
"$flora" train "${common[@]}" --batch-size 8 --out one_b >one_b.log 2>&1 || no "1 process, batch B"
"$flora" train "${common[@]}" --batch-size 8 --nproc 2 --out two >two.log 2>&1 || { no "--nproc 2"; tail -5 two.log; }

# 1. The same adapter as one process with the global batch; a different one with batch B only.
d=$(diff_st one_2b/$adapter two/$adapter)
if within 1e-5 "$d"; then ok; else no "--nproc 2 vs 1 process 2B: max diff $d > 1e-5"; fi
d=$(diff_st one_2b/adapter/trained_modules.safetensors two/adapter/trained_modules.safetensors)
if within 1e-5 "$d"; then ok; else no "head: max diff $d > 1e-5"; fi
d=$(diff_st one_b/$adapter two/$adapter)
if within 1e-4 "$d"; then no "2 x B should differ from 1 x B (diff $d)"; else ok; fi
# with accumulation: 2 processes x 2 micro-batches of 4 = 1 process x 2 micro-batches of 8
"$flora" train "${common[@]}" --batch-size 8 --grad-accum 2 --out acc_one >acc_one.log 2>&1 || no "1 process, accumulation"
"$flora" train "${common[@]}" --batch-size 4 --grad-accum 2 --nproc 2 --out acc_two >acc_two.log 2>&1 || no "--nproc 2, accumulation"
# (1e-4: accumulation alone, in one process, moves this run by 3e-5 against batch 16 without it)
d=$(diff_st acc_one/$adapter acc_two/$adapter)
if within 1e-4 "$d"; then ok; else no "accumulation: --nproc 2 vs 1 process: max diff $d"; fi

# 2. Rank 0 alone writes: one metrics stream, the same steps and evaluations as the 1-process
#    run; each evaluation saw the 500 validation images once, with the same top-1.
"$python" - one_2b/metrics.jsonl two/metrics.jsonl <<'EOF' && ok || no "metrics of the 2-process run"
import json, sys
one, two = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
assert [(r["type"], r["step"]) for r in one] == [(r["type"], r["step"]) for r in two], "different log lines"
ev1, ev2 = [r for r in one if r["type"] == "eval"], [r for r in two if r["type"] == "eval"]
assert len(ev2) == 1 and all(r["samples"] == 500 for r in ev2), ev2
assert all(abs(a["top1"] - b["top1"]) < 1e-9 and abs(a["eval_loss"] - b["eval_loss"]) < 1e-4 for a, b in zip(ev1, ev2)), (ev1, ev2)
tr = [r for r in two if r["type"] == "train"]
assert all(r["processes"] == 2 and 0 < r["allreduce_bytes_per_step"] < 100000 for r in tr), tr[0]
assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip([r for r in one if r["type"] == "train"], tr)), "logged loss is not global"
EOF
grep -q "data-parallel: 2 processes (gloo" two.log && ok || no "startup line names the processes and backend"
grep -q "bytes all-reduced per step" two.log && ok || no "startup line reports the bytes per step"
[[ $(grep -c "flora: done" two.log) -eq 1 ]] && ok || no "only rank 0 reports"

# BatchNorm statistics trained too: rank 0's are broadcast before evaluation and saving
"$flora" train "${common[@]}" --batch-size 8 --nproc 2 --update-batchnorm true --out bn >bn.log 2>&1 && ok || { no "--update-batchnorm with 2 processes"; tail -n 3 bn.log; }

# 3. torchrun (Debian's needs a one-line parser fix on Python 3.11: torchrun.py) and SLURM's variables.
p=$(port)
"$python" "$here/torchrun.py" --no_python --nproc_per_node=2 --master_port="$p" \
  "$flora" train "${common[@]}" --batch-size 8 --out torchrun >torchrun.log 2>&1 || { no "torchrun"; tail -5 torchrun.log; }
d=$(diff_st one_2b/$adapter torchrun/$adapter)
if within 1e-5 "$d"; then ok; else no "torchrun vs 1 process 2B: max diff $d"; fi
p=$(port)
# As srun --cpus-per-task=1 would: 2 tasks on 2 cores get 1 thread each, from SLURM_CPUS_PER_TASK
# (OMP_NUM_THREADS unset). Left at 2 threads each, the run is oversubscribed and its float32 sums round
# differently; after 32 Adam steps that moved the adapter by 9e-5 (hybrid conv path) or 4.5e-6
# (factorized) from the 1-process run, while per-step gradients of both paths match float64
# to the same 1e-6.
for r in 1 0; do
  env -u RANK -u WORLD_SIZE -u OMP_NUM_THREADS SLURM_CPUS_PER_TASK=1 SLURM_PROCID=$r SLURM_NTASKS=2 SLURM_LOCALID=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$p \
    "$flora" train "${common[@]}" --batch-size 8 --out slurm >slurm$r.log 2>&1 &
done
wait
d=$(diff_st one_2b/$adapter slurm/$adapter)
if within 1e-5 "$d"; then ok; else no "SLURM variables vs 1 process 2B: max diff $d"; tail -n 3 slurm0.log slurm1.log; fi

# 4. Interrupt (SIGINT to the launcher) and resume: the uninterrupted adapter, augmentation on.
aug=(--model smallcnn --num-classes 10 --data procedural:shapes:512 --augment default --epochs 3 --seed 5 --workers 1 --batch-size 8)
"$flora" train "${aug[@]}" --nproc 2 --out aug_full >aug_full.log 2>&1 || no "augmented 2-process run"
"$flora" train "${aug[@]}" --nproc 2 --out aug_part >aug_part.log 2>&1 &
launcher=$!
for _ in $(seq 1200); do grep -q "step [1-9][0-9]/96" aug_part.log 2>/dev/null && break; sleep 0.05; done
kill -INT $launcher; wait $launcher; rc=$?
[[ $rc -eq 130 ]] && ok || { no "interrupted 2-process run: rc=$rc (want 130)"; tail -3 aug_part.log; }
grep -q "checkpoint saved" aug_part.log && ok || no "interrupt saves a checkpoint"
out=$("$flora" train "${aug[@]}" --out aug_part --resume 2>&1); rc=$?
[[ $rc -eq 2 && $out == *"written by 2 process(es), now 1"*"--nproc 2"* ]] && ok || no "resume with another process count: rc=$rc $out"
"$flora" train "${aug[@]}" --nproc 2 --out aug_part --resume >aug_resume.log 2>&1 || no "2-process resume"
d=$(diff_st aug_full/$adapter aug_part/$adapter)
if within 0 "$d"; then ok; else no "resumed 2-process adapter differs by $d"; fi

# 5. A killed worker, then a hung one (SIGSTOP): the job ends, non-zero, in bounded time.
long=(--model smallcnn --num-classes 10 --data procedural:shapes:2000 --augment none --epochs 100 --workers 1 --batch-size 8)
for mode in kill hang; do
  "$flora" train "${long[@]}" --nproc 2 --dist-timeout 3 --out $mode >$mode.log 2>&1 &
  launcher=$!
  for _ in $(seq 1200); do grep -q "step " $mode.log 2>/dev/null && break; sleep 0.05; done
  worker=$(pgrep -P $launcher | tail -1)
  start=$(date +%s)
  if [[ $mode == kill ]]; then kill -9 "$worker"; else kill -STOP "$worker"; fi
  wait $launcher; rc=$?
  took=$(( $(date +%s) - start ))
  [[ $rc -ne 0 && $took -le 20 ]] && ok || no "$mode: rc=$rc after ${took}s (want non-zero within 20 s)"
  grep -q "data-parallel job failed: worker" $mode.log && ok || { no "$mode: no job failure message"; tail -4 $mode.log; }
  [[ $(pgrep -P $launcher | wc -l) -eq 0 ]] && ! pgrep -f "out $mode" >/dev/null && ok || no "$mode: workers left running"
done
grep -q "killed by signal 9" kill.log && ok || no "kill: the message names the signal"
grep -q "did not complete within 3 s" hang.log && ok || no "hang: the error names the timeout"
grep -q "another worker died" kill.log && ok || { no "kill: the error says a worker died"; grep -v "^epoch" kill.log | tail -n 4; }

# 6. Bad launches fail before any work.
check() {  # check NAME RC SUBSTRING -- ENV... -- ARGS...
  local name=$1 want_rc=$2 want=$3; shift 4
  local envs=(); while [[ $1 != -- ]]; do envs+=("$1"); shift; done; shift
  local out rc; out=$(env "${envs[@]}" "$flora" "$@" 2>&1); rc=$?
  if [[ $rc -eq $want_rc && $out == *"$want"* ]]; then ok; else no "$name: rc=$rc"; echo "$out" | tail -3; fi
}
check "nproc 0" 2 "--nproc" -- X=1 -- train "${common[@]}" --nproc 0 --out bad1
check "nproc inside a job" 2 "inside a launched job" -- RANK=0 WORLD_SIZE=2 -- train "${common[@]}" --nproc 2 --out bad2
check "rank >= world" 2 "is not below the world size" -- RANK=2 WORLD_SIZE=2 -- train "${common[@]}" --out bad3
check "bad port" 2 "MASTER_PORT='0'" -- RANK=0 WORLD_SIZE=2 MASTER_PORT=0 -- train "${common[@]}" --out bad4
check "bad timeout" 2 "dist_timeout" -- X=1 -- train "${common[@]}" --dist-timeout 0 --out bad5
check "bad config before spawning" 2 "method" -- X=1 -- train "${common[@]}" --method nope --nproc 2 --out bad6
p=$(port)
check "peer never comes" 1 "could not join" -- RANK=1 WORLD_SIZE=2 MASTER_PORT=$p -- train "${common[@]}" --dist-timeout 2 --out bad7
for r in bad1 bad2 bad3 bad4 bad5 bad6 bad7; do [[ ! -e $r/checkpoints/last.safetensors ]] || no "$r trained despite an error"; done

echo "distributed: $pass passed, $fail failed"
[[ $fail -eq 0 ]]

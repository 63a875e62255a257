#!/usr/bin/env bash
# Regenerates the golden fixture with tests/golden/make_golden.py (Debian's PyTorch) and checks
# that it equals the committed tests/data/golden.json byte for byte, so the numbers that
# tests/test_golden.cpp trusts are exactly what the committed script produces.
# Usage: tests/golden/check_golden.sh      (ctest runs it as golden.regenerates)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${FLORA_GOLDEN_PYTHON:-/usr/bin/python3}"  # not a pyenv/venv python: it must see python3-torch
fixture="$root/tests/data/golden.json"

if ! "$python" -c 'import torch' >/dev/null 2>&1; then
  echo "golden: skipped (no python3-torch)"
  exit 0
fi
[[ -f "$fixture" ]] || { echo "golden: FAIL: $fixture is missing" >&2; exit 1; }

tmp="$(mktemp "${TMPDIR:-/tmp}/golden.XXXXXX.json")"
trap 'rm -f "$tmp"' EXIT
if ! "$python" "$here/make_golden.py" "$tmp"; then
  echo "golden: FAIL: tests/golden/make_golden.py did not run" >&2
  exit 1
fi

if cmp -s "$tmp" "$fixture"; then
  echo "golden: regenerated fixture matches"
  exit 0
fi

# Different bytes: say where (and accept a fixture that differs only in the recorded torch version).
"$python" - "$fixture" "$tmp" <<'PY'
import json, sys
old, new = (json.load(open(p)) for p in sys.argv[1:3])
v_old, v_new = old.pop("torch_version", None), new.pop("torch_version", None)
if old == new:
    print("golden: regenerated fixture matches (recorded with torch %s, regenerated with %s)" % (v_old, v_new))
    sys.exit(0)
print("golden: FAIL: tests/data/golden.json differs from what tests/golden/make_golden.py writes", file=sys.stderr)
for a, b in zip(old.get("cases", []), new.get("cases", [])):
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if keys:
        print("  case %s: %s differ" % (a.get("name"), ", ".join(keys)), file=sys.stderr)
if len(old.get("cases", [])) != len(new.get("cases", [])) or any(old.get(k) != new.get(k) for k in set(old) | set(new) if k != "cases"):
    print("  top-level entries or case count differ", file=sys.stderr)
print("  (regenerate with: /usr/bin/python3 tests/golden/make_golden.py, then review the diff)", file=sys.stderr)
sys.exit(1)
PY

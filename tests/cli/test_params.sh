#!/usr/bin/env bash
# End-to-end checks of `flora params`: the seed's worked numbers, --json, and error exits.
# Usage: test_params.sh PATH/TO/flora
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
echo "cli params: $pass passed, $fail failed"
[[ $fail -eq 0 ]]

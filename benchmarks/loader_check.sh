#!/usr/bin/env bash
# Does the data loader keep up with REP3D training on a GPU? (issue 7, item 6)
# Trains the full-size REP3D (fft depthwise convs, AMP) for a few dozen iterations on a synthetic
# CT-like dataset of realistic volume size, with the paper's loader defaults and then with more
# workers, and prints main_train.py's own measure of the time the loop waited for data.
# Usage (on a GPU machine, from the repository root): bash benchmarks/loader_check.sh [out_dir] [iters]
set -euo pipefail
out=${1:-/tmp/loader_check}
iters=${2:-60}
data=$out/data
mkdir -p "$out"
# 8 training cases of 192 x 192 x 144 voxels at 2 mm: a large abdominal CT field of view
python3 demo_data.py --root "$data" --n_train 8 --n_val 1 --size 192 192 144
common=(--root "$data" --dataset demo --roi 96 96 96 --network REP3D --max_iter "$iters" --eval_step 100000 --amp bf16)
for setting in "--num_workers 2 --cache_rate 0.1" "--num_workers 8 --cache_rate 0.1" "--num_workers 8 --cache_rate 1.0"; do
  name=$(echo "$setting" | tr -d ' -')
  echo "== $setting"
  # shellcheck disable=SC2086
  python3 main_train.py "${common[@]}" $setting --output "$out/run_$name" 2>&1 | grep -E "waited for data|finished|parameters" || true
  python3 -c "import json; s=json.load(open('$out/run_$name/summary.json')); print({k: s[k] for k in ('steps', 'train_time_s', 'data_wait_s', 'data_wait_fraction')})"
done

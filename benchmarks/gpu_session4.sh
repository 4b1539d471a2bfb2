#!/bin/bash
# issue 25, session 4: the final GPU call (tests, step/inference, the real loop, host profile)
export PYTHONUNBUFFERED=1
timeout 100 python3 -m pytest -q tests/test_layout.py tests/test_graphs.py 2>&1 | tail -3 | tee $OUT/tests.txt
timeout 200 python3 -m benchmarks.step_profile --reps 25 --sections step,infer --step "REP3D,REP3D+graph,REP3D_FixedPrior,REP3D_FixedPrior+graph,nnUNet,nnUNet+graph" --infer "REP3D,nnUNet" --json $OUT/sp.json > $OUT/sp.txt 2>&1
grep -E "^step|^infer|ratio" $OUT/sp.txt | cut -c1-200
timeout 230 python3 -m benchmarks.store_loop --out /tmp/sl --commands default --cases 12 --max_iter 80 --no-off --gen_workers 16 > $OUT/store_loop.txt 2>&1
tail -12 $OUT/store_loop.txt | cut -c1-300
timeout 40 python3 -m benchmarks.host_profile > $OUT/host.txt 2>&1
head -45 $OUT/host.txt | cut -c1-160

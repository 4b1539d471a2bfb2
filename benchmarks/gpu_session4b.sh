#!/bin/bash
# issue 25, session 4, last GPU call: the gathered single-channel convolution, then step and inference
export PYTHONUNBUFFERED=1
timeout 80 python3 -m pytest -q tests/test_layout.py -k "cuda or triton or decoder" 2>&1 | tail -2
timeout 210 python3 -m benchmarks.step_profile --reps 25 --sections norms,step,infer --step "REP3D,REP3D+graph,REP3D_FixedPrior+graph,nnUNet" --infer "REP3D,nnUNet" --json $OUT/sp.json > $OUT/sp.txt 2>&1
grep -E "^step|^infer|ratio|^conv|LayerNorm|^tail" $OUT/sp.txt | cut -c1-200

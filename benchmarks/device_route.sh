#!/usr/bin/env bash
# Routed inference on the device's GPU:  bash benchmarks/device_route.sh [SECTION...]   (results in $OUT, default /tmp/out)
# Sections (default: kernel route): kernel (benchmarks/kernel_check.py: the fused kernels against float32
# references, their decode sites' GPU times with a tile sweep, the fused base-linear forms beside cuBLAS), route
# (SmolLM2-135M shape, decode, batch 64:
# 1 and 64 distinct adapters with the base, profiled; 8 with PEFT beside; 64 at mixed ranks 4/16), route-8b
# (a Llama-3-8B layer shape with 2 layers: 64 and 1,024 resident experts, then 1,024 paged into 64 device
# slots), dependent (benchmarks/dependent_check.py: dependent update launches give the independent ones'
# logits, replay after replay; benchmarks/dependent_sweep.py: the two-launch form's sizes with them), linears
# (the same check, then the linears-and-shrinks launch's sizes swept at both shapes),
# ncu (benchmarks/linear_ncu.py under Nsight Compute: the 8B decode sites' linears, cuBLAS's and fused, by hardware counters),
# host (benchmarks/route_host.py: where the host's time goes in an eager decode step, 135M shape),
# and before / before-8b / before-host (route, route-8b and host's main runs with the code in
# .devcarry/old-src, for a before/after in one session). Models have random weights of the real shapes (benchmarks/shapes).
# Carried, not committed: .whl (pinned wheels the image lacks) and, for before, .devcarry/old-src.
set -euo pipefail
[ -d /tmp/site/transformers ] ||  # installed once a machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
SRC=$PWD/src
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SMALL=benchmarks/shapes/smollm2-135m.json
LARGE=benchmarks/shapes/llama-3-8b.json
bench() { PYTHONPATH=/tmp/site:$SRC PYTHONUNBUFFERED=1 python3 -m adaplex bench route --device cuda --bf16 --mode decode \
            --batch 64 --seq 128 "$@" 2>&1 | grep -v Warning | tail -8; }
for section in ${*:-kernel route}; do
  echo "== $section"
  case $section in
    kernel) (cd benchmarks && PYTHONPATH=/tmp/site:$SRC python3 kernel_check.py ../$SMALL "$OUT/kernel-check-cuda.json" \
              > "$OUT/kernel-check.log" 2>&1) || { echo "kernel check FAILED"; tail -30 "$OUT/kernel-check.log"; } ;;
    route) bench --shape $SMALL --adapters 1 --adapters 64 --peers none --rounds 9 --profile --out "$OUT/route-decode-cuda.json"
           bench --shape $SMALL --adapters 8 --peers peft --rounds 5 --out "$OUT/route-decode-cuda-peft.json"
           bench --shape $SMALL --adapters 64 --rank 4 --rank 16 --peers none --rounds 9 \
             --out "$OUT/route-decode-cuda-mixed.json" ;;
    before) SRC=$PWD/.devcarry/old-src bench --shape $SMALL --adapters 1 --adapters 64 --peers none --rounds 9 \
              --out "$OUT/route-decode-cuda-before.json" ;;
    route-8b) bench --shape $LARGE --layers 2 --adapters 64 --adapters 1024 --peers none --rounds 11 --profile \
                --out "$OUT/route-decode-cuda-8b.json"
              bench --shape $LARGE --layers 2 --adapters 1024 --slots 64 --peers none --rounds 11 \
                --out "$OUT/route-decode-cuda-8b-paged.json" ;;
    dependent) (cd benchmarks && PYTHONPATH=/tmp/site:$SRC python3 dependent_check.py "$OUT/dependent-check-cuda.json" \
                 2>&1 | grep -v Warning | tail -3
               for shape in llama-3-8b smollm2-135m; do
                 PYTHONPATH=/tmp/site:$SRC python3 dependent_sweep.py $shape "$OUT/dependent-sweep-cuda-$shape.json" | tail -12
               done) ;;
    linears) (cd benchmarks && PYTHONPATH=/tmp/site:$SRC python3 dependent_check.py "$OUT/dependent-check-cuda.json" \
                2>&1 | grep -v Warning | tail -3
              for sweep in linears-135m linears-8b; do
                PYTHONPATH=/tmp/site:$SRC python3 dependent_sweep.py $sweep "$OUT/dependent-sweep-cuda-$sweep.json" 2>&1 \
                  | grep -v Warning | tail -16
              done) ;;
    ncu) (cd benchmarks && PYTHONPATH=/tmp/site:$SRC ncu --profile-from-start off --clock-control none --csv \
            --metrics "$(PYTHONPATH=/tmp/site:$SRC python3 -c 'from linear_ncu import METRICS; print(",".join(METRICS))')" \
            python3 linear_ncu.py 2> "$OUT/linear-ncu.log" | grep -v '^==' > "$OUT/linear-ncu-cuda.csv") \
           || { echo "ncu FAILED"; tail -20 "$OUT/linear-ncu.log"; } ;;
    host|before-host) S=$SRC; [ $section = before-host ] && S=$PWD/.devcarry/old-src
                      (cd benchmarks && PYTHONPATH=/tmp/site:$S python3 route_host.py ../$SMALL "$OUT/route-$section-cuda.json" \
                        2>&1 | grep -v Warning | tail -40) ;;
    before-8b) SRC=$PWD/.devcarry/old-src bench --shape $LARGE --layers 2 --adapters 64 --peers none --rounds 7 \
                 --out "$OUT/route-decode-cuda-8b-before.json" ;;
  esac
done

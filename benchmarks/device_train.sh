#!/usr/bin/env bash
# Training on the device's GPU:  bash benchmarks/device_train.sh [SECTION...]   (results in $OUT, default /tmp/out)
# Sections: check (benchmarks/train_check.py: fused loss, compiled blocks and a 4-bit base against the
# plain computation), small (SmolLM2-135M shape, 16 x 256, bf16-mixed, profiled), small-graphs (its blocks
# compiled as CUDA graphs),
# small-bf16 (the same with bf16 weights), large / large-bf16 (Llama-3.2-1B shape, 8 x 1024), 4bit / large-4bit
# (bitsandbytes NF4 base: adaplex against PEFT + bitsandbytes).
# Carried, not committed: .whl (pinned wheels the image lacks: transformers, peft, pydantic, liger-kernel),
# .devcarry/site (bitsandbytes 0.50.2 with only its CUDA 13.0 and CPU libraries: the whole wheel exceeds what
# can travel) and .devcarry/smollm2 (SmolLM2-135M's config). Models have random weights of the real shapes.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/.devcarry/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SMALL=.devcarry/smollm2/config.json
LARGE=benchmarks/shapes/llama-3.2-1b.json
bench() { python3 -m adaplex bench train --device cuda --steps 6 --rounds 3 "$@" | tail -14; }
for section in ${*:-check small}; do
  echo "== $section"
  case $section in
    check) python3 benchmarks/train_check.py $SMALL "$OUT/train-check-cuda.json" | tail -40 || echo "check FAILED" ;;
    small) bench --shape $SMALL --batch 16 --seq 256 --profile --variant adaplex-lora --variant adaplex-lora-unfused \
            --variant adaplex-lora-compiled --variant adaplex-moslora --variant adaplex-moslora-compiled \
            --variant adaplex-lora-plain-loop --variant peft-lora --out "$OUT/train-cuda.json" ;;
    small-graphs) bench --shape $SMALL --batch 16 --seq 256 --variant adaplex-lora-graphs \
            --variant adaplex-moslora-graphs --variant peft-lora --out "$OUT/train-cuda-graphs.json" ;;
    small-bf16) bench --shape $SMALL --batch 16 --seq 256 --precision bf16-true --out "$OUT/train-cuda-bf16.json" ;;
    large) bench --shape $LARGE --batch 8 --seq 1024 --rounds 2 --variant adaplex-lora --variant adaplex-lora-compiled \
            --variant adaplex-lora-graphs --variant adaplex-moslora-graphs --variant peft-lora \
            --out "$OUT/train-cuda-1b.json" ;;
    large-bf16) bench --shape $LARGE --batch 8 --seq 1024 --rounds 2 --precision bf16-true --variant adaplex-lora \
            --variant adaplex-lora-compiled --variant adaplex-lora-graphs --variant adaplex-moslora-compiled \
            --variant adaplex-moslora-graphs --variant peft-lora --out "$OUT/train-cuda-1b-bf16.json" ;;
    4bit) bench --shape $SMALL --batch 16 --seq 256 --quantize 4bit --variant adaplex-lora \
            --variant adaplex-lora-compiled --variant peft-lora --out "$OUT/train-cuda-4bit.json" ;;
    large-4bit) bench --shape $LARGE --batch 8 --seq 1024 --quantize 4bit --variant adaplex-lora \
            --variant adaplex-lora-compiled --variant peft-lora --out "$OUT/train-cuda-1b-4bit.json" ;;
  esac
done

#!/usr/bin/env bash
# GPU checks on the device machine (see README "Benchmarks"):  bash benchmarks/device_run.sh [SECTION...]
# Sections (default: all): faults train; also profile (where a monitored forward's time goes), lora-speed
# (the overhead and training benches alone), and
# engine-route / engine-faults (after a change to the engine: the weight channel on CUDA, both kernels checked,
# and their recorded ratios re-measured at the main shapes). Results go to $OUT (default /tmp/out).
# Carried, not committed: .whl (pinned wheels the image lacks) and .devcarry (SmolLM2-135M's config and
# tokenizer, and the prepared data; the 135M weights exceed what can travel, so the model is SmolLM2-shaped
# with random weights: timings and memory are those of the real architecture, perplexities are meaningless).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
BASE=/tmp/smollm2-random
SECTIONS=${*:-faults train}
python3 - <<'PY'
import shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(".devcarry/smollm2")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained("/tmp/smollm2-random")
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    shutil.copy(f".devcarry/smollm2/{f}", "/tmp/smollm2-random/")
print(torch.cuda.get_device_name(0), torch.__version__)
PY
for section in $SECTIONS; do
  echo "== $section"
  case $section in
    faults)  # the checked-attention kernel against SDPA, then the overhead of the fused checks
      python3 benchmarks/faults_kernel_check.py $BASE "$OUT/faults-kernel-check-cuda.json" | tail -40
      python3 -m adaplex bench faults --base $BASE --device cuda --bf16 --batch 8 --seq 512 --repeats 21 \
        --out "$OUT/faults-cuda.json" | tail -12
      # a shape where the H100, not the host's kernel launches, sets the pace of the 135M model
      python3 -m adaplex bench faults --base $BASE --device cuda --bf16 --batch 32 --seq 1024 --repeats 9 \
        --out "$OUT/faults-cuda-large.json" | tail -12
      # both again as CUDA-graph replays: the checks' GPU cost, without the host launching kernels
      python3 -m adaplex bench faults --base $BASE --device cuda --bf16 --batch 8 --seq 512 --repeats 30 --graphs \
        --out "$OUT/faults-cuda-graphed.json" | tail -8
      python3 -m adaplex bench faults --base $BASE --device cuda --bf16 --batch 32 --seq 1024 --repeats 15 --graphs \
        --out "$OUT/faults-cuda-large-graphed.json" | tail -8 ;;
    profile)
      python3 benchmarks/faults_profile.py $BASE "$OUT/faults-profile-cuda.json" 32 1024 | tail -80
      python3 benchmarks/faults_profile.py $BASE "$OUT/faults-profile-cuda-small.json" 8 512 | tail -80 ;;
    train)
      python3 -m adaplex bench train --base $BASE --device cuda --batch 16 --seq 256 --steps 8 --rounds 3 \
        --out "$OUT/train-cuda.json" | tail -20
      python3 -m adaplex bench overhead --base $BASE --device cuda --bf16 --batch 16 --seq 256 --rounds 5 \
        --out "$OUT/overhead-cuda.json" | tail -20
      cat > /tmp/gpu-stage.yaml <<YAML
base: $BASE
output: /tmp/gpu-run
adapters:
  - {name: style, config: {method: lora, r: 16, alpha: 32}}
data: {format: text, train: [.devcarry/data/style/train.txt], eval: [.devcarry/data/style/heldout.txt], block_size: 256, batch_size: 16}
optim: {lr: 1.0e-3, max_steps: 60, warmup_steps: 5}
eval: {every_n_steps: 30, max_batches: 4}
trainer: {precision: auto, accelerator: auto, checkpoint_every_n_steps: 30}
YAML
      python3 -m adaplex train /tmp/gpu-stage.yaml 2>&1 | tail -5
      cp /tmp/gpu-run/logs/csv/metrics.csv "$OUT/gpu-train-metrics.csv" ;;
    lora-speed)  # after a change to LoRA's or the bottleneck's forward: the overhead and training benches alone
      python3 -m adaplex bench train --base $BASE --device cuda --batch 16 --seq 256 --steps 8 --rounds 3 \
        --out "$OUT/train-cuda.json" | tail -12
      python3 -m adaplex bench overhead --base $BASE --device cuda --bf16 --batch 16 --seq 256 --rounds 5 \
        --out "$OUT/overhead-cuda.json" | tail -14 ;;
    engine-route)
      python3 benchmarks/engine_check.py $BASE "$OUT/engine-check-cuda.json" | tail -20
      python3 benchmarks/kernel_check.py $BASE "$OUT/kernel-check-cuda.json" | tail -12
      python3 -m adaplex bench route --base $BASE --device cuda --bf16 --mode decode --batch 64 --seq 128 \
        --adapters 8 --adapters 64 --rounds 9 --out "$OUT/route-decode-cuda-engine.json" | tail -8 ;;
    engine-faults)
      python3 benchmarks/faults_kernel_check.py $BASE "$OUT/faults-kernel-check-cuda.json" | tail -12
      python3 -m adaplex bench faults --base $BASE --device cuda --bf16 --batch 8 --seq 512 --repeats 21 \
        --out "$OUT/faults-cuda-engine.json" | tail -12
      python3 -m adaplex bench faults --base $BASE --device cuda --bf16 --batch 32 --seq 1024 --repeats 15 --graphs \
        --out "$OUT/faults-cuda-large-graphed-engine.json" | tail -8 ;;
    *) echo "unknown section $section (kernel route faults train profile lora-speed engine-route engine-faults)"; exit 2 ;;
  esac
done

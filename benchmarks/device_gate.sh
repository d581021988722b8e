#!/usr/bin/env bash
# Gates on the device machine (see README "Gates"):  bash benchmarks/device_gate.sh SECTION...
#   bench:   `adaplex bench gate` in bf16 on an all-MiniLM-L6-v2-shaped encoder (random weights: latency does
#            not depend on them), with AdapterHub's adapters 1.3.0 in its own environment; then UniPELT
#            training on CUDA: a causal LM (SmolLM2-shaped) and a classifier, their throughput recorded.
#   compare: `adaplex compare-methods` on the real all-MiniLM-L6-v2 (carried as bf16 safetensors).
# Carried, not committed: .whl (pinned wheels), .devcarry/ahwhl (AdapterHub's adapters and the transformers,
# tokenizers and huggingface_hub it pins), .devcarry/minilm (config and tokenizer; for compare, its weights),
# .devcarry/smollm2 (config and tokenizer), .devcarry/data (`adaplex data prepare` here: style, classify).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 ADAPLEX_CACHE=/tmp/adaplex-cache
OUT=${OUT:-/tmp/out}
python3 - <<'PY'
import shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
torch.manual_seed(0)
if not Path(".devcarry/minilm/model.safetensors").exists():
    AutoModel.from_config(AutoConfig.from_pretrained(".devcarry/minilm")).save_pretrained("/tmp/minilm")
else:
    AutoModel.from_pretrained(".devcarry/minilm", dtype=torch.float32).save_pretrained("/tmp/minilm")
for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(f".devcarry/minilm/{f}", "/tmp/minilm/")
if Path(".devcarry/smollm2").is_dir():
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".devcarry/smollm2")).save_pretrained("/tmp/smollm2")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(f".devcarry/smollm2/{f}", "/tmp/smollm2/")
print(torch.cuda.get_device_name(0), torch.__version__)
PY
for section in "$@"; do
  echo "== $section"
  case $section in
    bench)
      # the image's python with AdapterHub's pins first on its path (a venv would lose the image's torch)
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ahsite .devcarry/ahwhl/*.whl
      printf '#!/bin/sh\nPYTHONPATH=/tmp/ahsite exec python3 "$@"\n' > /tmp/ahpython && chmod +x /tmp/ahpython
      python3 -m adaplex bench gate --base /tmp/minilm --device cuda --bf16 --rounds 30 \
        --peer-python /tmp/ahpython --out "$OUT/gate-cuda.json" | tail -12
      # a batch large enough that the GPU, not the host's kernel launches, sets the pace
      python3 -m adaplex bench gate --base /tmp/minilm --device cuda --bf16 --batch 256 --seq 512 --rounds 20 \
        --peer-python /tmp/ahpython --out "$OUT/gate-cuda-large.json" | tail -12
      [ "${GATE_BENCH_ONLY:-0}" = 1 ] && continue
      sed -e "s#output: runs/unipelt-style#output: /tmp/lm-run\nbase: /tmp/smollm2#" -e "s#data/#.devcarry/data/#g" \
        -e "s#max_steps: 200#max_steps: 60#" -e "s#batch_size: 4#batch_size: 16#" configs/unipelt-style.yaml > /tmp/lm.yaml
      ( time python3 -m adaplex train /tmp/lm.yaml ) 2>&1 | tail -6
      cp /tmp/lm-run/logs/csv/metrics.csv "$OUT/gate-lm-train-cuda.csv"
      sed -e "s#output: runs/classify-topics#output: /tmp/cls-run#" -e "s#base: minilm-l6#base: /tmp/minilm#" \
        -e "s#data/classify#.devcarry/data/classify#g" -e "s#seeds: \[0, 1, 2\]#seeds: [0]#" \
        -e "s#max_epochs: 5#max_epochs: 1#" configs/classify-topics.yaml > /tmp/cls.yaml
      ( time python3 -m adaplex train /tmp/cls.yaml ) 2>&1 | tail -6
      cp /tmp/cls-run/seed-0/metrics.json "$OUT/gate-classify-cuda.json" ;;
    compare)
      sed -e "s#output: runs/compare-methods#output: /tmp/cmp#" -e "s#base: minilm-l6#base: /tmp/minilm#" \
        -e "s#data/classify#.devcarry/data/classify#g" -e "s#^jobs: 1#jobs: 10#" configs/compare-methods.yaml > /tmp/cmp.yaml
      python3 -m adaplex compare-methods /tmp/cmp.yaml --device cuda --out "$OUT/gate-compare.json" | tail -14 ;;
    *) echo "unknown section $section (bench compare)"; exit 2 ;;
  esac
done

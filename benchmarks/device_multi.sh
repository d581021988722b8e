#!/usr/bin/env bash
# Several GPUs of one host (a kind with 2 or more):  bash benchmarks/device_multi.sh [N] [ddp|fsdp] [SHAPE]   (results in $OUT)
# DDP (or FSDP, which also runs on N=1) against one GPU with the same global batch (benchmarks/ddp_check.py: both loss curves, the trained
# adapters' difference, tokens/s, peak memory per process), on a model of random weights of SHAPE's config
# (default SmolLM2-135M; benchmarks/shapes/llama-3.2-3b.json for FSDP's memory against DDP at a few billion
# parameters) with SmolLM2's tokenizer, and Python's own reference text (no fortunes on the device).
# Carried: .whl and .devcarry (see device_train.sh).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/.devcarry/site:$PWD/src PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
N=${1:-2}
STRATEGY=${2:-ddp}
SHAPE=${3:-.devcarry/smollm2/config.json}
NAME=smollm2-135m
[ $# -ge 3 ] && NAME=$(basename "$SHAPE" .json)
mkdir -p "$OUT"
SHAPE=$SHAPE python3 - <<'PY'
import os, shutil
from pathlib import Path
import pydoc_data.topics, torch
from adaplex.bench.shapes import shaped_model
shaped_model(Path(os.environ["SHAPE"]), None, torch.float32).save_pretrained("/tmp/shaped")
for f in Path(".devcarry/smollm2").iterdir():
    if f.name != "config.json":
        shutil.copy(f, "/tmp/shaped/")
Path("/tmp/pydoc.txt").write_text("\n\n".join(pydoc_data.topics.topics.values()))
print(torch.cuda.device_count(), "GPUs")
PY
python3 benchmarks/ddp_check.py /tmp/shaped /tmp/pydoc.txt "$OUT/$STRATEGY-cuda-$N-$NAME.json" gpu "$N" 16 256 40 "$STRATEGY" | tail -8

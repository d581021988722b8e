#!/usr/bin/env bash
# Several GPUs of one host (a kind with 2 or more):  bash benchmarks/device_multi.sh [N] [ddp|fsdp]   (results in $OUT)
# DDP (or FSDP, which also runs on N=1) against one GPU with the same global batch (benchmarks/ddp_check.py: both loss curves, the trained
# adapters' difference, tokens/s), on a SmolLM2-135M-shaped model of random weights and Python's own
# reference text (no fortunes on the device). Carried: .whl and .devcarry (see device_train.sh).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/.devcarry/site:$PWD/src PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
N=${1:-2}
STRATEGY=${2:-ddp}
mkdir -p "$OUT"
python3 - <<'PY'
import shutil
from pathlib import Path
import pydoc_data.topics, torch
from adaplex.bench.shapes import shaped_model
shaped_model(Path(".devcarry/smollm2/config.json"), None, torch.float32).save_pretrained("/tmp/smollm2")
for f in Path(".devcarry/smollm2").iterdir():
    if f.name != "config.json":
        shutil.copy(f, "/tmp/smollm2/")
Path("/tmp/pydoc.txt").write_text("\n\n".join(pydoc_data.topics.topics.values()))
print(torch.cuda.device_count(), "GPUs")
PY
python3 benchmarks/ddp_check.py /tmp/smollm2 /tmp/pydoc.txt "$OUT/$STRATEGY-cuda-$N.json" gpu "$N" 16 256 40 "$STRATEGY" | tail -8

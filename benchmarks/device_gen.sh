#!/usr/bin/env bash
# Prompt-to-LoRA on the device's GPU (bf16):  bash benchmarks/device_gen.sh   (results in $OUT, default /tmp/out)
# A zoo built on CUDA, the generator trained on it (bf16-mixed), generation timed and the per-sample path
# checked on CUDA against each adapter alone. Carried, not committed: .whl (pinned wheels the image lacks),
# .devcarry/smollm2 and .devcarry/minilm (configs and tokenizers: the weights exceed what can travel, so both
# models have random weights and no fortunes are installed there: the zoo holds pydoc groups alone; the
# timings are those of the real shapes, the losses and perplexities mean nothing).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 - <<'PY'
import shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
torch.manual_seed(0)
for name, auto in (("smollm2", AutoModelForCausalLM), ("minilm", AutoModel)):
    model = auto.from_config(AutoConfig.from_pretrained(f".devcarry/{name}"))
    with torch.no_grad():  # from_config's weights there are not all initialised (NaN gradients): set them
        for key, p in model.named_parameters():
            p.fill_(1.0) if "norm" in key.lower() and p.dim() == 1 else p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
    model.save_pretrained(f"/tmp/{name}")
    for f in Path(f".devcarry/{name}").iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, f"/tmp/{name}/")
print(torch.cuda.get_device_name(0), torch.__version__)
PY
sed -e "s#^output: zoo#output: /tmp/zoo#" -e "s#^base: smollm2-135m#base: /tmp/smollm2#" \
  -e "s#fortunes: all .*#fortunes: []#" -e "s#pydoc_groups: 6 .*#pydoc_groups: 12#" configs/gen-zoo.yaml > /tmp/zoo.yaml
python3 -m adaplex gen zoo /tmp/zoo.yaml --out "$OUT/gen-zoo-cuda.json" | tail -1
sed -e "s#^zoo: zoo#zoo: /tmp/zoo#" -e "s#^output: .*#output: /tmp/gen-run#" -e "s#^encoder: .*#encoder: /tmp/minilm#" \
  -e "s#heldout_every: 6 .*#heldout_every: 4#" configs/gen-train.yaml > /tmp/gen.yaml
python3 -m adaplex gen train /tmp/gen.yaml --json | tail -1 > "$OUT/gen-train-cuda.json"
cat "$OUT/gen-train-cuda.json"
python3 benchmarks/gen_cuda.py /tmp/gen-run/generator /tmp/smollm2 "$OUT/gen-cuda.json"
python3 -m adaplex gen eval /tmp/gen-run/generator --device cuda --seen 2 --blocks 4 --json | tail -1 > "$OUT/gen-eval-cuda-random.json"
cp /tmp/gen-run/logs/csv/metrics.csv "$OUT/gen-train-cuda-metrics.csv"

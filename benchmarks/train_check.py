"""The training fast paths and a 4-bit base on CUDA, each against the plain computation (writes JSON).

- fused loss (Liger) = the plain loss, and its adapter gradients, under bf16-mixed and with bf16 weights;
- compiled blocks = eager blocks (loss and adapter gradients), bf16-mixed; blocks replayed as CUDA graphs
  ("reduce-overhead") train three steps to the same losses and adapter weights as eager blocks;
- a 4-bit base: adaplex LoRA's logits = PEFT LoRA's on the same quantized model with the same weights
  (exported by adaplex, loaded by PEFT), three training steps run, the saved adapter loads on the
  16-bit base (same fingerprint), and a merge into the quantized base is refused.

    python benchmarks/train_check.py SHAPE_CONFIG OUT.json
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from check_output import report
from peft import PeftModel

from adaplex.bench.shapes import shaped_model
from adaplex.core.adapted import Adapted
from adaplex.core.quantize import quantize_linears
from adaplex.errors import AdaplexError
from adaplex.io.peft import export_peft
from adaplex.io.storage import attach, save_adapter
from adaplex.methods import LoRAConfig
from adaplex.train.speed import compile_blocks, next_token_loss

shape, out = Path(sys.argv[1]), sys.argv[2]
cuda = torch.device("cuda")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def base(dtype: torch.dtype, quantize: str = "none") -> torch.nn.Module:
    return quantize_linears(shaped_model(shape, 4, dtype), quantize, dtype, cuda).to(cuda)


def adapted(model: torch.nn.Module) -> Adapted:
    handle = Adapted.of(copy.deepcopy(model))
    handle.add("lora", LoRAConfig(r=16, alpha=32))
    with torch.no_grad():  # B != 0: the adapters change the output
        for p in handle.parameters("lora"):
            p.normal_(0, 0.02)
    return handle


def loss_and_grads(handle: Adapted, batch: dict, fused: bool, autocast: bool) -> tuple[float, list[torch.Tensor]]:
    handle.model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = next_token_loss(handle.model, batch, fused)
    loss.backward()
    return loss.item(), [p.grad.float() for p in handle.parameters("lora")]


def compare(a: tuple[float, list], b: tuple[float, list]) -> dict[str, float]:
    return {
        "loss_a": a[0],
        "loss_b": b[0],
        "grad_relative": max(relative(x, y) for x, y in zip(a[1], b[1], strict=True)),
    }


torch.manual_seed(0)
ids = torch.randint(0, 49152, (4, 256), device=cuda)
batch = {"input_ids": ids, "labels": ids}
result: dict = {"device": torch.cuda.get_device_name(0)}
for name, dtype, autocast in (("bf16_mixed", torch.float32, True), ("bf16_weights", torch.bfloat16, False)):
    handle = adapted(base(dtype))
    result[f"fused_loss_{name}"] = compare(
        loss_and_grads(handle, batch, True, autocast), loss_and_grads(handle, batch, False, autocast)
    )
handle = adapted(base(torch.float32))
eager = loss_and_grads(handle, batch, True, True)
compile_blocks(handle.model)
result["compiled_bf16_mixed"] = compare(loss_and_grads(handle, batch, True, True), eager)


def trained(model: torch.nn.Module, mode: str | None, steps: int = 3) -> tuple[list[float], list[torch.Tensor]]:
    """Losses of ``steps`` AdamW steps (bf16-mixed, fused loss) and the adapter's weights after them."""
    torch.manual_seed(1)
    handle = adapted(model)
    if mode is not None:
        compile_blocks(handle.model, mode)
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = next_token_loss(handle.model, batch, True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, [p.detach().float() for p in handle.parameters("lora")]


plain = base(torch.float32)
eager_run, graphs_run = trained(plain, None), trained(plain, "reduce-overhead")
result["graphs_3_steps"] = {
    "losses_eager": eager_run[0],
    "losses_graphs": graphs_run[0],
    "weights_relative": max(relative(a, b) for a, b in zip(graphs_run[1], eager_run[1], strict=True)),
}

quantized = base(torch.bfloat16, "4bit")
handle = adapted(quantized)
with tempfile.TemporaryDirectory() as tmp:
    export_peft(handle, ["lora"], Path(tmp) / "peft")
    peft = PeftModel.from_pretrained(quantized, Path(tmp) / "peft").eval()
    with torch.no_grad():
        ours = handle.model.eval()(ids).logits
        theirs = peft(ids).logits
    layer = type(handle.model.model.layers[0].mlp.up_proj.base).__name__
    result["4bit_vs_peft"] = {"logits_relative": relative(ours, theirs), "layer": layer}
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)
    handle.model.train()
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = next_token_loss(handle.model, batch, True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    result["4bit_train_losses"] = losses
    save_adapter(handle, "lora", Path(tmp) / "adapter")
    plain = shaped_model(shape, 4, torch.bfloat16).to(cuda)
    attach(plain, Path(tmp) / "adapter")
    result["4bit_adapter_loads_on_16bit"] = True
    try:
        handle.merge("lora")
        result["4bit_merge_refused"] = False
    except AdaplexError as err:
        result["4bit_merge_refused"] = str(err)
result["ok"] = (
    all(result[f"fused_loss_{n}"]["grad_relative"] < 2e-2 for n in ("bf16_mixed", "bf16_weights"))
    and result["compiled_bf16_mixed"]["grad_relative"] < 2e-2
    and result["graphs_3_steps"]["weights_relative"] < 2e-2
    and result["4bit_vs_peft"]["logits_relative"] < 2e-2
    and all(map(torch.isfinite, map(torch.tensor, result["4bit_train_losses"])))
    and isinstance(result["4bit_merge_refused"], str)
)
report(result, out)

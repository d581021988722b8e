"""Render the README's benchmark tables from benchmarks/results/*.json.

.venv/bin/python benchmarks/tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def missing(value: float | None) -> bool:
    """Not measured: null in strict JSON (NaN in files written before it)."""
    return value is None or value != value


def overhead(result: dict) -> str:
    lines = [
        f"**{result['device']}**, {result['dtype']}, batch {result['batch']} x {result['seq']}, rank {result['rank']}, "
        f"{result['rounds']} interleaved rounds (`adaplex bench overhead`):",
        "",
        "| variant | forward x base | train step x base | trainable | peak train step MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        step = "—" if missing(row["train_step_x_base"]) else f"{row['train_step_x_base']:.3f}"
        peak = "—" if missing(row["peak_train_mib"]) else f"{row['peak_train_mib']:.0f}"
        lines.append(
            f"| {row['variant']} | {row['forward_x_base']:.3f} | {step} | {row['trainable_params']:,} | {peak} |"
        )
    vs = result["lora_vs_peft"]
    lines += [
        "",
        f"adaplex LoRA / PEFT LoRA: forward {vs['forward_x_peft']:.3f}x, train step "
        f"{vs['train_step_x_peft']:.3f}x; merged / base: {vs['merged_forward_x_base']:.3f}x.",
    ]
    return "\n".join(lines)


def train(result: dict) -> str:
    shape = f", {result['layers']} layers" if "layers" in result else ""
    lines = [
        f"**{result['device']}**, {result['base']}{shape}, {result['precision']}, base "
        f"{result.get('quantize', 'none')}, batch {result['batch']} x {result['seq']}, rank {result['rank']} "
        "(`adaplex bench train`):",
        "",
        "| variant | step s | tokens/s | peak MiB | tokens/s x PEFT | memory x PEFT |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, step in result["step_s"].items():
        vs = result.get("vs_peft", {}).get(name)
        ratios = f"{vs['tokens_per_s_x']:.2f} | {vs['peak_memory_x']:.2f}" if vs else "— | —"
        lines.append(
            f"| {name} | {step:.3f} | {result['tokens_per_s'][name]:,.0f} | {result['peak_mib'][name]:.0f} | {ratios} |"
        )
    if "profile" in result:
        lines += [
            "",
            "Profile of a plain-loop step (torch.profiler, 3 steps): "
            + "; ".join(
                f"{name} {p['wall_ms']:.0f} ms wall, {p['busy_ms']:.0f} ms of kernels"
                + (f", {p['launches']:,} launches" if p["launches"] else "")
                for name, p in result["profile"].items()
            )
            + ".",
        ]
    return "\n".join(lines)


def route(result: dict) -> str:
    graphs = "graph_routed_x_base" in result["results"][0]
    lines = [
        f"**{result['device']}**, {result['dtype']}, {result['mode']}, batch {result['batch']}, "
        f"{'cache' if result['mode'] == 'decode' else 'sequence'} {result['seq']}, rank {result['rank']} "
        "(`adaplex bench route`):",
        "",
        "| distinct adapters | base step s | adaplex routed x base | PEFT mixed x base | PEFT / adaplex |"
        + (" routed without kernel x base | CUDA graph: base step s | CUDA graph: routed x base |" if graphs else ""),
        "|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if graphs else ""),
    ]
    for r in result["results"]:
        peft = [f"{r[k]:.2f}" if k in r else "—" for k in ("peft_x_base", "peft_x_routed")]  # --peers none: —
        row = f"| {r['adapters']} | {r['step_s']['base']:.4f} | {r['routed_x_base']:.2f} | {peft[0]} | {peft[1]} |"
        if graphs:
            row += f" {r['routed_bmm_x_base']:.2f} | {r['step_s']['base-graph']:.4f} | {r['graph_routed_x_base']:.2f} |"
        lines.append(row)
    return "\n".join(lines)


def faults(results: list[dict]) -> str:
    """One table over every `adaplex bench faults` result: overhead of each fused phase."""
    lines = [
        "`adaplex bench faults`: forward time over the fused SDPA baseline, embedded model on CPU, the "
        "SmolLM2-shaped model on GPU; q/k/v checksums, abft_output, softmax and output_bound on; eager "
        "forwards, or replays of CUDA graphs (`--graphs`: the GPU's time, without the host's launches):",
        "",
        "| device | dtype | batch x seq | timing | baseline s | fused checks | without q/k/v checksums | "
        "attention without checks | step-by-step, every detector |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        over = r["overhead_percent"]
        stepwise = f"{over['detection']:+.0f}%" if "detection" in over else "—"
        lines.append(
            f"| {r['device']} | {r.get('dtype', 'float32')} | {r['batch']} x {r['seq']} | "
            f"{'CUDA graph' if r.get('graphed') else 'eager'} | {r['seconds']['baseline']['median']:.4f} | "
            f"{over['fused_detection']:+.1f}% | {over['fused_without_qkv']:+.1f}% | "
            f"{over['fused_columns_only']:+.1f}% | {stepwise} |"
        )
    check = load("faults-kernel-check-cuda.json")
    if check is not None:
        times = check["kernel_us"]
        tiles = check["built_in_tiles"]
        lines += [
            "",
            "Attention without checks: on CPU, SDPA over the padded Q, K and V' = [V | V·1 | 1 | 0…]; on CUDA, "
            "the checked-attention kernel with its checks compiled out. One call with every check and the "
            f"q/k/v comparison, its pass over the rows included, in GPU time ({check['device']}, bfloat16, "
            "`benchmarks/faults_kernel_check.py`): "
            + ", ".join(
                f"{t[tiles]:.0f} µs at {shape} against {t['sdpa']:.0f} µs for SDPA" for shape, t in times.items()
            )
            + ".",
        ]
    return "\n".join(lines)


def main() -> None:
    sections = [
        ("overhead-cpu.json", overhead),
        ("overhead-cuda.json", overhead),
        ("train-cpu.json", train),
        ("train-cuda.json", train),
        ("train-cuda-graphs.json", train),
        ("train-cuda-1b.json", train),
        ("train-cuda-4bit.json", train),
        ("route-prefill-cpu.json", route),
        ("route-decode-cuda.json", route),
        ("route-decode-cuda-peft.json", route),
        ("route-decode-cuda-8b.json", route),
    ]
    for name, render in sections:
        result = load(name)
        if result is not None:
            print(render(result) + "\n")
    names = (
        "faults-cpu.json",
        "faults-cpu-batch1.json",
        "faults-cuda.json",
        "faults-cuda-graphed.json",
        "faults-cuda-large.json",
        "faults-cuda-large-graphed.json",
    )
    print(faults([r for r in map(load, names) if r is not None]))


if __name__ == "__main__":
    main()

"""Hardware counters of a one-token step's linears at the Llama-3-8B decode sites (batch 64, 64 distinct
rank-16 experts, bf16): cuBLAS's base linears against the linears-and-shrinks launch and its expand (what
graphed one-token steps run, and eager ones from an input of 2,048). Run it under Nsight Compute, which
profiles only the calls between ``cudaProfilerStart`` and ``Stop`` (one of each, after a warm-up call):

    ncu --profile-from-start off --clock-control none --csv --metrics METRICS python benchmarks/linear_ncu.py

``benchmarks/device_route.sh ncu`` runs it and keeps the CSV (results/linear-ncu-cuda.csv): each kernel's
time, the bytes it read from DRAM, the 32-byte sectors its SMs read from L2, and how busy DRAM and L2 were.
The kernels come in the sites' order (q/k/v, o, gate/up, down), each site's cuBLAS linears first. Caches
are flushed before each profiled kernel (ncu's default), so a weight is read from DRAM, as in a full step.
"""

from __future__ import annotations

import torch
from kernel_check import SHAPES, linear_site_inputs

from adaplex.kernels import gathered_lora
from adaplex.kernels.gathered_lora import GroupedLinearLoRA

METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "lts__t_sectors_srcunit_tex_op_read.sum",
    "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__grid_size",
    "launch__registers_per_thread",
)


def main() -> None:
    device = torch.device("cuda")
    calls = []
    for n_in, n_outs in SHAPES["8b"].values():
        x, weights, tables, rows = linear_site_inputs(device, n_in, n_outs)
        with gathered_lora.graph_kernels():
            fused = GroupedLinearLoRA(x, weights, tables, rows)
        calls.append(lambda x=x, weights=weights: [torch.nn.functional.linear(x, w) for w in weights])
        calls.append(lambda x=x, fused=fused: fused(x))
    for call in calls:  # compiles the kernels, outside the profiled range
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()

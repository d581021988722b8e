"""Gates in training: their L1 and entropy penalties added to the loss, and their values read out at
every evaluation (JSON, CSV and PNG under ``<output>/gates/``)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch

from adaplex.compose.gate import GateReadout, gates, reading, regularising
from adaplex.core.adapted import Adapted
from adaplex.util.plots import axes, finish, save


class GateRegulariser:
    """loss + Σ_gates (l1 · mean g + entropy · mean H(g)) over the trainable gates with a weight set."""

    def __init__(self, handle: Adapted) -> None:
        self.handle = handle
        self.weights = {
            n: (c.l1, c.entropy)
            for n, c in gates(handle).items()
            if (c.l1 or c.entropy) and any(p.requires_grad for p in handle.parameters(n))
        }

    @contextmanager
    def collecting(self) -> Iterator[Callable[[], tuple[torch.Tensor | float, dict[str, torch.Tensor]]]]:
        """Inside, forwards record the gates; the yielded function returns (penalty, terms to log)."""
        with ExitStack() as stack:
            penalties = {n: stack.enter_context(regularising(self.handle, n)) for n in self.weights}

            def total() -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
                penalty: torch.Tensor | float = 0.0
                logs = {}
                for name, collected in penalties.items():
                    terms = collected.terms()
                    l1, entropy = self.weights[name]
                    if terms:
                        penalty = penalty + l1 * terms["l1"] + entropy * terms["entropy"]
                        logs.update({f"gate_l1/{name}": terms["l1"], f"gate_entropy/{name}": terms["entropy"]})
                return penalty, logs

            yield total


class GateAnalytics(L.Callback):
    """At each evaluation: the gates' mean, spread and histogram per layer and submodule over the
    evaluation set's real tokens, as gates/epoch-NNN.{json,csv} with a heatmap and a histogram PNG, and
    gates/trajectory.png (each gate's mean over the evaluations so far)."""

    def __init__(self, handle: Adapted, out: Path) -> None:
        self.handle, self.out = handle, out
        self.history: list[dict[str, Any]] = []  # one read-out per evaluation
        self._reading: ExitStack | None = None
        self._readout: GateReadout | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._reading = ExitStack()
        self._readout = self._reading.enter_context(reading(self.handle))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._readout is not None:
            self._readout.mask = batch.get("attention_mask")

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._reading is None or self._readout is None:
            return
        self._reading.close()
        rows, self._reading, self._readout = self._readout.rows(), None, None
        if not rows or not trainer.is_global_zero:
            return
        epoch = len(self.history)
        self.history.append({"epoch": epoch, "step": trainer.global_step, "gates": rows})
        write_readout(self.out, f"epoch-{epoch:03d}", self.history[-1])
        plot_trajectory(self.history, self.out / "trajectory.png")

    @property
    def final(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None


def write_readout(out: Path, stem: str, readout: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(readout, indent=1) + "\n")
    with (out / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "submodule", "mean", "std", "tokens"])
        for r in readout["gates"]:
            writer.writerow([r["layer"], r["submodule"], f"{r['mean']:.6f}", f"{r['std']:.6f}", r["tokens"]])
    plot_heatmap(readout, out / f"{stem}-heatmap.png")
    plot_histogram(readout, out / f"{stem}-histogram.png")


def _grid(rows: list[dict[str, Any]]) -> tuple[list[int], list[str]]:
    layers = sorted({r["layer"] for r in rows})
    submodules = [s for s in ("lora", "prefix", "bottleneck") if any(r["submodule"] == s for r in rows)]
    return layers, submodules


def plot_heatmap(readout: dict[str, Any], path: Path) -> None:
    """Layer x submodule, colour = mean gate, each cell labelled mean ± std."""
    rows = readout["gates"]
    layers, submodules = _grid(rows)
    cell = {(r["layer"], r["submodule"]): r for r in rows}
    values = [
        [cell[(layer, s)]["mean"] if (layer, s) in cell else float("nan") for s in submodules] for layer in layers
    ]
    fig, ax = axes(1.6 + 1.4 * len(submodules), 1.0 + 0.45 * len(layers))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, layer in enumerate(layers):
        for j, s in enumerate(submodules):
            if (layer, s) in cell:
                r = cell[(layer, s)]
                ax.text(j, i, f"{r['mean']:.2f}±{r['std']:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(submodules)), submodules)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    finish(ax, "", "layer", f"gates, evaluation {readout['epoch']} (step {readout['step']})", legend=None)
    fig.colorbar(image, ax=ax, fraction=0.05)
    save(fig, path)


def plot_histogram(readout: dict[str, Any], path: Path) -> None:
    """The distribution of gate values over tokens, per submodule (all layers together)."""
    rows = readout["gates"]
    _, submodules = _grid(rows)
    fig, ax = axes(5, 3)
    for s in submodules:
        counts = torch.tensor([r["histogram"] for r in rows if r["submodule"] == s], dtype=torch.float64).sum(0)
        edges = torch.linspace(0, 1, len(counts) + 1)
        ax.stairs((counts / counts.sum().clamp(min=1)).tolist(), edges.tolist(), label=s)
    finish(ax, "gate value", "share of tokens", f"gate values, evaluation {readout['epoch']}")
    save(fig, path)


def plot_trajectory(history: list[dict[str, Any]], path: Path) -> None:
    """Each gate's mean over the evaluations: one line per (layer, submodule), coloured by submodule."""
    colours = {"lora": "tab:blue", "prefix": "tab:orange", "bottleneck": "tab:green"}
    series: dict[tuple[int, str], list[tuple[int, float]]] = {}
    for readout in history:
        for r in readout["gates"]:
            series.setdefault((r["layer"], r["submodule"]), []).append((readout["step"], r["mean"]))
    fig, ax = axes(6, 3.5)
    labelled = set()
    for (layer, s), points in sorted(series.items()):
        steps, means = zip(*points, strict=True)
        label = s if s not in labelled else None
        labelled.add(s)
        ax.plot(
            steps,
            means,
            color=colours[s],
            alpha=0.4 + 0.6 * (layer + 1) / (1 + max(k[0] for k in series)),
            marker="o",
            markersize=2,
            label=label,
        )
    ax.set_ylim(0, 1)
    finish(ax, "training step", "mean gate", "gates over training (darker: deeper layer)")
    save(fig, path)

"""Sweeps (bits x locations x layers x seeds from YAML), appended to JSONL so a killed sweep resumes,
and reports: detection and silent-data-corruption rates per bit and location, a heatmap PNG, false
positives from clean runs, and overhead."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from adaplex.errors import ConfigError
from adaplex.faults.experiment import aggregate, logits_of, run_once
from adaplex.faults.hook import LOCATIONS, DetectorConfig, FaultPlan, Location
from adaplex.util import strict_json
from adaplex.util.jsonl import read_lines
from adaplex.util.yamlconfig import validation_message


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str | None = None
    bits: list[int] = Field(min_length=1)
    locations: list[Location] = list(LOCATIONS)  # type: ignore[assignment]
    layers: list[int] | list[str] = ["random"]
    seeds: list[int] = [0]
    count: int = Field(1, gt=0, description="elements flipped per run")
    clean_runs: int = Field(0, ge=0, description="fault-free forwards counted for false positives")
    batch: int = Field(1, gt=0)
    seq: int = Field(64, gt=1)
    detectors: DetectorConfig = DetectorConfig()


def run_id(location: str, bit: int, layer: Any, seed: int) -> str:
    return f"{location}/bit{bit}/layer{layer}/seed{seed}"


def drop_partial_line(path: Path) -> None:
    """A sweep killed mid-write leaves a last line without its newline: cut it, so that run is redone."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def done_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by a kill: that run is done again
    return ids


def sweep(model: nn.Module, batches: list[torch.Tensor], config: SweepConfig, out: Path, progress=None) -> int:
    """Run every combination not yet in ``out``; returns how many runs were added."""
    drop_partial_line(out)
    done = done_ids(out)
    baselines: dict[int, torch.Tensor] = {}
    combos = list(itertools.product(config.locations, config.bits, config.layers, config.seeds))
    clean = [("clean", -1, "-", i) for i in range(config.clean_runs)]
    added = 0
    with out.open("a") as f:
        for location, bit, layer, seed in [*combos, *clean]:
            rid = run_id(location, bit, layer, seed)
            if rid in done:
                continue
            ids = batches[seed % len(batches)]
            key = seed % len(batches)
            if key not in baselines:
                baselines[key] = logits_of(model, {"input_ids": ids})
            plan = (
                None
                if location == "clean"
                else FaultPlan(
                    location=location,
                    bit=bit,
                    count=config.count,
                    seed=seed,
                    layers=layer if isinstance(layer, str) else [layer],
                )
            )
            result = run_once(model, {"input_ids": ids}, plan, config.detectors, baselines[key])
            f.write(
                strict_json.dumps(
                    {"id": rid, "location": location, "bit": bit, "layer": layer, "seed": seed, **result.to_json()}
                )
                + "\n"
            )
            f.flush()
            added += 1
            if progress is not None:
                progress()
    return added


class _Run(BaseModel):
    """The fields of a sweep's JSONL line that a report reads."""

    location: str
    bit: int
    significant: bool
    detected: dict[str, bool]
    top1_changes: int
    detections: list
    timings: dict[str, float]


def _checked_row(row: dict[str, Any], path: Path, line: int) -> dict[str, Any]:
    try:
        _Run.model_validate(row)
    except ValidationError as err:
        raise ConfigError(
            validation_message(err, f"{path}:{line}") + "; is it the output of `adaplex faults sweep`?"
        ) from None
    return row


def report(path: Path, png: Path | None = None) -> dict[str, Any]:
    """Rates per (location, bit) and the clean runs' false positives; optionally a heatmap PNG."""
    rows = [_checked_row(r, path, i) for i, r in enumerate(read_lines(path), start=1)]
    if not rows:
        raise ConfigError(f"{path} holds no runs; write some with `adaplex faults sweep`")
    faulty = [r for r in rows if r["location"] != "clean"]
    clean = [r for r in rows if r["location"] == "clean"]
    cells: dict[str, dict[str, dict[str, float]]] = {}
    for (location, bit), group in itertools.groupby(
        sorted(faulty, key=lambda r: (r["location"], r["bit"])), key=lambda r: (r["location"], r["bit"])
    ):
        group = list(group)
        detected = [any(r["detected"].values()) for r in group]
        significant = [r for r in group if r["significant"]]
        cells.setdefault(location, {})[str(bit)] = {
            "runs": len(group),
            "detection_rate": sum(detected) / len(group),
            "sdc_rate": sum(r["top1_changes"] > 0 and not any(r["detected"].values()) for r in group) / len(group),
            "significant": len(significant),
            "detected_of_significant": (
                sum(any(r["detected"].values()) for r in significant) / len(significant) if significant else None
            ),
        }
    significant = [r for r in faulty if r["significant"]]
    summary = {
        "runs": len(faulty),
        "clean_runs": len(clean),
        "false_positives": sum(bool(r["detections"]) for r in clean),
        "significant_runs": len(significant),
        "detected_of_significant": (
            sum(any(r["detected"].values()) for r in significant) / len(significant) if significant else None
        ),
        "per_location_bit": cells,
        "armed_seconds": aggregate([r["timings"]["armed_s"] for r in rows]),
    }
    if png is not None and cells:
        heatmap(cells, png)
        summary["heatmap"] = str(png)
    return summary


def heatmap(cells: dict[str, dict[str, dict[str, float]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    locations = list(cells)
    bits = sorted({int(b) for c in cells.values() for b in c})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(bits) * 0.5 + 3), 1 + 0.5 * len(locations) * 2))
    for ax, metric, title in (
        (axes[0], "detection_rate", "detection rate"),
        (axes[1], "sdc_rate", "silent corruption"),
    ):
        grid = [[cells[loc].get(str(b), {}).get(metric, float("nan")) for b in bits] for loc in locations]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(bits)), [str(b) for b in bits], fontsize=7)
        ax.set_yticks(range(len(locations)), locations)
        ax.set_xlabel("bit")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)

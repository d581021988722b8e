"""A trained generator on disk: generator.safetensors (the network, and the layout's per-position
statistics) beside generator.json, a verified record of everything needed to rebuild and check it: the
network's shape, the layout, the adapter config it emits, the base model (fingerprint) its adapters
are for, the encoder, and the zoo subsets it was trained on and held out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from safetensors.torch import save_file

from adaplex.errors import StorageError
from adaplex.generator.model import GeneratorShape, HyperConvGenerator
from adaplex.generator.tokenizer import Layout, layout_from_fields
from adaplex.io.atomic import atomic_directory
from adaplex.io.records import AdapterRecord, Record, file_sha256, read_record_file, write_record
from adaplex.io.storage import base_fields_of
from adaplex.io.tensor_files import read_safetensors

RECORD_FILE = "generator.json"
WEIGHTS = "generator.safetensors"
STATS = ("layout.mean", "layout.std")


class GeneratorRecord(Record):
    format: Literal["adaplex-generator"] = "adaplex-generator"
    shape: GeneratorShape
    grid: tuple[int, int]  # (L, t): the grid as L layers of t tokens
    rows: int  # T of the generated grid (>= the layout's tokens)
    lines: int
    embed: int
    encoder: str
    encoder_fingerprint: str
    layout: dict[str, Any]
    adapter: dict[str, Any]  # the LoRA config of the zoo: what every generated adapter is
    zoo: str
    train_subsets: list[str]
    heldout_subsets: list[str]
    weights_sha256: str = ""


def build_network(record: GeneratorRecord) -> HyperConvGenerator:
    L, t = record.grid
    return HyperConvGenerator(record.shape, record.lines, record.embed, L, t, record.layout["width"])


def generator_record(like: AdapterRecord, **fields: Any) -> GeneratorRecord:
    """A record for a generator of adapters for the base that zoo member record ``like`` names."""
    return GeneratorRecord(name="generator", **base_fields_of(like), **fields)


def save_generator(directory: Path, record: GeneratorRecord, network: HyperConvGenerator, layout: Layout) -> Path:
    """Write the generator atomically (an existing directory is replaced: it is the run's own output)."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in network.state_dict().items()}
    if layout.mean is not None and layout.std is not None:
        tensors |= {STATS[0]: layout.mean.contiguous(), STATS[1]: layout.std.contiguous()}
    with atomic_directory(directory, overwrite=True) as staging:
        save_file(tensors, staging / WEIGHTS, metadata={"format": "pt"})
        record.weights_sha256 = file_sha256(staging / WEIGHTS)
        write_record(record, staging / RECORD_FILE)
    return directory


def load_generator(directory: Path) -> tuple[GeneratorRecord, HyperConvGenerator, Layout]:
    """The record, the network (CPU, eval mode) and the layout with its statistics; every file verified."""
    directory = Path(directory)
    if not (directory / RECORD_FILE).is_file():
        raise StorageError(f"{directory} is not a generator (no {RECORD_FILE}); train one with `adaplex gen train`")
    record = read_record_file(directory / RECORD_FILE, GeneratorRecord)
    tensors = read_safetensors(directory / WEIGHTS, record.weights_sha256)
    stats = [tensors.pop(k, None) for k in STATS]
    network = build_network(record)
    try:
        network.load_state_dict(tensors)
    except RuntimeError as err:
        raise StorageError(f"{directory / WEIGHTS} does not fit its record ({str(err).splitlines()[0]})") from None
    layout = layout_from_fields(record.layout, *stats)
    return record, network.eval(), layout

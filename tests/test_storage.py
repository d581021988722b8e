"""Adapter directories, bundles, fingerprints, atomic writes, versions, corruption and crashes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adaplex
from adaplex import BottleneckConfig, LoRAConfig, MoSLoRAConfig, PrefixConfig
from adaplex.compose.route import route
from adaplex.errors import AdaplexError, StorageError
from adaplex.io.describe import describe, lineage
from adaplex.io.peft import export_peft
from adaplex.io.records import CONFIG_FILE, WEIGHTS_FILE
from adaplex.io.storage import load, save_adapter, save_bundle
from adaplex.io.tensor_files import read_legacy

import tiny
from helpers import assert_same_state, randomize, snapshot

CONFIGS = [LoRAConfig(r=4), MoSLoRAConfig(r=2, targets=("q", "v")), BottleneckConfig(width=4), PrefixConfig(length=2)]


def trained(family: str = "llama", config=None, name: str = "a", seed: int = 0):
    model = tiny.FAMILIES[family]()
    handle = adaplex.attach(model, name, config or LoRAConfig(r=4))
    randomize(handle, name, seed=seed)
    return model, handle


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_save_and_load_round_trip(family, config, tmp_path):
    model, handle = trained(family, config)
    ids = tiny.tokens()
    expected = tiny.outputs(model, ids)
    save_adapter(handle, "a", tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    fresh = tiny.FAMILIES[family]()
    loaded = load(fresh, tmp_path / "a")
    assert loaded.configs["a"] == config
    torch.testing.assert_close(tiny.outputs(fresh, ids), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters("a"))  # loaded frozen by default


def test_config_records_what_the_issue_asks(tmp_path):
    model, handle = trained()
    save_adapter(handle, "a", tmp_path / "a", role="style", version="v2", parent="v1")
    record = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    for field in ("config", "role", "base", "base_fingerprint", "adaplex_version", "created", "version", "parent"):
        assert record[field] not in (None, ""), field
    assert record["config"]["method"] == "lora" and record["config"]["targets"] == ["all-linear"]
    assert record["role"] == "style"


def test_bundle_members_load_together_or_alone(tmp_path):
    model, handle = trained(name="shared")
    handle.add("expert", MoSLoRAConfig(r=2, targets=("q",)))
    randomize(handle, "expert", seed=3)
    ids = tiny.tokens()
    both = tiny.outputs(model, ids)
    save_bundle(handle, tmp_path / "b", {"shared": "shared", "experts/v100": "expert"}, roles={"shared": "shared"})
    info = describe(tmp_path / "b")
    assert info["kind"] == "bundle" and [m["member"] for m in info["members"]] == ["shared", "experts/v100"]
    assert info["parameters"] == sum(p.numel() for p in handle.parameters())
    whole = tiny.llama()
    load(whole, tmp_path / "b")
    torch.testing.assert_close(tiny.outputs(whole, ids), both, atol=0, rtol=0)
    alone = tiny.llama()
    load(alone, tmp_path / "b" / "experts" / "v100")
    with handle.only("expert"):
        torch.testing.assert_close(tiny.outputs(alone, ids), tiny.outputs(model, ids), atol=0, rtol=0)


def test_loading_onto_another_base_is_refused_unless_forced(tmp_path, caplog):
    model, handle = trained()
    save_adapter(handle, "a", tmp_path / "a")
    other = tiny.llama(seed=7)
    before = snapshot(other)
    with pytest.raises(StorageError, match="was made for base .*fingerprint.*not for.*--force"):
        load(other, tmp_path / "a")
    assert_same_state(before, other)
    load(other, tmp_path / "a", force=True)
    assert "loading anyway" in caplog.text


def test_existing_directory_is_never_overwritten_silently(tmp_path):
    model, handle = trained()
    save_adapter(handle, "a", tmp_path / "a")
    original = (tmp_path / "a" / WEIGHTS_FILE).read_bytes()
    randomize(handle, "a", seed=5)
    with pytest.raises(StorageError, match="already exists.*--overwrite"):
        save_adapter(handle, "a", tmp_path / "a")
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == original
    save_adapter(handle, "a", tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() != original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging left behind


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_usual_permissions_under_the_umask(tmp_path, umask):
    handle = adaplex.attach(tiny.llama(), "a", LoRAConfig(r=2, targets=("q",)))
    handle.add("b", BottleneckConfig(width=4))
    old = os.umask(umask)
    try:
        save_bundle(handle, tmp_path / "bundle")
        save_adapter(handle, "a", tmp_path / "bundle", overwrite=True)  # replaced by an exchange
    finally:
        os.umask(old)
    paths = [tmp_path / "bundle", *(tmp_path / "bundle").rglob("*")]
    assert {p.stat().st_mode & 0o777 for p in paths if p.is_dir()} == {0o777 & ~umask}
    assert {p.stat().st_mode & 0o777 for p in paths if p.is_file()} == {0o666 & ~umask}


def test_nonfinite_tensors_are_refused_unless_allowed(tmp_path):
    handle = adaplex.attach(tiny.llama(), "a", LoRAConfig(r=2, targets=("q",)))
    with torch.no_grad():
        handle.adapters("a")["model.layers.1.self_attn.q_proj"].B[0, 0] = float("inf")
    save_adapter(handle, "a", tmp_path / "a")
    export_peft(handle, ["a"], tmp_path / "peft")
    for directory in (tmp_path / "a", tmp_path / "peft"):
        model = tiny.llama()
        before = snapshot(model)
        with pytest.raises(StorageError, match=r"model.layers.1.self_attn.q_proj.*holds NaN or infinite values"):
            load(model, directory)
        assert_same_state(before, model)
        assert load(model, directory, allow_nonfinite=True).configs


def test_versions_record_their_lineage(tmp_path):
    model, handle = trained()
    save_adapter(handle, "a", tmp_path / "v1", version="v1")
    save_adapter(handle, "a", tmp_path / "v2", version="v2", parent="v1")
    save_adapter(handle, "a", tmp_path / "v3", version="v3", parent="v2")
    assert lineage(tmp_path / "v3") == ["v3", "v2", "v1"]
    assert describe(tmp_path / "v3")["lineage"] == ["v3", "v2", "v1"]


def test_legacy_bin_is_read_with_weights_only(tmp_path):
    torch.save({"x.A": torch.ones(2, 3)}, tmp_path / "ok.bin")
    assert torch.equal(read_legacy(tmp_path / "ok.bin")["x.A"], torch.ones(2, 3))

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(StorageError, match="not a readable PyTorch weights file"):
        read_legacy(tmp_path / "evil.bin")
    assert not marker.exists()


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.4:
        return data[: rng.randrange(len(data))]
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def test_corrupted_files_load_identically_or_fail_cleanly(tmp_path):
    """Seeded truncations and bit flips of both files: every load either gives identical tensors or
    raises an adaplex error and leaves the model exactly as it was."""
    model, handle = trained(config=LoRAConfig(r=2, targets=("q", "v")))
    save_adapter(handle, "a", tmp_path / "good")
    expected = handle.state_dict("a")
    rng = random.Random(1234)
    target = tiny.llama()
    before, names = snapshot(target), [n for n, _ in target.named_modules()]
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(120):
        broken = tmp_path / f"t{trial}"
        broken.mkdir()
        victim = rng.choice([CONFIG_FILE, WEIGHTS_FILE])
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            data = (tmp_path / "good" / file).read_bytes()
            (broken / file).write_bytes(_corrupt(data, rng) if file == victim else data)
        try:
            loaded = load(target, broken)
        except AdaplexError as err:
            assert "\n" not in str(err)
            assert_same_state(before, target)
            assert [n for n, _ in target.named_modules()] == names
            outcomes["refused"] += 1
            continue
        got = loaded.state_dict("a")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        loaded.detach()
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 100  # nearly every corruption is caught (a flip in JSON whitespace may not matter)


SAVER = """
import sys, torch
sys.path.insert(0, {tests!r})
import tiny, adaplex
from adaplex import LoRAConfig
from adaplex.io.storage import save_adapter
model = tiny.llama()
handle = adaplex.attach(model, "a", LoRAConfig(r=8))
version = 0
print("ready", flush=True)
while True:
    version += 1
    with torch.no_grad():
        for p in handle.parameters("a"):
            p.fill_(version)
    save_adapter(handle, "a", {target!r}, overwrite=True)
"""


def test_a_write_removes_staging_left_by_dead_writers_only(tmp_path):
    model, target = tiny.llama(), tmp_path / "adapter"
    handle = adaplex.attach(model, "a", LoRAConfig(r=2))
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".adapter.tmp-{int(exited.stdout)}-x1"
    live = tmp_path / f".adapter.tmp-{os.getpid()}-x2"  # e.g. a concurrent save in progress
    for staging in (dead, live):
        staging.mkdir()
        (staging / "adapter.safetensors").write_bytes(b"partial")
    save_adapter(handle, "a", target)
    assert not dead.exists() and live.exists() and target.is_dir()


def test_sigkill_while_saving_leaves_old_or_new_version_complete(tmp_path):
    target = tmp_path / "adapter"
    script = SAVER.format(tests=str(Path(__file__).parent), target=str(target))
    rng = random.Random(7)
    versions = set()
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not target.exists():
            continue  # killed before the first save finished: nothing was ever there
        handle = load(tiny.llama(), target)
        values = {float(t.flatten()[0]) for t in handle.state_dict("a").values()}
        assert len(values) == 1  # one complete version, never a mix
        assert all(torch.all(t == values.copy().pop()) for t in handle.state_dict("a").values())
        versions |= values
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "adapter"]
        for name in leftovers:
            assert name.startswith(".adapter.tmp-")  # staging dirs only, never the target
    assert len(versions) >= 2  # the kills landed at different moments
    handle = load(tiny.llama(), target)
    save_adapter(handle, "a", target, overwrite=True)  # the next write clears what the killed ones left
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


WRITTEN_BEFORE = Path(__file__).parent / "data" / "written-by-7cbfa60"


@pytest.mark.parametrize("name", ["lora", "moslora", "prefix", "bottleneck", "bundle"])
def test_files_written_by_an_earlier_version_load_and_give_its_outputs(name):
    expected = load_file(WRITTEN_BEFORE / "outputs.safetensors")[name]
    model = tiny.llama()
    handle = load(model, WRITTEN_BEFORE / name)  # fingerprint, checksums and tensors all as written then
    ids = tiny.tokens(batch=3)
    if name == "bundle":
        with route(handle, ["a100", "v100", None]):
            torch.testing.assert_close(tiny.outputs(model, ids), expected, atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(tiny.outputs(model, ids), expected, atol=1e-6, rtol=0)
    with handle.disable():
        assert not torch.allclose(tiny.outputs(model, ids), expected, atol=1e-4)


def test_describe_gives_method_rank_alpha_targets_sites_and_sizes(tmp_path):
    handle = adaplex.attach(tiny.gpt2(), "a", LoRAConfig(r=3, alpha=6, targets=("q", "v", "o")))
    save_adapter(handle, "a", tmp_path / "a")
    export_peft(handle, ["a"], tmp_path / "peft")
    ours, theirs = describe(tmp_path / "a"), describe(tmp_path / "peft")
    assert (ours["method"], ours["r"], ours["alpha"], ours["targets"]) == ("lora", 3, 6.0, ["q", "v", "o"])
    assert ours["sites"] == "transformer.h.*.attn.c_attn.q, transformer.h.*.attn.c_attn.v, transformer.h.*.attn.c_proj"
    assert ours["tensors"] == 2 * 3 * 2  # A and B, three sites, two layers
    # c_attn holds q and v by rank concatenation (r 6), c_proj r 3: two modules a layer
    assert (theirs["method"], theirs["r"], theirs["tensors"]) == ("lora", 6, 8)
    assert theirs["sites"] == "transformer.h.*.attn.c_attn, transformer.h.*.attn.c_proj"
    assert ours["parameters"] > 0 and theirs["bytes"] > 0

"""Prefix tuning through the registered attention function: masks, GQA, KV cache, generate()."""

from __future__ import annotations

import pytest
import torch

import adaplex
from adaplex import PrefixConfig

import tiny
from helpers import randomize

CAUSAL = ["llama", "qwen2", "gpt2"]


def prefixed(family: str, reparam: int | None = None):
    model = tiny.FAMILIES[family]()
    handle = adaplex.attach(model, "p", PrefixConfig(length=3, reparam_hidden=reparam, init_std=0.5))
    randomize(handle, "p", std=0.5)
    return model, handle


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("reparam", [None, 16])
def test_generation_with_kv_cache_equals_generation_without(family, reparam):
    model, _ = prefixed(family, reparam)
    ids = tiny.tokens(batch=2, length=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    with torch.no_grad():  # and the cached step logits equal a full forward's
        full = model(cached).logits[:, -1]
        out = model(cached[:, :-1], use_cache=True)
        step = model(cached[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", CAUSAL)
def test_prefix_respects_causal_mask(family):
    model, _ = prefixed(family)
    ids = tiny.tokens(batch=1, length=8)
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] % 50) + 1
    a, b = tiny.outputs(model, ids), tiny.outputs(model, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4


@pytest.mark.parametrize("family", [*CAUSAL, "bert"])
def test_prefix_respects_padding_mask(family):
    """A padded sample's real tokens give the same outputs as the sample alone."""
    model, _ = prefixed(family)
    ids = tiny.tokens(batch=1, length=6)
    alone = tiny.outputs(model, ids)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    both = torch.cat([padded, tiny.tokens(batch=1, length=9, seed=5)])
    out = tiny.outputs(model, both, torch.cat([mask, torch.ones(1, 9, dtype=torch.long)]))
    torch.testing.assert_close(out[:1, :6], alone, atol=1e-5, rtol=0)


def test_prefix_matches_a_hand_written_attention():
    """One llama layer's attention with prefix equals softmax(q [Pk;K]^T / sqrt(d)) [Pv;V] computed here."""
    model, handle = prefixed("llama")
    attn = model.model.layers[0].self_attn
    captured = {}
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: captured.update(out=out[0]), with_kwargs=True)
    pre = model.model.layers[0].input_layernorm.register_forward_hook(lambda m, i, o: captured.update(h=o))
    ids = tiny.tokens(batch=1, length=5)
    with torch.no_grad():
        model(ids)
        h = captured["h"]
        pos = model.model.rotary_emb(h, torch.arange(5).unsqueeze(0))
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q = attn.q_proj(h).view(1, 5, 4, 8).transpose(1, 2)
        k = attn.k_proj(h).view(1, 5, 2, 8).transpose(1, 2)
        v = attn.v_proj(h).view(1, 5, 2, 8).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pos)
        pk, pv = handle.adapters("p")["model.layers.0.self_attn"](1.0)
        k = torch.cat([pk.unsqueeze(0), k], 2).repeat_interleave(2, dim=1)  # GQA: 2 query heads per kv head
        v = torch.cat([pv.unsqueeze(0), v], 2).repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-1, -2) / 8**0.5  # (1, 4, 5, 3 + 5)
        causal = torch.ones(5, 5).tril().bool()
        scores[..., 3:] = scores[..., 3:].masked_fill(~causal, float("-inf"))
        expected = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 32))
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=0)
    hook.remove()
    pre.remove()


def test_disabled_prefix_is_the_base_model_bitwise():
    model, handle = prefixed("llama")
    ids = tiny.tokens()
    with handle.disable("p"):
        assert torch.equal(tiny.outputs(model, ids), tiny.outputs(tiny.llama(), ids))

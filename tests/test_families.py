"""The coverage matrix of the Hugging Face adapter: every family kvtier supports, fp32 and bf16, and the refusals.

Tiny random-weight models (``tests/families.py``): a stored-then-retrieved
prefix must continue exactly as a full prefill does. Tolerances, and why:

* the first pass (nothing cached) runs the very same computation as plain
  ``model.generate``: logits bit-identical;
* the hit computes the prompt's last token alone ([1, d] matmuls) where the
  full prefill computes it among all 150 ([150, d]); CPU BLAS sums those in a
  different order, so fp32 logits differ at rounding level: at most 1e-4
  (measured: under 1e-5). bf16: at most 1/64 of the largest logit (two bf16
  steps; measured: 0). Greedy output must be identical in every case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import FAMILIES, SLIDING, WINDOW, build, config, prompt, unsupported_configs

from kvtier.adapters.hf import CachedModel, KvtierCache, hf_layout, hf_namespace
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import UnsupportedModelError
from kvtier.models import check_folder, load_model, unsupported_reason

CHUNK = 32
N_PROMPT = 150  # 4 full chunks + a partial one; well past the 32-token windows
NEW = 12
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _engine(model, tmp_path: Path, **overrides) -> CacheEngine:
    cfg = load_config(env={}, overrides={"chunk_size": CHUNK, "l2.path": str(tmp_path), **overrides})
    return CacheEngine.from_config(cfg, hf_namespace(model)).start()


def _reference(model, ids: torch.Tensor):
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )


def _max_diff(logits_a, logits_b) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(logits_a, logits_b, strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_hit_continues_like_full_prefill(family: str, dtype: str, tmp_path: Path) -> None:
    model = build(family, DTYPES[dtype])
    ids = prompt(N_PROMPT)
    ref = _reference(model, ids)
    with CachedModel(model, None, _engine(model, tmp_path)) as cached:
        cold = cached.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True)
        warm = cached.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True)
    assert (cold.reused_tokens, warm.reused_tokens) == (0, N_PROMPT - 1)
    assert warm.tier_tokens["l1"] == N_PROMPT - 1
    # the prompt: 4 full chunks + a partial one; then prompt + answer (161 tokens with KV): [128, 160) and [160, 161)
    assert cold.stored.stored_chunks == 5 + 2
    assert torch.equal(cold.sequences, ref.sequences)
    assert torch.equal(warm.sequences, ref.sequences)
    assert _max_diff(cold.output.logits, ref.logits) == 0.0
    scale = max(r.abs().max().item() for r in ref.logits)
    limit = 1e-4 if dtype == "fp32" else scale / 64
    assert _max_diff(warm.output.logits, ref.logits) <= limit


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_layout_and_the_window_matters(family: str) -> None:
    """The layout names each sliding layer's window; the window changes the output (so the tests above test it)."""
    model = build(family)
    layout = hf_layout(model)
    kinds = layout.attention_kinds
    assert "sliding" in kinds and set(layout.windows or ()) <= {0, WINDOW}
    assert kinds == tuple("sliding" if t == "sliding_attention" else "full" for t in _layer_types(model))
    full_cfg = config(family)
    full_cfg.sliding_window = 4096  # the same weights with windows wider than the prompt: full attention in effect
    full = build(family, cfg=full_cfg)
    full.load_state_dict(model.state_dict())
    assert set(hf_layout(full).windows or ()) <= {0, 4096}
    ids = prompt(N_PROMPT)
    with torch.inference_mode():
        assert not torch.allclose(model(ids).logits[0, -1], full(ids).logits[0, -1], atol=1e-3)
    assert hf_namespace(model).digest != hf_namespace(full).digest  # different kinds: different namespaces


def _layer_types(model) -> list[str]:
    from transformers.cache_utils import get_layer_types_and_kwargs

    return get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))[0]


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_stored_sliding_kv_is_the_prefix_own_kv(family: str, tmp_path: Path) -> None:
    """What is stored for a sliding layer is the KV of the tokens it is keyed by, for the whole prompt.

    (transformers keeps only a sliding layer's last window - 1 tokens; stored as
    they were, those tokens' KV would sit under the first tokens' keys.)
    """
    from transformers import DynamicCache

    model = build(family)
    ids = prompt(N_PROMPT)
    with torch.inference_mode():
        truth = model(ids, past_key_values=DynamicCache(), use_cache=True).past_key_values  # keeps every token
    with CachedModel(model, None, _engine(model, tmp_path)) as cached:
        cached.generate(ids, max_new_tokens=2, do_sample=False)
        hits = [cached.engine.retrieve(ids[0])]
    with _engine(model, tmp_path) as fresh:  # a new process's engine: l1 empty, the chunks read back from disk
        hits.append(fresh.retrieve(ids[0]))
    assert hits[1].tier_tokens["l2"] == N_PROMPT
    for hit in hits:
        assert hit.num_tokens == N_PROMPT
        for layer, kv in enumerate(hit.layers):
            assert torch.equal(kv[0], truth.layers[layer].keys[0])
            assert torch.equal(kv[1], truth.layers[layer].values[0])


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_multi_turn_reuses_prompt_and_answer(family: str, tmp_path: Path) -> None:
    """Turn two of a chat (history + answer + new message) reuses all of turn one, far past the window."""
    model = build(family)
    first_prompt = prompt(N_PROMPT)
    with CachedModel(model, None, _engine(model, tmp_path)) as cached:
        first = cached.generate(first_prompt, max_new_tokens=NEW, do_sample=False)
        follow_up = torch.cat([first.sequences, prompt(40, seed=2)], dim=1)
        second = cached.generate(follow_up, max_new_tokens=NEW, do_sample=False, output_logits=True)
    ref = _reference(model, follow_up)
    assert second.reused_tokens == N_PROMPT + NEW - 1  # the last generated token had no KV yet
    assert torch.equal(second.sequences, ref.sequences)
    assert _max_diff(second.output.logits, ref.logits) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_kvtier_cache_in_plain_generate(family: str, tmp_path: Path) -> None:
    """``model.generate(**cache.load(ids), past_key_values=cache)``: reuse and store, with CachedModel's reports."""
    model = build(family)
    ids = prompt(N_PROMPT)
    ref = _reference(model, ids)
    with _engine(model, tmp_path) as engine:
        runs = []
        for _ in range(2):
            cache = KvtierCache(model, engine)
            inputs = cache.load(ids)
            with torch.inference_mode():
                out = model.generate(
                    **inputs, past_key_values=cache, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True
                )
            runs.append((cache.rows[0], out))
    (cold, cold_out), (warm, warm_out) = runs
    assert cold.reused_tokens == 0 and cold.stored.stored_chunks == N_PROMPT // CHUNK + 1  # the prompt's chunks
    assert warm.reused_tokens == N_PROMPT - 1 and warm.tiers == f"l1:{N_PROMPT - 1}"
    assert warm.stored.stored_chunks == 0 and warm.stored.skipped_chunks > 0
    assert torch.equal(cold_out.sequences, ref.sequences)
    assert torch.equal(warm_out.sequences, ref.sequences)


def test_kvtier_cache_is_filled_once(tmp_path: Path) -> None:
    model = build("llama")
    with _engine(model, tmp_path) as engine:
        cache = KvtierCache(model, engine)
        cache.load(prompt(10))
        with pytest.raises(ValueError, match="once"):
            cache.load(prompt(10))
        with pytest.raises(ValueError, match="empty"):
            KvtierCache(model, engine).load(torch.tensor([], dtype=torch.long))


# -- refusals ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(unsupported_configs()))
def test_unsupported_family_is_refused_with_its_reason(name: str) -> None:
    cfg, word = unsupported_configs()[name]
    reason = unsupported_reason(cfg)
    assert reason is not None and word in reason


def test_supported_families_have_no_refusal() -> None:
    for family in FAMILIES:
        assert unsupported_reason(config(family)) is None, family


def test_refused_at_start_up_before_weights_load(tmp_path: Path) -> None:
    """A folder of a refused family fails in load_model (and so CachedModel.from_config) from its config alone."""
    import transformers as T

    folder = tmp_path / "deepseek"
    folder.mkdir()
    cfg = T.DeepseekV3Config(num_hidden_layers=2)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))  # no weights at all
    with pytest.raises(UnsupportedModelError, match="latent attention"):
        check_folder(folder)
    with pytest.raises(UnsupportedModelError, match="latent attention"):
        load_model(folder)


def test_hf_layout_refuses_a_loaded_unsupported_model() -> None:
    import transformers as T

    torch.manual_seed(0)
    mamba = T.AutoModelForCausalLM.from_config(T.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1))
    with pytest.raises(ValueError, match="state-space"):
        hf_layout(mamba)


# -- batches ----------------------------------------------------------------------------------------------------------


def _shared_prefix_prompts() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(prefixes A, B; 4 prompts: A + x, A + y, B + z, C + w) of lengths 90, 103, 55, 85."""
    a, b, c = prompt(70, 11)[0], prompt(45, 12)[0], prompt(60, 13)[0]
    tails = [prompt(n, seed)[0] for n, seed in ((20, 21), (33, 22), (10, 23), (25, 24))]
    return [a, b], [torch.cat([head, tail]) for head, tail in zip((a, a, b, c), tails, strict=True)]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_by_one(family: str, tmp_path: Path) -> None:
    """4 prompts with different shared prefixes: the batch gives each row what generating it alone gives.

    Logits: at most 1e-4 apart (the padded rows' matmuls have other shapes; measured about 1e-5).
    """
    model = build(family)
    prefixes, prompts = _shared_prefix_prompts()
    refs = [_reference(model, p.unsqueeze(0)) for p in prompts]
    with CachedModel(model, None, _engine(model, tmp_path / "batch", chunk_size=16)) as cached:
        for p in prefixes:
            cached.generate(p, max_new_tokens=1)
        batch = cached.generate(prompts, max_new_tokens=NEW, do_sample=False, output_logits=True)
        again = cached.generate(prompts, max_new_tokens=NEW, do_sample=False)
        follow_up = torch.cat([batch[2].sequences[0], prompt(9, 31)[0]])  # row 2 was padded inside: its answer's KV
        turn_two = cached.generate(follow_up, max_new_tokens=NEW, do_sample=False)
    with CachedModel(model, None, _engine(model, tmp_path / "single", chunk_size=16)) as cached:
        for p in prefixes:
            cached.generate(p, max_new_tokens=1)
        single = [cached.generate(p, max_new_tokens=NEW, do_sample=False) for p in prompts]
    assert isinstance(batch, list) and len(batch) == 4
    for gen, one, ref in zip(batch, single, refs, strict=True):
        assert torch.equal(gen.sequences, ref.sequences)
        assert torch.equal(gen.sequences, one.sequences)
        assert _max_diff([step[gen.row : gen.row + 1] for step in gen.output.logits], ref.logits) <= 1e-4
    assert [g.reused_tokens for g in single] == [70, 70, 45, 0]
    if hf_layout(model).has_sliding:  # rows stay contiguous: a common cached width, at most each row's hit
        assert all(0 <= g.reused_tokens <= s.reused_tokens for g, s in zip(batch, single, strict=True))
    else:  # every row its own hit
        assert [g.reused_tokens for g in batch] == [70, 70, 45, 0]
    assert [g.reused_tokens for g in again] == [len(p) - 1 for p in prompts]
    assert all(torch.equal(g.sequences, r.sequences) for g, r in zip(again, refs, strict=True))
    assert turn_two.reused_tokens == len(prompts[2]) + NEW - 1
    assert torch.equal(turn_two.sequences, _reference(model, follow_up.unsqueeze(0)).sequences)


def test_batch_of_one_and_tensor_batches(tmp_path: Path) -> None:
    model = build("llama")
    ids = prompt(40)
    with CachedModel(model, None, _engine(model, tmp_path)) as cached:
        one = cached.generate(ids, max_new_tokens=3, do_sample=False)
        listed = cached.generate([ids[0]], max_new_tokens=3, do_sample=False)
        rows = cached.generate(torch.cat([ids, prompt(40, seed=5)]), max_new_tokens=3, do_sample=False)
    assert not isinstance(one, list) and isinstance(listed, list) and len(rows) == 2
    assert torch.equal(listed[0].sequences, one.sequences) and torch.equal(rows[0].sequences, one.sequences)
    assert listed[0].reused_tokens == 39 and rows[1].reused_tokens == 0


def test_several_return_sequences_and_beams(tmp_path: Path) -> None:
    """num_return_sequences: cached rows repeated, the hit samples as recompute does. Beams: no answer stored."""
    model = build("llama")
    ids = prompt(N_PROMPT)
    kwargs = {"max_new_tokens": 8, "do_sample": True, "num_return_sequences": 2}
    with torch.inference_mode():
        torch.manual_seed(3)
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    with _engine(model, tmp_path) as engine:
        cached = CachedModel(model, None, engine)
        cached.generate(ids, max_new_tokens=1, do_sample=False)
        torch.manual_seed(3)
        warm = cached.generate(ids, **kwargs)
        assert warm.reused_tokens == N_PROMPT - 1 and torch.equal(warm.sequences, plain)
        assert warm.stored.stored_chunks == 2  # each sample's answer: its own partial chunk after the prompt's
        cache = KvtierCache(model, engine)
        inputs = cache.load(ids, copies=2)
        with torch.inference_mode():
            beams = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, num_beams=2, do_sample=False)
        before = engine.stats().stored_chunks
        cache.store_generated(beams)  # the cache's rows were reordered: refused, nothing stored
        assert engine.stats().stored_chunks == before and cache.rows[0].reused_tokens == N_PROMPT - 1

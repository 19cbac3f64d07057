"""The Hugging Face adapter on the real model (SmolLM2-135M, fp32): hits must equal recompute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.model

REPO = Path(__file__).resolve().parents[1]
GPL = Path("/usr/share/common-licenses/GPL-3")
CHUNK = 128


@pytest.fixture(scope="module")
def loaded():
    from kvtier.config import load_config
    from kvtier.models import load_model, resolve_model

    folder = resolve_model("smollm2-135m", load_config(env={}).cache_dir)
    return load_model(folder)


@pytest.fixture(scope="module")
def prompt(loaded) -> torch.Tensor:
    """About 600 tokens of real English: 4 full chunks of 128 and a partial one."""
    _, tok = loaded
    text = GPL.read_text() if GPL.is_file() else (Path(os.__file__).parent / "LICENSE.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :600]
    assert ids.shape[1] == 600
    return ids


@pytest.fixture(scope="module")
def reference(loaded, prompt):
    """Greedy output and first-step logits without kvtier."""
    model, _ = loaded
    with torch.inference_mode():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=16,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )


def _cached(loaded, chunk_dir: Path, **overrides):
    from kvtier.adapters.hf import CachedModel, hf_namespace
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine

    model, tok = loaded
    cfg = load_config(env={}, overrides={"chunk_size": CHUNK, "l2.path": str(chunk_dir), **overrides})
    engine = CacheEngine.from_config(cfg, hf_namespace(model, tenant=cfg.tenant)).start()
    return CachedModel(model, tok, engine, store_generated=cfg.store_generated)


def _greedy(cached, prompt):
    return cached.generate(prompt, max_new_tokens=16, do_sample=False, output_logits=True)


def test_hit_equals_recompute(loaded, prompt, reference, tmp_path):
    with _cached(loaded, tmp_path) as cached:
        cold = _greedy(cached, prompt)
        warm = _greedy(cached, prompt)
    assert cold.reused_tokens == 0
    assert warm.reused_tokens == 599  # everything but the last prompt token, which must be computed
    assert warm.tier_tokens["l1"] == 599
    for gen in (cold, warm):
        assert torch.equal(gen.sequences, reference.sequences)
        assert (gen.output.logits[0] - reference.logits[0]).abs().max().item() <= 1e-4


def test_sampling_hit_matches_recompute_with_same_seed(loaded, prompt, tmp_path):
    model, _ = loaded
    kwargs = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.8, "top_p": 0.95}
    with torch.inference_mode():
        torch.manual_seed(7)
        plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    with _cached(loaded, tmp_path) as cached:
        cached.generate(prompt, max_new_tokens=1, do_sample=False)  # fill the cache
        torch.manual_seed(7)
        warm = cached.generate(prompt, **kwargs)
    assert warm.reused_tokens == 599
    assert torch.equal(warm.sequences, plain)


def test_multi_turn_reuses_previous_answer(loaded, prompt, tmp_path):
    """With store_generated, turn two reuses the prompt *and* the generated answer (partial chunk included)."""
    with _cached(loaded, tmp_path) as cached:
        first = _greedy(cached, prompt)
        follow_up = torch.cat([first.sequences, prompt[:, :40]], dim=1)  # history + answer + a new message
        second = _greedy(cached, follow_up)
    cached_len = prompt.shape[1] + 16 - 1  # the last generated token has no KV yet
    assert second.reused_tokens == cached_len


def test_batch_equals_one_by_one(loaded, prompt, tmp_path):
    """4 prompts with different shared prefixes (left-padded, each row its own hit) = one-by-one generation."""
    text = prompt[0]
    a, b = text[:300], text[:150]  # stored first: two different prefixes
    prompts = [text[:340], torch.cat([a, text[400:420]]), torch.cat([b, text[500:560]]), text[300:420]]
    with _cached(loaded, tmp_path / "batch") as cached:
        cached.generate(a, max_new_tokens=1)
        cached.generate(b, max_new_tokens=1)
        batch = cached.generate(prompts, max_new_tokens=8, do_sample=False)
    with _cached(loaded, tmp_path / "single") as cached:
        cached.generate(a, max_new_tokens=1)
        cached.generate(b, max_new_tokens=1)
        single = [cached.generate(p, max_new_tokens=8, do_sample=False) for p in prompts]
    assert [g.reused_tokens for g in batch] == [300, 300, 150, 0] == [g.reused_tokens for g in single]
    for gen, one in zip(batch, single, strict=True):
        assert torch.equal(gen.sequences, one.sequences)


_CHILD = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from kvtier.adapters.hf import CachedModel, hf_namespace
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.models import load_model, resolve_model
model, tok = load_model(resolve_model("smollm2-135m", load_config(env={{}}).cache_dir))
cfg = load_config(env={{}}, overrides={{"chunk_size": {chunk}, "l2.path": {path!r}}})
ids = torch.tensor([{ids}])
with CachedModel(model, tok, CacheEngine.from_config(cfg, hf_namespace(model)).start()) as cached:
    gen = cached.generate(ids, max_new_tokens=16, do_sample=False)
print(json.dumps({{"reused": gen.reused_tokens, "tiers": gen.tier_tokens, "tokens": gen.sequences[0].tolist()}}))
"""


def test_second_process_hits_disk(loaded, prompt, reference, tmp_path):
    with _cached(loaded, tmp_path) as cached:
        _greedy(cached, prompt)
        cached.engine.flush()
    code = _CHILD.format(repo=str(REPO), chunk=CHUNK, path=str(tmp_path), ids=",".join(map(str, prompt[0].tolist())))
    env = {**os.environ, "PYTHONHASHSEED": "99"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["reused"] == 599
    assert result["tiers"]["l2"] == 599
    assert result["tokens"] == reference.sequences[0].tolist()


def _files_by_chain(cached) -> list[Path]:
    """The disk tier's chunk files in prefix order (root first)."""
    disk = cached.engine.tiers.tiers[1]
    files = {p.name.split(".")[0]: p for p in disk.files()}
    order, parent = [], "root"
    while True:
        nxt = [p for p in files.values() if p.name.split(".")[1] == parent]
        if not nxt:
            return order
        order.append(nxt[0])
        parent = nxt[0].name.split(".")[0]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_damaged_file_is_a_counted_miss(loaded, prompt, reference, tmp_path, damage):
    with _cached(loaded, tmp_path) as cached:
        _greedy(cached, prompt)
        cached.engine.flush()
        chain = _files_by_chain(cached)
    assert len(chain) >= 3
    victim = chain[2]  # third chunk: tokens 256..383
    data = bytearray(victim.read_bytes())
    if damage == "flip_byte":
        data[-1000] ^= 0x40
    else:
        data = data[: len(data) // 2]
    victim.write_bytes(bytes(data))
    with _cached(loaded, tmp_path, **{"l1.enabled": False}) as cached:
        gen = _greedy(cached, prompt)
        stats, disk = cached.engine.stats(), cached.engine.tiers.tiers[0].stats()
    assert gen.reused_tokens == 2 * CHUNK
    assert torch.equal(gen.sequences, reference.sequences)
    assert disk.corrupt == 1
    assert stats.invalid_chunks == {}  # damage is the tier's count (above), not a wrong chunk
    # the damaged file was dropped, then rewritten with the recomputed KV
    assert victim.read_bytes() != bytes(data)
    assert disk_after(tmp_path).corrupt == 0


def disk_after(chunk_dir: Path):
    """Stats of a fresh disk tier after reading every chunk in it once."""
    from kvtier.storage import DiskBackend

    disk = DiskBackend(chunk_dir, 10**12)
    disk.start()
    disk.get(disk.keys_lru_order())
    return disk.stats()


def test_other_models_chunk_is_a_counted_miss(loaded, prompt, reference, tmp_path):
    """A chunk from another namespace, planted under this model's key, is never served."""
    from kvtier.chunk import Chunk
    from kvtier.keys import Namespace, chunk_spans

    with _cached(loaded, tmp_path) as cached:
        ns = cached.engine.namespace
        spans = chunk_spans(ns, prompt[0].numpy(), CHUNK)
        other = Namespace("another-model-fingerprint", ns.layout)
        payload = torch.randn(ns.layout.chunk_shape(CHUNK))
        planted = Chunk(spans[0].key, None, other.digest, ns.layout, prompt[0, :CHUNK].numpy().astype("<u4"), payload)
        assert cached.engine.tiers.tiers[1].put([planted]) == [True]
        gen = _greedy(cached, prompt)
        forged = cached.engine.tiers.tiers[1].stats().forged
    assert gen.reused_tokens == 0
    assert forged == 1  # the disk tier refused it from its header: not this engine's namespace
    assert torch.equal(gen.sequences, reference.sequences)

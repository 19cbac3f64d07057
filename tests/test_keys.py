"""kvtier.keys: chained prefix keys, namespaces, token validation, partial keys, cross-process determinism."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import blake3
import numpy as np
import pytest
import torch

from kvtier.keys import ChunkKey, Namespace, as_token_array, chunk_spans, partial_keys, token_bytes
from kvtier.layout import KVLayout

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4)
TOKENS = [(i * 7919 + 13) % 50_000 for i in range(37)]  # 9 full chunks of 4 + 1 spare token

# Stored chunks are named by these digests: a change here orphans every existing cache,
# so it must come with a new _NAMESPACE_VERSION, never silently.
GOLDEN_NAMESPACE = {
    "blake3": "de38f82bc6bc8c8230e9b05874e6c619da58109920de46b5ae5f8f61715f6fd9",
    "sha256": "f428fc782a6973d3b84f15d02ddfb1bce786738e3715ebe2e9e115f4adfc6cce",
}


def _ns(hash_name: str = "blake3", **kw: object) -> Namespace:
    args = {"model_fingerprint": "golden-model", "layout": LAYOUT, "tenant": "tenant-a", "hash_name": hash_name}
    args.update(kw)
    return Namespace(**args)  # type: ignore[arg-type]


def _reference_keys(ns: Namespace, tokens: list[int], chunk_size: int) -> list[str]:
    """The documented recipe, written independently: key_i = H(key_{i-1} || tokens as LE uint32)."""
    h = blake3.blake3 if ns.hash_name == "blake3" else hashlib.sha256
    prev = ns.digest
    out = []
    for i in range(len(tokens) // chunk_size):
        data = b"".join(t.to_bytes(4, "little") for t in tokens[i * chunk_size : (i + 1) * chunk_size])
        prev = h(prev + data).digest()
        out.append(prev.hex())
    return out


@pytest.mark.parametrize("hash_name", ["blake3", "sha256"])
def test_namespace_digest_is_pinned(hash_name: str) -> None:
    ns = _ns(hash_name)
    assert ns.digest.hex() == GOLDEN_NAMESPACE[hash_name]
    assert len(ns.digest) == 32


@pytest.mark.parametrize("hash_name", ["blake3", "sha256"])
def test_chunk_spans_follow_documented_recipe(hash_name: str) -> None:
    ns = _ns(hash_name)
    spans = chunk_spans(ns, TOKENS, 4)
    assert [s.key.hex() for s in spans] == _reference_keys(ns, TOKENS, 4)
    assert [(s.start, s.end) for s in spans] == [(4 * i, 4 * i + 4) for i in range(9)]
    assert spans[0].parent is None
    assert [s.parent for s in spans[1:]] == [s.key for s in spans[:-1]]
    assert all(s.num_tokens == 4 for s in spans)


def test_chunk_spans_deterministic_across_input_types() -> None:
    ns = _ns()
    expected = chunk_spans(ns, TOKENS, 4)
    for form in (
        np.asarray(TOKENS, dtype=np.int64),
        np.asarray(TOKENS, dtype=np.uint32),
        np.asarray(TOKENS, dtype=np.int32),
        tuple(TOKENS),
    ):
        assert chunk_spans(ns, form, 4) == expected
    assert chunk_spans(_ns(), TOKENS, 4) == expected  # a second, equal namespace object


def test_chunk_spans_excludes_trailing_partial_and_short_input() -> None:
    ns = _ns()
    assert len(chunk_spans(ns, TOKENS, 4)) == 9
    assert len(chunk_spans(ns, TOKENS[:36], 4)) == 9
    assert len(chunk_spans(ns, TOKENS[:35], 4)) == 8
    assert chunk_spans(ns, TOKENS[:3], 4) == []
    assert chunk_spans(ns, [], 4) == []


@pytest.mark.parametrize("bad", [0, -1])
def test_chunk_spans_rejects_non_positive_chunk_size(bad: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_spans(_ns(), TOKENS, bad)


@pytest.mark.parametrize("changed_chunk", range(9))
def test_changing_one_token_changes_only_that_chunk_and_later(changed_chunk: int) -> None:
    ns = _ns()
    base = [s.key for s in chunk_spans(ns, TOKENS, 4)]
    edited = list(TOKENS)
    edited[changed_chunk * 4 + 2] += 1
    keys = [s.key for s in chunk_spans(ns, edited, 4)]
    assert keys[:changed_chunk] == base[:changed_chunk]
    for i in range(changed_chunk, 9):
        assert keys[i] != base[i], i
    assert len(set(keys) | set(base)) == 9 + (9 - changed_chunk)


def test_prefix_keys_do_not_depend_on_what_follows() -> None:
    ns = _ns()
    assert chunk_spans(ns, TOKENS[:16], 4) == chunk_spans(ns, TOKENS, 4)[:4]
    assert chunk_spans(ns, [*TOKENS[:16], 1, 2, 3, 4], 4)[:4] == chunk_spans(ns, TOKENS, 4)[:4]


def test_same_tokens_at_another_position_get_another_key() -> None:
    ns = _ns()
    spans = chunk_spans(ns, [5, 6, 7, 8] * 3, 4)
    assert len({s.key for s in spans}) == 3


@pytest.mark.parametrize(
    "other",
    [
        {"model_fingerprint": "golden-model-2"},
        {"layout": KVLayout(2, 2, 4, "float16")},
        {"layout": KVLayout(3, 2, 4)},
        {"layout": KVLayout(2, 1, 4)},
        {"layout": KVLayout(2, 2, 8)},
        {"tenant": "tenant-b"},
        {"tenant": None},
        {"hash_name": "sha256"},
    ],
    ids=["fingerprint", "dtype", "layers", "heads", "head_dim", "tenant", "no-tenant", "hash"],
)
def test_namespaces_never_share_keys(other: dict[str, object]) -> None:
    a, b = _ns(), _ns(**other)
    assert a.digest != b.digest
    keys_a = {s.key for s in chunk_spans(a, TOKENS, 4)}
    keys_b = {s.key for s in chunk_spans(b, TOKENS, 4)}
    assert keys_a.isdisjoint(keys_b)
    parts_a = {s.key for s in partial_keys(a, None, TOKENS[:3], 0)}
    parts_b = {s.key for s in partial_keys(b, None, TOKENS[:3], 0)}
    assert parts_a.isdisjoint(parts_b)


def test_with_tenant() -> None:
    ns = _ns(tenant=None)
    salted = ns.with_tenant("x")
    assert salted == _ns(tenant="x")
    assert salted.digest == _ns(tenant="x").digest
    assert salted.with_tenant(None).digest == ns.digest


@pytest.mark.parametrize(
    "kw", [{"model_fingerprint": ""}, {"tenant": ""}, {"hash_name": "md5"}], ids=["fingerprint", "tenant", "hash"]
)
def test_namespace_rejects_bad_fields(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _ns(**kw)


@pytest.mark.parametrize(
    "tokens",
    [
        [1, -1, 3],
        np.array([-5], dtype=np.int64),
        [1, 2**32],
        np.array([[1, 2], [3, 4]]),
        [[1, 2, 3, 4]],
        [1.0, 2.0],
        np.array([1.5, 2.5]),
        np.array([True, False]),
        5,
    ],
    ids=["negative", "negative-np", "too-big", "2d", "2d-list", "float-list", "float-np", "bool", "scalar"],
)
def test_bad_token_ids_raise_value_error(tokens: object) -> None:
    with pytest.raises(ValueError):
        token_bytes(tokens)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        chunk_spans(_ns(), tokens, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        as_token_array(tokens)  # type: ignore[arg-type]


def test_token_bytes_and_as_token_array() -> None:
    assert token_bytes([1, 256, 2**32 - 1]) == bytes([1, 0, 0, 0, 0, 1, 0, 0, 255, 255, 255, 255])
    assert token_bytes([]) == b""
    arr = as_token_array(np.array([3, 4], dtype=np.int64))
    assert arr.dtype == np.dtype("<u4")
    assert arr.tolist() == [3, 4]
    src = np.array([9, 9], dtype="<u4")
    copy = as_token_array(src)
    copy[0] = 1
    assert src.tolist() == [9, 9]


@pytest.mark.parametrize("hash_name", ["blake3", "sha256"])
def test_partial_keys_longest_first_and_full_length_equals_chunk_key(hash_name: str) -> None:
    ns = _ns(hash_name)
    spans = chunk_spans(ns, TOKENS, 4)
    parent = spans[1].key
    # the caller normally bounds the tail to < chunk_size tokens; with exactly one chunk the longest
    # candidate must be that chunk's full key
    cands = list(partial_keys(ns, parent, TOKENS[:12], 8))
    assert [(c.start, c.end) for c in cands] == [(8, 12), (8, 11), (8, 10), (8, 9)]
    assert all(c.parent == parent for c in cands)
    assert cands[0].key == spans[2].key
    assert len({c.key for c in cands}) == 4
    # each candidate is the documented hash of parent || its tokens
    h = blake3.blake3 if hash_name == "blake3" else hashlib.sha256
    for c in cands:
        assert c.key.digest == h(parent.digest + token_bytes(TOKENS[c.start : c.end])).digest()


def test_partial_keys_at_root_and_empty_tail() -> None:
    ns = _ns()
    cands = list(partial_keys(ns, None, TOKENS[:3], 0))
    assert [c.num_tokens for c in cands] == [3, 2, 1]
    assert cands[0].key.digest == blake3.blake3(ns.digest + token_bytes(TOKENS[:3])).digest()
    assert all(c.parent is None for c in cands)
    assert list(partial_keys(ns, None, TOKENS[:4], 4)) == []
    # a partial key of n tokens equals the full key a chunk_size=n chain would give
    assert cands[1].key == chunk_spans(ns, TOKENS[:2], 2)[0].key


def test_chunk_key_validation_and_hex_round_trip() -> None:
    key = chunk_spans(_ns(), TOKENS, 4)[0].key
    assert ChunkKey.from_hex(key.hex()) == key
    assert hash(ChunkKey.from_hex(key.hex())) == hash(key)
    for bad in (b"", b"x" * 31, b"x" * 33, "a" * 32):
        with pytest.raises(ValueError):
            ChunkKey(bad)  # type: ignore[arg-type]


def test_torch_tensor_tokens_are_not_accepted_silently_as_floats() -> None:
    with pytest.raises(ValueError):
        token_bytes(torch.tensor([1.0, 2.0]).numpy())


_CHILD_SCRIPT = """
from kvtier.keys import Namespace, chunk_spans, partial_keys
from kvtier.layout import KVLayout
tokens = {tokens!r}
for h in ("blake3", "sha256"):
    ns = Namespace("golden-model", KVLayout(2, 2, 4), "tenant-a", h)
    print(ns.digest.hex())
    spans = chunk_spans(ns, tokens, 4)
    for s in spans:
        print(s.key.hex())
    for p in partial_keys(ns, spans[-1].key, tokens, len(spans) * 4):
        print(p.key.hex())
"""


def _in_process_lines() -> list[str]:
    lines = []
    for h in ("blake3", "sha256"):
        ns = _ns(h)
        lines.append(ns.digest.hex())
        spans = chunk_spans(ns, TOKENS, 4)
        lines += [s.key.hex() for s in spans]
        lines += [p.key.hex() for p in partial_keys(ns, spans[-1].key, TOKENS, len(spans) * 4)]
    return lines


def test_keys_identical_across_processes_and_hash_seeds() -> None:
    expected = _in_process_lines()
    assert len(expected) == 2 * (1 + 9 + 1)
    script = _CHILD_SCRIPT.format(tokens=TOKENS)
    procs = {}
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
        procs[seed] = subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for seed, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.split() == expected, f"PYTHONHASHSEED={seed}"


def test_attention_windows_in_the_namespace_only_when_a_layer_slides() -> None:
    full = KVLayout(2, 2, 4)
    assert KVLayout(2, 2, 4, windows=(0, 0)) == full and full.windows is None  # all-full normalises away
    assert full.to_dict() == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float32"}
    assert Namespace("m", KVLayout(2, 2, 4, windows=(0, 0))).digest == Namespace("m", full).digest
    sliding = KVLayout(2, 2, 4, windows=(32, 0))
    other = KVLayout(2, 2, 4, windows=(64, 0))
    digests = {Namespace("m", layout).digest for layout in (full, sliding, other)}
    assert len(digests) == 3  # a different window is a different namespace
    assert sliding.attention_kinds == ("sliding", "full") and sliding.payload == full
    assert KVLayout.from_dict(sliding.to_dict()) == sliding
    for bad in ((32,), (32, -1), (32, 1.5)):
        with pytest.raises(ValueError, match="windows"):
            KVLayout(2, 2, 4, windows=bad)  # type: ignore[arg-type]

"""Shared fixtures for the core (model-free) tests: a small layout, a namespace and chunk factories."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
import xxhash

from kvtier.chunk import Chunk
from kvtier.keys import Namespace, chunk_spans
from kvtier.layout import KVLayout

# chunk payload: [L=2, 2, H=2, T, D=4] float32 -> 128 bytes per token
SMALL_LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4)


@pytest.fixture
def layout() -> KVLayout:
    return SMALL_LAYOUT


@pytest.fixture
def namespace(layout: KVLayout) -> Namespace:
    return Namespace("test-model-fingerprint", layout)


def build_chain(
    namespace: Namespace, tokens: Sequence[int] | np.ndarray, chunk_size: int, *, seed: int = 0
) -> list[Chunk]:
    """The full chunks of ``tokens`` (root first) with seeded random payloads."""
    arr = np.asarray(tokens, dtype="<u4")
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for span in chunk_spans(namespace, arr, chunk_size):
        payload = torch.randn(namespace.layout.chunk_shape(span.num_tokens), generator=gen).to(
            namespace.layout.torch_dtype
        )
        chunks.append(
            Chunk(span.key, span.parent, namespace.digest, namespace.layout, arr[span.start : span.end].copy(), payload)
        )
    return chunks


@pytest.fixture
def make_chain(namespace: Namespace) -> Callable[..., list[Chunk]]:
    """``make_chain(tokens, chunk_size=4, seed=0, namespace=None)``: a chain of chunks with random payloads."""

    def make(
        tokens: Sequence[int] | np.ndarray, chunk_size: int = 4, *, seed: int = 0, namespace_: Namespace | None = None
    ) -> list[Chunk]:
        return build_chain(namespace_ or namespace, tokens, chunk_size, seed=seed)

    return make


def v1_blob(chunk: Chunk) -> bytes:
    """``chunk`` as chunk format 1 wrote it: b"KVTC" | u16 1 | u32 header length | JSON header | payload."""
    payload = chunk.payload.numpy().tobytes()
    header = json.dumps(
        {
            "key": chunk.key.hex(),
            "parent": chunk.parent.hex() if chunk.parent is not None else None,
            "namespace": chunk.namespace.hex(),
            "layout": chunk.layout.to_dict(),
            "codec": "raw",
            "tokens": chunk.tokens.tolist(),
            "payload_len": len(payload),
            "checksum": "xxh3_128:" + xxhash.xxh3_128_hexdigest(payload),
        },
        separators=(",", ":"),
    ).encode()
    return struct.pack("<4sHI", b"KVTC", 1, len(header)) + header + payload

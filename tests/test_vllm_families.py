"""A second family through the real vLLM engine: a tiny random Qwen2 saved to a folder, with and without kvtier.

Two engine starts: vLLM alone, then vLLM with the connector (vLLM's own prefix
cache off, so a repeat can only hit kvtier). The repeat must be loaded from
kvtier and give the same tokens as vLLM alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers as T
from families import prompt, save_folder
from test_vllm import run_driver

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs vLLM")

# head dim 64: a size vLLM's CPU attention kernels take
QWEN2 = {
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "initializer_range": 0.2,
}


def test_tiny_qwen2_hit_through_vllm_equals_vllm_alone(tmp_path: Path) -> None:
    folder = save_folder("qwen2", tmp_path / "qwen2", cfg=T.Qwen2Config(**QWEN2))
    a = prompt(600, seed=3)[0].tolist()
    b = prompt(300, seed=4)[0].tolist()
    base, _ = run_driver({"model": str(folder), "requests": [{"tokens": a}, {"tokens": b}], "kvtier": None})
    kvtier = {"set": {"cache_dir": str(tmp_path / "cache"), "l1.max_bytes": "256MB"}}
    runs, log = run_driver(
        {
            "model": str(folder),
            "kvtier": kvtier,
            "prefix_caching": False,
            "requests": [{"tokens": a}, {"tokens": b}, {"tokens": a, "after_s": 3}, {"tokens": b}],
        }
    )
    assert [r["token_ids"] for r in runs] == [o["token_ids"] for o in base] * 2
    assert runs[0]["num_cached_tokens"] == 0
    assert runs[2]["num_cached_tokens"] == 512  # two 256-token chunks, from kvtier (vLLM's prefix cache is off)
    assert "loaded 512 tokens [0, 512) from kvtier" in log
    assert "KV-cache groups FullAttentionSpec x2" in log  # vLLM's groups were checked (one full-attention group)

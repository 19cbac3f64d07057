"""More families through the real vLLM engine: a tiny random model saved to a folder, with and without kvtier.

Per family two engine starts: vLLM alone, then vLLM with the connector
(vLLM's own prefix cache off, so a repeat can only hit kvtier). The repeat
must be loaded from kvtier and give the same tokens as vLLM alone. The suite
runs Qwen2 (2 engine starts); ``TEST_VLLM_FAMILIES=qwen2,qwen3,phi3,gpt_neox,llama``
(not a ``KVTIER_`` variable: those are config keys)
runs the others too (docs/models.md reports that run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import transformers as T
from families import prompt, save_folder
from test_vllm import run_driver

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs vLLM")

# head dim 64: a size vLLM's CPU attention kernels take
TINY = {
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


CONFIGS = {
    "qwen2": lambda: T.Qwen2Config(**TINY),
    "qwen3": lambda: T.Qwen3Config(head_dim=64, **TINY),
    "llama": lambda: T.LlamaConfig(**TINY),
    "phi3": lambda: T.Phi3Config(**TINY),
    "gpt_neox": lambda: T.GPTNeoXConfig(rotary_pct=0.25, **{k: v for k, v in TINY.items() if "key_value" not in k}),
}
FAMILIES = [f for f in os.environ.get("TEST_VLLM_FAMILIES", "qwen2").split(",") if f]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_hit_through_vllm_equals_vllm_alone(family: str, tmp_path: Path) -> None:
    folder = save_folder(family, tmp_path / family, cfg=CONFIGS[family]())
    layers = CONFIGS[family]().num_hidden_layers
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
    # two 256-token chunks and the prompt's partial chunk, all but its last token, from kvtier (no vLLM prefix cache)
    assert runs[2]["num_cached_tokens"] == 599
    assert "loaded 599 tokens [0, 599) from kvtier" in log
    assert f"KV-cache groups FullAttentionSpec x{layers}" in log  # vLLM's groups were checked: one full-attention

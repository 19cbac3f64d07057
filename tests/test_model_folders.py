"""Local model folders of every family at start-up: CachedModel, ``kvtier serve`` and the vLLM connector's checks.

Folders are tiny random models saved at test time (``tests/families.py``) with
a word-level tokenizer built offline; nothing is downloaded.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from families import config, prompt, save_folder, unsupported_configs

from kvtier.adapters.hf import CachedModel
from kvtier.adapters.vllm.compat import CacheGroup
from kvtier.adapters.vllm.settings import check_kv_cache_groups, model_refusal
from kvtier.cli import main
from kvtier.config import load_config
from kvtier.errors import ConfigError, UnsupportedModelError


@pytest.mark.parametrize("family", ["qwen3", "mistral", "gemma2", "gpt_neox"])
def test_cached_model_from_any_local_folder(family: str, tmp_path: Path) -> None:
    folder = save_folder(family, tmp_path / family)
    cfg = load_config(env={}, overrides={"model": str(folder), "chunk_size": 32, "l2.path": str(tmp_path / "chunks")})
    ids = prompt(80)
    with CachedModel.from_config(cfg) as cached:
        assert cached.tokenizer is not None and cached.tokenizer("w5 w7").input_ids == [5, 7]
        cold = cached.generate(ids, max_new_tokens=6, do_sample=False)
        warm = cached.generate(ids, max_new_tokens=6, do_sample=False)
    assert warm.reused_tokens == 79 and torch.equal(cold.sequences, warm.sequences)


def test_a_refused_folder_fails_at_start_up(tmp_path: Path) -> None:
    folder = tmp_path / "mamba"
    folder.mkdir()
    cfg, _ = unsupported_configs()["mamba"]
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(UnsupportedModelError, match="state-space"):
        CachedModel.from_config(load_config(env={}, overrides={"model": str(folder), "l2.path": str(tmp_path)}))


# -- the vLLM connector's model and KV-cache-group checks -------------------------------------------------------------


def test_vllm_connector_model_refusals() -> None:
    assert model_refusal(config("llama")) is None and model_refusal(config("qwen2")) is None
    for family in ("mistral", "gemma2", "gemma3"):
        reason = model_refusal(config(family))
        assert reason is not None and "sliding-window" in reason
    for name, (cfg, word) in unsupported_configs().items():
        reason = model_refusal(cfg)
        assert reason is not None and word in reason, name


def test_vllm_kv_cache_groups_one_full_attention_group_only() -> None:
    check_kv_cache_groups([CacheGroup("FullAttentionSpec", 30, None)], 30)
    check_kv_cache_groups(None, 30)  # vLLM handed no kv_cache_config: the model check guards it
    refused = {
        "hybrid": [CacheGroup("FullAttentionSpec", 13, None), CacheGroup("SlidingWindowSpec", 13, 512)],
        "sliding": [CacheGroup("SlidingWindowSpec", 26, 4096)],
        "mamba": [CacheGroup("MambaSpec", 20, None), CacheGroup("FullAttentionSpec", 6, None)],
        "mla": [CacheGroup("MLAAttentionSpec", 30, None)],
        "missing layers": [CacheGroup("FullAttentionSpec", 29, None)],
    }
    for name, groups in refused.items():
        with pytest.raises(ConfigError, match="one full-attention KV-cache group") as err:
            check_kv_cache_groups(groups, 30)
        assert groups[0].kind in str(err.value), name


@pytest.fixture
def serve_command(capsys, tmp_path):
    pytest.importorskip("vllm", reason="kvtier serve needs vLLM installed")

    def run(folder: Path) -> tuple[int, list[str], str]:
        rc = main(["serve", "--print-command", "--model", str(folder), "--set", f"l2.path={tmp_path / 'chunks'}"])
        out, err = capsys.readouterr()
        return rc, shlex.split(out.strip()) if out.strip() else [], err

    return run


def test_serve_takes_a_local_folder_of_a_supported_family(serve_command, tmp_path: Path) -> None:
    folder = save_folder("qwen2", tmp_path / "qwen2")
    rc, argv, _ = serve_command(folder)
    assert rc == 0 and argv[argv.index("--model") + 1] == str(folder.resolve())


@pytest.mark.parametrize(("family", "word"), [("mistral", "sliding-window"), ("deepseek_v3", "latent attention")])
def test_serve_refuses_what_the_connector_cannot_cache(serve_command, tmp_path: Path, family: str, word: str) -> None:
    folder = tmp_path / family
    if family in unsupported_configs():
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(unsupported_configs()[family][0].to_dict()))
    else:
        save_folder(family, folder)
    rc, argv, err = serve_command(folder)
    assert rc == 2 and argv == [] and word in err

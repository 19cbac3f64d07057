"""Real-model tests for kvtier.models: GGUF conversion, reuse, fidelity, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from kvtier.errors import ModelError
from kvtier.models import KNOWN_MODELS, load_model, resolve_model

pytestmark = pytest.mark.model

NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kvtier-cache")


@pytest.fixture(scope="module")
def converted(cache_dir: Path) -> Path:
    start = time.perf_counter()
    path = resolve_model(NAME, cache_dir)
    print(f"\nconversion of {NAME} took {time.perf_counter() - start:.1f} s")
    return path


def test_resolve_converts_into_cache(converted: Path, cache_dir: Path) -> None:
    assert converted.parent == cache_dir / "models"
    assert converted.name.startswith(f"{NAME}-")
    assert (converted / "model.safetensors").stat().st_size > 100_000_000
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    assert (converted / "tokenizer.json").is_file()
    assert (converted / "tokenizer_config.json").is_file()
    leftovers = [p.name for p in converted.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_second_resolve_reuses_folder(converted: Path, cache_dir: Path) -> None:
    weights = converted / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = resolve_model(NAME, cache_dir)
    assert again == converted
    assert weights.stat().st_mtime_ns == mtime
    assert time.perf_counter() - start < 1.0


def test_existing_folder_is_returned_as_is(converted: Path, cache_dir: Path) -> None:
    assert resolve_model(str(converted), cache_dir) == converted.resolve()


def test_converted_logits_match_gguf(converted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvtier.models import _locate_gguf

    gguf = _locate_gguf(KNOWN_MODELS[NAME])
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    ).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model, tokenizer = load_model(converted)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32

    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tokenizer(prompt, return_tensors="pt").input_ids)
    with torch.no_grad():
        got = model(ids).logits[0, -1]
        want = reference(ids).logits[0, -1]
    assert (got - want).abs().max().item() <= 1e-5


def test_unknown_name_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=NAME):
        resolve_model("no-such-model", tmp_path)


def test_directory_without_config_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_model(str(tmp_path), tmp_path)
    with pytest.raises(ModelError):
        load_model(tmp_path)

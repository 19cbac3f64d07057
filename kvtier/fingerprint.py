"""Model fingerprints: a digest of a model's weights and architecture config, never its path.

Two processes that load the same weights get the same fingerprint, so they
share chunks; a fine-tune, another quantization or a changed RoPE setting gets
another one, so their KV never mixes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import blake3
import torch

# Config entries that describe where or how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "quantization_config",
        "torch_dtype",
        "dtype",
        "architectures",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_attn_implementation_autoset",
        "_attn_implementation",
    }
)


def config_digest_input(config: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a config: sorted JSON without volatile keys."""
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str).encode()


def model_fingerprint(config: Mapping[str, Any], tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hex digest over the config and every named tensor (name, dtype, shape, bytes), by sorted name.

    Tied weights must be passed once (``named_parameters()`` already does
    that). Reads every byte of the weights: about a second per GB here.
    """
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update(b"kvtier-model-v1\0")
    h.update(config_digest_input(config))
    for name, tensor in sorted(tensors, key=lambda nt: nt[0]):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b"")
    return h.hexdigest()


def folder_fingerprint(model_dir: Path | str, cache_dir: Path | str | None = None) -> str:
    """The fingerprint of a Hugging Face model folder (config.json + *.safetensors), without loading the model.

    Equals :func:`model_fingerprint` of the same model loaded with
    transformers (``config.to_dict()``, ``named_parameters()``) when the
    folder holds each parameter once (tied weights saved once), which is how
    kvtier converts models and how ``save_pretrained`` writes them. With
    ``cache_dir`` the result is remembered under ``cache_dir/fingerprints``,
    keyed by the files' paths, sizes and mtimes, so a restart does not re-read
    the weights. Raises FileNotFoundError if the folder has no safetensors.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    root = Path(model_dir).resolve()
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {root}")
    stamp = blake3.blake3()
    for f in [root / "config.json", *files]:
        st = f.stat()
        stamp.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    memo = Path(cache_dir) / "fingerprints" / f"{stamp.hexdigest()[:32]}.txt" if cache_dir is not None else None
    if memo is not None and memo.is_file():
        cached = memo.read_text().strip()
        if len(cached) == 64:
            return cached
    config = AutoConfig.from_pretrained(root, local_files_only=True).to_dict()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            with safe_open(str(f), "pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)

    digest = model_fingerprint(config, tensors())
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest + "\n")
        os.replace(tmp, memo)
    return digest

"""Model fingerprints: a digest of a model's weights and architecture config, never its path.

Two processes that load the same weights get the same fingerprint, so they
share chunks; a fine-tune, another quantization or a changed RoPE setting gets
another one, so their KV never mixes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
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

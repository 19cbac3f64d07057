"""Tiny random-weight models of the families kvtier covers, built from configs at test time (no download).

Each is 4 layers, hidden size 64, a 256-token vocabulary; weights come from a
fixed seed. ``initializer_range`` is large (0.2) so that the logits of a random
model are peaked enough for greedy decoding not to hinge on rounding noise.
Sliding windows are 32 tokens, so a 150-token prompt is well past them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

WINDOW = 32

_COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 1024,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "initializer_range": 0.2,
}


def _configs() -> dict[str, Callable[[], object]]:
    import transformers as T

    return {
        "llama": lambda: T.LlamaConfig(num_key_value_heads=2, **_COMMON),
        "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, **_COMMON),
        "qwen3": lambda: T.Qwen3Config(num_key_value_heads=2, head_dim=16, **_COMMON),
        "mistral": lambda: T.MistralConfig(num_key_value_heads=2, sliding_window=WINDOW, **_COMMON),
        "gemma2": lambda: T.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, **_COMMON),
        "gemma3": lambda: T.Gemma3TextConfig(
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            **_COMMON,
        ),
        "phi3": lambda: T.Phi3Config(num_key_value_heads=2, **_COMMON),
        "gpt_neox": lambda: T.GPTNeoXConfig(rotary_pct=0.25, **_COMMON),  # partial rotary: 1/4 of each head
    }


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox")
SLIDING = {"mistral": "all layers sliding", "gemma2": "sliding/global alternating", "gemma3": "3 sliding, 1 global"}


def config(family: str):
    return _configs()[family]()


def build(family: str, dtype: torch.dtype = torch.float32, cfg=None):
    """The tiny model of ``family`` (fixed seed), in eval mode, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg if cfg is not None else config(family))
    return model.to(dtype).eval()


def save_folder(family: str, folder: Path, cfg=None) -> Path:
    """A tiny ``family`` model, its config and a 256-word tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    build(family, cfg=cfg).save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return folder


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    """[1, n] random token ids (3..255: no bos/eos/pad)."""
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def unsupported_configs() -> dict[str, tuple[object, str]]:
    """Configs kvtier must refuse, each with a word its refusal must name."""
    import transformers as T

    return {
        "mamba": (T.MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2), "state-space"),
        "jamba": (T.JambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2), "state-space"),
        "qwen3_next": (T.Qwen3NextConfig(), "state-space"),
        "deepseek_v3": (T.DeepseekV3Config(), "latent attention"),
        "deepseek_v2": (T.DeepseekV2Config(), "latent attention"),
        "llama4": (T.Llama4TextConfig(), "chunked"),
        "gemma3n": (T.Gemma3nTextConfig(), "shared"),
        "t5": (T.T5Config(), "encoder-decoder"),
    }

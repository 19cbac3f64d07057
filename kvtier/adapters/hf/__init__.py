"""Hugging Face transformers adapter.

Two ways in, one mechanism underneath:

* :class:`CachedModel` wraps a model and an engine: ``generate(prompt)`` or
  ``generate([prompt, ...])`` reuses each prompt's longest stored prefix and
  stores what was new (:mod:`kvtier.adapters.hf.cached`);
* :class:`KvtierCache` is a transformers ``Cache`` (a ``DynamicCache``) for
  ``model.generate(**cache.load(prompts), past_key_values=cache)``
  (:mod:`kvtier.adapters.hf.cache`).
"""

from kvtier.adapters.hf.cache import KvtierCache, RowReport, hf_layout, hf_namespace
from kvtier.adapters.hf.cached import CachedModel, Generation

__all__ = ["CachedModel", "Generation", "KvtierCache", "RowReport", "hf_layout", "hf_namespace"]

"""Run prompts through a real vLLM engine (optionally with the kvtier connector); print one JSON line.

Used by tests/test_vllm.py in a subprocess (vLLM spawns its own processes and
must run under ``if __name__ == "__main__"``). Input (argv[1], JSON): ``{"model": DIR,
"kvtier": null | {"set": {...}}, "requests": [{"tokens": [...], "cache_salt": null, "max_tokens": 16}]}``.
Requests run one at a time, in order. Output: ``{"outputs": [{"text", "token_ids", "num_cached_tokens"}]}``.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec.get("kvtier") is not None:
        # The connector configures no logging; like any LLM(...) embedder, show its logs via vLLM's config file.
        from kvtier.config import load_config
        from kvtier.serve import vllm_logging_env

        kv = spec["kvtier"]
        os.environ.update(vllm_logging_env(load_config(kv.get("config"), overrides=kv.get("set") or {}), os.environ))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {}
    if spec.get("kvtier") is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KvtierConnector",
            "kv_connector_module_path": "kvtier.adapters.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": spec["kvtier"],
        }
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=spec.get("max_model_len", 2048),
        enable_prefix_caching=spec.get("prefix_caching", True),
        seed=0,
        **kwargs,
    )
    outputs = []
    for req in spec["requests"]:
        prompt = TokensPrompt(prompt_token_ids=req["tokens"])
        if req.get("cache_salt") is not None:
            prompt["cache_salt"] = req["cache_salt"]
        params = SamplingParams(temperature=0.0, max_tokens=req.get("max_tokens", 16))
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        outputs.append(
            {
                "text": out.outputs[0].text,
                "token_ids": list(out.outputs[0].token_ids),
                "num_cached_tokens": out.num_cached_tokens,
            }
        )
    del llm
    print("VLLM_DRIVER_RESULT " + json.dumps({"outputs": outputs}), flush=True)


if __name__ == "__main__":
    main()

"""Run prompts through a real vLLM engine (optionally with the kvtier connector); print one JSON line.

Used by tests/test_vllm.py in a subprocess (vLLM spawns its own processes and
must run under ``if __name__ == "__main__"``). Input (argv[1], JSON): ``{"model": DIR,
"kvtier": null | {"set": {...}}, "requests": [{"tokens": [...], "cache_salt": null, "max_tokens": 16}]}``.
Requests run one at a time, in order (``"after_s"``: wait that long before one).
Output: ``{"outputs": [{"text", "token_ids", "num_cached_tokens"}]}``.

``"overlap": {"decode": {request}, "hit": {request}, "after": N}`` instead steps the engine by hand (in-process
engine core): the decode request starts, the hit request is added once it has N tokens, and every step records
the decode's token count, whether the hit request was waiting for its kvtier load (``WAITING_FOR_REMOTE_KVS``)
at the end of the step, and the time. Output ``"overlap": {"steps": [...], "outputs": [decode, hit]}``.
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
    if "overlap" in spec:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler in this process, to read request states
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
    if "overlap" in spec:
        result = {"overlap": overlap(llm, spec["overlap"])}
        del llm
        print("VLLM_DRIVER_RESULT " + json.dumps(result), flush=True)
        return
    outputs = []
    for req in spec.get("requests", []):
        if req.get("after_s"):  # give the connector's stores of the earlier requests time to land in the tiers
            import time

            time.sleep(float(req["after_s"]))
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


def _prompt(req: dict):
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=req["tokens"])
    if req.get("cache_salt") is not None:
        prompt["cache_salt"] = req["cache_salt"]
    return prompt


def overlap(llm, spec: dict) -> dict:
    import time

    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    decode, hit = spec["decode"], spec["hit"]
    engine.add_request("decode", _prompt(decode), SamplingParams(temperature=0.0, max_tokens=decode["max_tokens"]))
    steps, tokens, done = [], {"decode": [], "hit": []}, {}
    added = False
    while len(done) < 2:
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)
            if out.finished:
                done[out.request_id] = out
        states = {r.request_id: r.status.name for r in scheduler.requests.values()}
        waiting = added and any(rid.startswith("hit") and st == "WAITING_FOR_REMOTE_KVS" for rid, st in states.items())
        steps.append(
            {
                "t": time.monotonic(),
                "decode_tokens": len(tokens["decode"]),
                "hit_waiting": waiting,
                "hit_tokens": len(tokens["hit"]),
            }
        )
        if not added and len(tokens["decode"]) >= spec["after"]:
            params = SamplingParams(temperature=0.0, max_tokens=hit.get("max_tokens", 16))
            engine.add_request("hit", _prompt(hit), params)
            added = True
    outputs = [
        {"token_ids": list(done[r].outputs[0].token_ids), "num_cached_tokens": done[r].num_cached_tokens}
        for r in ("decode", "hit")
    ]
    return {"steps": steps, "outputs": outputs}


if __name__ == "__main__":
    main()

"""A small real OpenAI-completions server for router tests: kvtier's HF adapter on a tiny random Llama.

``python -m tests.openai_server --port P --events tcp://127.0.0.1:E --cache-dir D`` serves
``/health``, ``/tokenize`` (vLLM's shape: ``{"tokens": [...], "count": n}``) and
``/v1/completions`` (``stream`` too, as server-sent events) with greedy decoding through
:class:`kvtier.adapters.hf.CachedModel`, so every prompt goes through a real CacheEngine whose
tiers publish real KV events. The model is a 2-layer Llama with random weights (seed 0) and the
SmolLM2 tokenizer: the router under test sees a real server, prefill scales with the prompt and a
cache hit skips it. One generate at a time (a lock), like a one-slot engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kvtier.adapters.hf import CachedModel, hf_namespace
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.models import resolve_model

MODEL_NAME = "tiny"


def build(cache_dir: str, events: str | None, chunk_size: int) -> CachedModel:
    folder = resolve_model("smollm2-135m", load_config(env={}).cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    overrides = {"cache_dir": cache_dir, "chunk_size": str(chunk_size), "l2.path": f"{cache_dir}/chunks"}
    if events is not None:
        overrides |= {"events.enabled": "true", "events.endpoint": events}
    config = load_config(env={}, overrides=overrides)
    engine = CacheEngine.from_config(config, hf_namespace(model)).start()
    return CachedModel(model, tokenizer, engine)


def create_app(cached: CachedModel) -> FastAPI:
    app = FastAPI()
    lock = threading.Lock()
    tok = cached.tokenizer
    assert tok is not None

    def run(prompt: str, max_tokens: int) -> tuple[list[int], Any]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with lock, torch.inference_mode():
            gen = cached.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        return gen.new_tokens, gen

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await request.json()
        ids = tok(body["prompt"]).input_ids
        return {"tokens": ids, "count": len(ids)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt, max_tokens = body["prompt"], int(body.get("max_tokens", 8))
        started = time.time()
        if not body.get("stream"):
            new, gen = await asyncio.to_thread(run, prompt, max_tokens)
            return JSONResponse(
                {
                    "id": "cmpl-test",
                    "object": "text_completion",
                    "created": int(started),
                    "model": MODEL_NAME,
                    "choices": [{"index": 0, "text": tok.decode(new), "finish_reason": "length"}],
                    "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(new)},
                    "kvtier": {"reused_tokens": gen.reused_tokens, "tier_tokens": gen.tier_tokens},
                }
            )

        async def events():
            new, gen = await asyncio.to_thread(run, prompt, max_tokens)
            for t in new:
                chunk = {"id": "cmpl-test", "object": "text_completion", "model": MODEL_NAME,
                         "choices": [{"index": 0, "text": tok.decode([t]), "finish_reason": None}],
                         "kvtier": {"reused_tokens": gen.reused_tokens}}  # fmt: skip
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--events")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--chunk-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    cached = build(args.cache_dir, args.events, args.chunk_size)
    uvicorn.run(create_app(cached), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

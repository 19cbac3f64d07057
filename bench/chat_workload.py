"""The chat workload and server plumbing the vLLM benchmarks share (multi_round_qa.py, serving.py).

* text: :func:`build_workload` (per-user system prompts over real English from
  /usr/share/common-licenses, seeded questions), :func:`chat_tokens`;
* servers: :class:`Server` (a command in its own process group, ready when its
  health URL answers, stopped group and all), :func:`kvtier_command`,
  :func:`model_dir`, :func:`log_errors`, :func:`tail`;
* metrics: :func:`scrape` (Prometheus text), :func:`hit_tokens` per tier,
  :class:`MetricsReader` (kvtier's ``--metrics-port``), :func:`vllm_counters`;
* client: :func:`chat` (one streamed ``/v1/chat/completions``, TTFT and every
  content chunk's arrival time into a :class:`Result`), :func:`warm_up`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import harness as h
import httpx
from harness import LICENSES, MODEL, ROOT

SHARED_DOC = "Apache-2.0"  # the shared system prompt's text; the users' documents come from the other files
CPU_BLOCK_SIZE = 128

INSTRUCTION = (
    "You are a careful assistant who answers questions about software licenses. "
    "Answer briefly, in one or two sentences, using only the documents below. "
    "The first document is a reference license every conversation shares; the second is this user's document.\n\n"
    "Reference document:\n"
)

QUESTIONS = [
    'What does the document say about "{w}"?',
    'In one sentence, explain the role of "{w}" in this text.',
    'Quote the first sentence of the document that mentions "{w}".',
    'Does the document put any condition on "{w}"? Answer yes or no, then explain.',
    'Who is responsible for "{w}" according to the document?',
    'Summarize the passage about "{w}" in plain words.',
    'Is "{w}" defined anywhere in the document? If so, how?',
    'How do "{w}" and "{v}" relate in this document?',
]


# -- text ----------------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    system_prompts: list[str]  # per user: shared system prompt + the user's document
    questions: list[list[str]]  # [user][round]
    shared_prompt: str
    sources: list[str]
    warmup_text: str  # a long-ish prompt for the warm-up request (no prefix in common with the workload's)
    corpus: list[int] = field(default_factory=list)  # token ids of the users' text (every file but SHARED_DOC)


def build_workload(
    tokenizer,
    users: int,
    rounds: int,
    system_tokens: int,
    context_tokens: int,
    seed: int,
    instruction: str = INSTRUCTION,
) -> Workload:
    """``users`` system prompts (``instruction``, then ``system_tokens`` - its length of the shared
    Apache-2.0 text, then the user's own window of ``context_tokens``) and ``rounds`` seeded questions each."""
    files = h.license_files()
    shared_file = next((p for p in files if p.name == SHARED_DOC), None)
    if shared_file is None or len(files) < 2:
        raise SystemExit(f"need the license texts under {LICENSES} (Debian's base-files)")
    head = tokenizer(instruction, add_special_tokens=False)["input_ids"]
    ref = tokenizer(shared_file.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
    shared = instruction + tokenizer.decode(ref[: max(0, system_tokens - len(head))])
    corpus: list[int] = []
    for p in files:
        if p != shared_file:
            corpus += tokenizer(p.read_text(errors="replace") + "\n\n", add_special_tokens=False)["input_ids"]
    if len(corpus) <= context_tokens:
        raise SystemExit(f"--context-tokens {context_tokens} is more than the {len(corpus)} tokens of text available")
    span = len(corpus) - context_tokens
    stride = max(1, span // max(1, users))  # distinct start offsets; windows overlap only when users * context > text
    prompts, questions = [], []
    for u in range(users):
        start = (u * stride + (u * 7919 if u * stride > span else 0)) % (span + 1)
        doc = tokenizer.decode(corpus[start : start + context_tokens])
        prompts.append(f"{shared}\n\nUser {u}'s document:\n{doc}")
        words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{6,}", doc)}) or ["license"]
        rng = random.Random(f"{seed}:{u}")
        qs = []
        for _r in range(rounds):
            tpl = rng.choice(QUESTIONS)
            qs.append(tpl.format(w=rng.choice(words), v=rng.choice(words)))
        questions.append(qs)
    warmup = "Summarize this text in one sentence:\n" + tokenizer.decode(corpus[-min(600, len(corpus)) :])
    return Workload(prompts, questions, shared, [str(p) for p in files], warmup, corpus)


# -- server --------------------------------------------------------------------------------------------------------


def kvtier_command(*args: str) -> list[str]:
    """``kvtier ARGS`` as this checkout runs it: this interpreter, ``-m kvtier.cli`` (run it with
    :func:`checkout_env`, so that vLLM's processes import this tree's kvtier, not an installed copy)."""
    return [sys.executable, "-m", "kvtier.cli", *args]


def checkout_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the checkout first on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def model_dir() -> Path:
    """The model folder ``kvtier serve`` hands vLLM (converted once into kvtier's cache): for the tokenizer."""
    out = subprocess.run(
        kvtier_command("serve", "--no-kvtier", "--print-command"),
        capture_output=True,
        text=True,
        check=True,
        env=checkout_env(),
    ).stdout
    argv = shlex.split(out.strip().splitlines()[-1])
    return Path(argv[argv.index("--model") + 1])


class Server:
    """A server command in its own process group, logging to ``log_path`` (overwritten), ready once
    ``http://127.0.0.1:port{health}`` answers 200; stopped (whole group) on exit.

    ``env`` replaces the environment (default: :func:`checkout_env`)."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        port: int,
        startup_timeout: float,
        *,
        env: Mapping[str, str] | None = None,
        health: str = "/health",
    ) -> None:
        self.argv, self.log_path, self.port, self.startup_timeout = argv, log_path, port, startup_timeout
        self.env = dict(env) if env is not None else checkout_env()
        self.health = health
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self._log.write(("$ " + shlex.join(self.argv) + "\n").encode())
        self._log.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=self.env,
        )
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self, t0: float) -> None:
        last_note = 0.0
        with httpx.Client(timeout=5) as client:
            while True:
                elapsed = time.monotonic() - t0
                if self.proc.poll() is not None:
                    print(tail(self.log_path, 15), flush=True)
                    raise RuntimeError(
                        f"server exited with code {self.proc.returncode} during start-up ({self.log_path}): "
                        + log_errors(self.log_path)
                    )
                try:
                    if client.get(self.base + self.health).status_code == 200:
                        print(f"  server ready after {elapsed:.0f} s", flush=True)
                        return
                except httpx.HTTPError:
                    pass
                if elapsed > self.startup_timeout:
                    print(tail(self.log_path, 15), flush=True)
                    raise RuntimeError(f"server not ready after {self.startup_timeout:.0f} s ({self.log_path})")
                if elapsed - last_note >= 10:
                    last_note = elapsed
                    line = tail(self.log_path, 1).strip()
                    print(f"  starting ({elapsed:.0f} s): {line[:150]}", flush=True)
                time.sleep(1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            # The API server first (it shuts its engine processes down in order), then the whole group.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            # children left in the group after the leader exited (vLLM's engine core process)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


def log_errors(path: Path, n: int = 3) -> str:
    """The last ``n`` lines of a server log that name an error (the root cause, usually), else its last lines."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    hits: list[str] = []
    for ln in lines:
        if " WARNING " in ln:  # e.g. vLLM's ulimit warning quotes an OSError it did not have
            continue
        m = re.search(r"\b\w*(Error|Exception)\b:.*", ln)
        if m and m.group(0) not in hits:
            hits.append(m.group(0))
    return " | ".join(hits[-n:]) if hits else " | ".join(ln.strip() for ln in lines[-n:])


def tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


VLLM_METRICS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total",
)
HIT_TOKENS = "kvtier_hit_tokens_total"


def scrape(client: httpx.Client, url: str) -> dict[str, float]:
    """Every sample of the Prometheus text at ``url``, summed over its labels except ``tier``
    (kept as ``name{tier}``). Raises httpx.HTTPError if the endpoint does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = client.get(url, timeout=10)
    resp.raise_for_status()
    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            tier = sample.labels.get("tier")
            out[sample.name if tier is None else f"{sample.name}{{{tier}}}"] += sample.value
    return dict(out)


def total(metrics: dict[str, float], name: str) -> float:
    """A metric summed over every tier."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def hit_tokens(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """kvtier's hit tokens per tier between two scrapes (tiers with none left out)."""
    out = {}
    for key, value in after.items():
        if key.startswith(HIT_TOKENS + "{") and (n := round(value - before.get(key, 0.0))) > 0:
            out[key[len(HIT_TOKENS) + 1 : -1]] = n
    return out


class MetricsReader:
    """The kvtier connector's metrics endpoint (``kvtier serve --metrics-port``), read through :func:`scrape`."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.client = httpx.Client()
        deadline = time.monotonic() + timeout
        while True:  # the worker serves it once its engine is up: by the time vLLM is healthy, or soon after
            try:
                self.read()
                return
            except httpx.HTTPError as exc:
                if time.monotonic() > deadline:
                    self.client.close()
                    raise RuntimeError(f"kvtier metrics not served at {self.url}: {exc}") from exc
                time.sleep(0.5)

    def read(self) -> dict[str, float]:
        return scrape(self.client, self.url)

    def close(self) -> None:
        self.client.close()


# -- client --------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    user: int
    round: int
    request_id: str
    ttft_s: float | None = None
    first_chunk_s: float | None = None
    total_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    answer: str = ""
    error: str | None = None
    kvtier_hit_tokens: int | None = 0  # None: not attributable to one request (concurrent requests)
    kvtier_tiers: list[str] = field(default_factory=list)
    sent_at: float | None = None  # time.perf_counter() when the request was sent
    token_times: list[float] = field(default_factory=list)  # time.perf_counter() of every chunk with content
    stopped: bool = False  # the client closed the stream early (``chat(stop=...)``)
    served_by: str | None = None  # the ``x-kvtier-instance`` header of a kvtier router's response


def chat(
    client: httpx.Client,
    base: str,
    messages: list[dict],
    max_tokens: int,
    request_id: str,
    res: Result,
    *,
    extra: Mapping[str, object] | None = None,
    stop: Callable[[Result], bool] | None = None,
) -> None:
    """One streamed chat completion (temperature 0) into ``res``; ``extra`` adds body fields (e.g. vLLM's
    ``ignore_eos``). ``stop(res)`` is asked after every content chunk: True closes the stream, which
    aborts the request on the server. Raises on an HTTP error status."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    parts: list[str] = []
    t0 = res.sent_at = time.perf_counter()
    with client.stream("POST", base + "/v1/chat/completions", json=body, headers={"X-Request-Id": request_id}) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        res.served_by = resp.headers.get("x-kvtier-instance")
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter() - t0
            chunk = json.loads(data)
            if res.first_chunk_s is None:
                res.first_chunk_s = now
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if res.ttft_s is None:
                        res.ttft_s = now
                    parts.append(text)
                    res.token_times.append(t0 + now)
            usage = chunk.get("usage")
            if usage:
                res.prompt_tokens = usage.get("prompt_tokens")
                res.completion_tokens = usage.get("completion_tokens")
                res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if stop is not None and res.token_times and stop(res):
                res.stopped = True
                break
    res.total_s = time.perf_counter() - t0
    if res.ttft_s is None:  # no content at all (e.g. an immediate stop): the first chunk is the best we have
        res.ttft_s = res.first_chunk_s
    res.answer = "".join(parts)


def warm_up(base: str, text: str, max_tokens: int) -> None:
    """Two unrelated requests (a short one, then ~600 tokens; their prefixes differ from every workload prompt's)
    so that the server's first-request and first-long-prefill costs stay out of the measurement."""
    with httpx.Client(timeout=300) as client:
        for i, content in enumerate(("Say hello.", text)):
            res = Result(-1, -1, f"warmup{os.getpid()}-{i}")
            chat(client, base, [{"role": "user", "content": content}], max_tokens, res.request_id, res)


def vllm_counters(base: str) -> dict[str, float]:
    """vLLM's prefix-cache counters from its ``/metrics`` ({} if it does not answer)."""
    with httpx.Client() as client:
        try:
            metrics = scrape(client, base + "/metrics")
        except httpx.HTTPError:
            return {}
    return {name: metrics[name] for name in VLLM_METRICS if name in metrics}


def kv_bytes_per_token(model_folder: Path, dtype_bytes: int = 4) -> int:
    """Bytes of K and V for one token over every layer (fp32 by default: what ``kvtier serve`` runs)."""
    cfg = json.loads((model_folder / "config.json").read_text())
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * heads * head_dim * dtype_bytes


def chat_tokens(tokenizer, messages: list[dict], generation_prompt: bool) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def csv(text: str, allowed: Sequence[str]) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return items

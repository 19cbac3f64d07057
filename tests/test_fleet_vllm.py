"""Two real ``kvtier serve`` instances (vLLM + the connector, KV events and admin API on) behind ``kvtier router``.

A user's second turn goes to the instance that holds its prefix (its admin API confirms the hit);
a killed instance is dropped, and its users' next requests, sent at once, succeed on the other.
Two engine start-ups (in parallel): slow, marked ``vllm``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kvtier.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not healthy\n" + log.read_text()[-4000:])


def _kill(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("fleet")
    insts = []
    for i in range(2):
        port, admin, events = _port(), _port(), f"tcp://127.0.0.1:{_port()}"
        args = ["serve", "--port", str(port), "--max-model-len", "2048"]
        for kv in (
            "node.enabled=false",
            f"l2.path={tmp / f'disk{i}'}",
            "events.enabled=true",
            f"events.endpoint={events}",
            "admin.enabled=true",
            f"admin.port={admin}",
        ):
            args += ["--set", kv]
        log = tmp / f"serve{i}.log"
        insts.append(
            {
                "url": f"http://127.0.0.1:{port}",
                "admin": f"http://127.0.0.1:{admin}",
                "events": events,
                "log": log,
                "proc": _spawn(args, log),
            }
        )
    router = None
    try:
        for inst in insts:
            _healthy(inst["url"], inst["proc"], inst["log"], 400)
        rport = _port()
        args = ["router", "--port", str(rport), "--set", "router.health_interval_s=0.5"]
        for inst in insts:
            args += ["--instance", f"{inst['url']},events={inst['events']},admin={inst['admin']}"]
        rlog = tmp / "router.log"
        router = _spawn(args, rlog)
        _healthy(f"http://127.0.0.1:{rport}", router, rlog, 60)
        yield {"router": f"http://127.0.0.1:{rport}", "instances": insts}
    finally:
        for p in [router, *(i["proc"] for i in insts)]:
            if p is not None:
                _kill(p, signal.SIGTERM)


def _document(user: int) -> str:
    lines = [f"Line {n} of user {user}'s notes: item {user * 1000 + n} is filed under shelf {(n * 7 + user) % 13}."
             for n in range(40)]  # fmt: skip
    return "\n".join(lines)


def test_two_serve_instances_behind_the_router(fleet: dict) -> None:
    http = httpx.Client(base_url=fleet["router"], timeout=180)
    urls = [i["url"] for i in fleet["instances"]]
    admin = {i["url"]: i["admin"] for i in fleet["instances"]}
    first, prompts = {}, {}
    users = range(3)
    for u in users:
        prompt = _document(u) + f"\nQuestion: what is item {u * 1000 + 3} filed under?\nAnswer:"
        r = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": prompt, "max_tokens": 4,
                                               "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        first[u] = r.headers["x-kvtier-instance"]
        prompts[u] = prompt + r.json()["choices"][0]["text"] + "\nQuestion: and item 5?\nAnswer:"
    assert set(first.values()) == set(urls)
    # the stores of the first turns reach the tiers and the router's indexes
    for u in users:
        tokens = httpx.post(first[u] + "/tokenize", json={"model": "smollm2-135m", "prompt": prompts[u]}).json()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            held = httpx.post(admin[first[u]] + "/lookup", json={"token_ids": tokens["tokens"]}).json()
            if held["matched_tokens"] >= 512:
                break
            time.sleep(0.5)
        assert held["matched_tokens"] >= 512, held
    time.sleep(1.0)
    for u in users:
        r = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": prompts[u], "max_tokens": 4,
                                               "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.headers["x-kvtier-instance"] == first[u], u

    dead = fleet["instances"][1]
    victims = [u for u in users if first[u] == dead["url"]]
    os.killpg(dead["proc"].pid, signal.SIGKILL)
    dead["proc"].wait(timeout=30)
    for u in victims:
        r = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": prompts[u] + " More?",
                                               "max_tokens": 2, "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.headers["x-kvtier-instance"] == urls[0]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and http.get("/router/stats").json()["instances"][1]["healthy"]:
        time.sleep(0.1)
    assert http.get("/router/stats").json()["instances"][1]["healthy"] is False

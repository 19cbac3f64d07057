"""``kvtier router`` with real processes: two OpenAI servers (kvtier's HF adapter, tests/openai_server.py)
publishing KV events, and the router as its own process.

A user's second turn goes to the instance that holds its prefix (and that instance serves it from
cache); streaming passes through; a killed instance is dropped within seconds, and requests sent
right after the kill, before any health check noticed, succeed on the other instance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvtier.config import RouterInstance
from kvtier.router.backends import Backend
from kvtier.router.scoring import Candidate, rank
from tests.redis_servers import free_port

ROOT = Path(__file__).resolve().parents[1]


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _wait_health(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up: {log.read_text()[-2000:]}")


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        specs = []
        for i in range(2):
            port, events = free_port(), f"tcp://127.0.0.1:{free_port()}"
            log = tmp / f"instance{i}.log"
            proc = _spawn(
                [
                    "-m",
                    "tests.openai_server",
                    "--port",
                    str(port),
                    "--events",
                    events,
                    "--cache-dir",
                    str(tmp / f"c{i}"),
                ],
                log,
            )
            self.procs.append(proc)
            self.urls.append(f"http://127.0.0.1:{port}")
            specs.append(f"{self.urls[-1]},events={events}")
            _wait_health(self.urls[-1], proc, log)
        rport = free_port()
        self.router_url = f"http://127.0.0.1:{rport}"
        args = ["-m", "kvtier.cli", "router", "--port", str(rport)]
        for spec in specs:
            args += ["--instance", spec]
        args += ["--set", "router.health_interval_s=0.3", "--set", "router.health_timeout_s=0.5"]
        log = tmp / "router.log"
        self.router = _spawn(args, log)
        _wait_health(self.router_url, self.router, log)
        self.http = httpx.Client(base_url=self.router_url, timeout=60.0)

    def complete(self, prompt: str, **extra: object) -> httpx.Response:
        return self.http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4, **extra})

    def stats(self) -> dict:
        return self.http.get("/router/stats").json()

    def wait_events(self) -> None:
        """Until both indexes stopped changing (the stores of the last requests were published)."""
        last = None
        for _ in range(50):
            now = [i["index"] and i["index"]["next_seq"] for i in self.stats()["instances"] if i["healthy"]]
            if now == last:
                return
            last = now
            time.sleep(0.2)

    def close(self) -> None:
        self.http.close()
        for p in [self.router, *self.procs]:
            if p.poll() is None:
                p.terminate()
        for p in [self.router, *self.procs]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    f.close()


def _context(user: int) -> str:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    return f"User {user} document: " + " ".join(
        f"{words[(user * 7 + i * 3) % 10]}{(user * 31 + i) % 97}" for i in range(220)
    )


@pytest.mark.model
def test_second_turns_follow_the_prefix_and_a_dead_instance_is_routed_around(fleet: Fleet) -> None:
    users = range(5)
    first: dict[int, str] = {}
    prompts: dict[int, str] = {}
    for u in users:
        prompt = _context(u) + f"\nQuestion 1 of user {u}?"
        r = fleet.complete(prompt)
        assert r.status_code == 200, r.text
        first[u] = r.headers["x-kvtier-instance"]
        prompts[u] = prompt + r.json()["choices"][0]["text"]
    assert set(first.values()) == set(fleet.urls)  # first turns (nothing cached anywhere) spread over both
    fleet.wait_events()
    for u in users:
        prompts[u] += f"\nQuestion 2 of user {u}?"
        r = fleet.complete(prompts[u])
        assert r.status_code == 200, r.text
        assert r.headers["x-kvtier-instance"] == first[u], u  # the instance holding the user's prefix
        assert r.json()["kvtier"]["reused_tokens"] >= 256  # and it served the prefix from its cache
        prompts[u] += r.json()["choices"][0]["text"]

    # streaming passes through, event by event, to [DONE]
    with fleet.http.stream(
        "POST", "/v1/completions", json={"model": "tiny", "prompt": prompts[0], "max_tokens": 3, "stream": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert len(lines) == 4 and lines[-1] == "data: [DONE]"

    # kill one instance; the next requests of its users are sent before any health check could notice
    dead = fleet.urls[1]
    victims = [u for u in users if first[u] == dead]
    assert victims
    fleet.procs[1].send_signal(signal.SIGKILL)
    fleet.procs[1].wait()
    for u in victims:
        r = fleet.complete(prompts[u] + "\nQuestion 3?")
        assert r.status_code == 200, r.text
        assert r.headers["x-kvtier-instance"] == fleet.urls[0]
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and fleet.stats()["instances"][1]["healthy"]:
        time.sleep(0.1)
    stats = fleet.stats()
    assert stats["instances"][1]["healthy"] is False
    assert stats["instances"][0]["healthy"] is True


def test_rank_trades_hit_against_load() -> None:
    kw = {"beta": 1.0, "shared_credit": 0.5, "decode_tokens_per_request": 128}
    warm = Candidate("a", local_tokens=1500, shared_tokens=0, in_flight=3, queued_prefill_tokens=1000, decoding=2)
    idle = Candidate("b", local_tokens=0, shared_tokens=0, in_flight=0, queued_prefill_tokens=0)
    assert [c.name for c, _ in rank([warm, idle], **kw)] == ["a", "b"]  # 1500 - 1256 > 0
    busy = Candidate("a", local_tokens=1500, shared_tokens=0, in_flight=4, queued_prefill_tokens=1600, decoding=3)
    assert [c.name for c, _ in rank([busy, idle], **kw)] == ["b", "a"]  # 1500 - 1984 < 0: waiting costs more
    # requests still waiting for their first token count by their queued tokens alone, not again as decodes
    queued = Candidate("a", local_tokens=1500, shared_tokens=0, in_flight=4, queued_prefill_tokens=1400)
    assert rank([queued, idle], **kw)[0][0].name == "a"
    shared = Candidate("b", local_tokens=0, shared_tokens=1000, in_flight=0, queued_prefill_tokens=0)
    cold = Candidate("c", local_tokens=0, shared_tokens=0, in_flight=0, queued_prefill_tokens=0)
    assert rank([cold, shared], **kw)[0][0].name == "b"  # a Redis hit is worth half a local one
    assert [c.name for c, _ in rank([cold, idle], **kw)] == ["c", "b"]  # a tie keeps the given (rotated) order
    assert rank([], **kw) == []


def test_backend_load_learns_the_prefill_rate_and_discounts_work_in_progress() -> None:
    now = [100.0]
    b = Backend(RouterInstance(url="http://x"), rate_decay=0.5, clock=lambda: now[0])
    first = b.dispatched(1000)
    second = b.dispatched(500)
    assert (b.in_flight, b.decoding, b.queued_prefill_tokens) == (2, 0, 1500)  # no rate known: the whole queue
    now[0] += 2.0
    b.first_token(first, learn=True)  # 1000 tokens in 2 s: 500 tokens/s
    assert b.prefill_tokens_per_s == pytest.approx(500.0)
    assert (b.in_flight, b.decoding, b.queued_prefill_tokens) == (2, 1, 500)
    now[0] += 0.5  # half of the second request's 500 tokens done by now
    assert b.queued_prefill_tokens == 250
    now[0] += 5.0  # overdue: nothing is left that the rate can tell of, never below 0
    assert b.queued_prefill_tokens == 0
    b.first_token(second, learn=False)  # a non-streamed answer: no rate sample
    assert b.prefill_tokens_per_s == pytest.approx(500.0)
    assert (b.busy_since, b.pending, b.decoding) == (None, {}, 2)
    third = b.dispatched(300)
    now[0] += 0.3
    b.first_token(third, learn=True)  # 300 tokens in 0.3 s: 1000 tokens/s, weighted with the older sample
    assert b.prefill_tokens_per_s == pytest.approx((0.5 * 1000 + 300) / (0.5 * 2.0 + 0.3))
    for h in (first, second, third):
        b.finished(h, started=True)
    gone = b.dispatched(800)
    b.finished(gone, started=False)  # never started (connection refused): it leaves no trace
    assert (b.in_flight, b.decoding, b.queued_prefill_tokens, b.busy_since) == (0, 0, 0, None)


def test_backend_remembers_the_prompts_sent_there_until_their_stores_can_have_reached_the_index() -> None:
    now = [0.0]
    b = Backend(RouterInstance(url="http://x"), clock=lambda: now[0])
    alice = tuple(range(1000))
    h = b.dispatched(1000, alice, "alice", max_sent=4)
    turn2 = (*alice, 7, 8, 9)
    assert b.sent_match(turn2, "alice") == 1000  # in flight: its engine holds (or is computing) the prefix
    assert b.sent_match(turn2, "alice", block=256) == 768  # counted in whole blocks, as the index counts chunks
    assert b.sent_match(turn2, "bob") == 0  # another tenant's prompt is no hit
    assert b.sent_match((*alice[:5], 99, *alice[6:]), "alice", block=4) == 4  # only the leading common tokens
    b.first_token(h, learn=True)
    b.finished(h, started=True, sent_life_s=30.0)
    now[0] = 29.0
    assert b.sent_match(turn2, "alice") == 1000
    now[0] = 31.0  # expired: by now the index has its chunks (or they are gone)
    assert b.sent_match(turn2, "alice") == 0 and b.sent == {}
    never = b.dispatched(1000, alice, "alice", max_sent=4)
    b.finished(never, started=False, sent_life_s=30.0)  # it never reached the engine: no hint
    assert b.sent_match(turn2, "alice") == 0
    for i in range(6):  # at most max_sent prompts are kept, the oldest dropped first
        b.dispatched(10, (i, *range(300)), None, max_sent=4)
    assert len(b.sent) == 4
    assert b.sent_match((0, *range(300)), None) == 0 and b.sent_match((5, *range(300)), None) == 301

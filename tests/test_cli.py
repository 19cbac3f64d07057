"""``kvtier stats`` and ``kvtier clear`` next to a live cache: read-only inspection, explicit and complete clearing."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.cli import main

WRITER = textwrap.dedent(
    """
    import os, sys, threading
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import SMALL_LAYOUT, build_chain
    from kvtier.keys import Namespace
    from kvtier.storage import DiskBackend
    disk = DiskBackend({root!r}, 10**9)
    disk.start()
    ns = Namespace("test-model-fingerprint", SMALL_LAYOUT)
    chain = build_chain(ns, np.arange(80, dtype="<u4"), 4)
    assert all(disk.put(chain))
    # a write in flight: the temporary file a live writer holds open while it writes
    tmp = open(os.path.join({root!r}, ".tmp", "ab" * 32 + f".{{os.getpid()}}.{{threading.get_ident()}}"), "wb")
    tmp.write(b"partial")
    tmp.flush()
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Path]:
    """Another process that has written 20 chunks into <tmp>/cache/chunks and holds one write in flight."""
    root = tmp_path / "cache" / "chunks"
    code = WRITER.format(tests=str(Path(__file__).parent), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield root
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.close()
    assert proc.wait(10) == 0


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_stats_leaves_a_live_cache_alone(writer: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _files(writer)
    assert len([p for p in before if p.suffix == ".kvc"]) == 20 and any(".tmp" in p.parts for p in before)
    # A budget far below what is there: a writer would evict; stats must not.
    rc, out, _ = _run(capsys, "stats", "--json", "--cache-dir", str(writer.parent), "--set", "l2.max_bytes=2000")
    assert rc == 0
    (tier,) = json.loads(out)["tiers"]
    assert (tier["name"], tier["entries"]) == ("l2", 20)
    assert _files(writer) == before  # nothing evicted, the in-flight .tmp file untouched


def test_stats_creates_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "stats", "--cache-dir", str(tmp_path / "never"))
    assert rc == 0 and "0 chunks" in out
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("command", ["stats", "clear"])
@pytest.mark.parametrize("bad", ["/dev/null/x", "/proc/self/status/x"])
def test_unusable_cache_dir_is_a_one_line_error(command: str, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = (
        _run(capsys, command, "--yes", "--cache-dir", bad)
        if command == "clear"
        else _run(capsys, command, "--cache-dir", bad)
    )
    assert rc == 2
    assert err.startswith("kvtier: error: ") and err.count("\n") == 1, err


def test_clear_without_a_terminal_refuses_without_yes(
    writer: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # not a terminal
    before = _files(writer)
    rc, _, err = _run(capsys, "clear", "--cache-dir", str(writer.parent))
    assert rc == 2 and "pass --yes" in err
    assert _files(writer) == before


def test_clear_asks_on_a_terminal(
    writer: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    before = _files(writer)
    rc, out, _ = _run(capsys, "clear", "--cache-dir", str(writer.parent))
    assert rc == 1 and "nothing deleted" in out
    assert _files(writer) == before


def test_clear_removes_the_chunks_and_only_them(writer: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "clear", "--yes", "--cache-dir", str(writer.parent))
    assert rc == 0
    assert f"l2: removed 20 chunks from disk {writer}" in out
    assert "l3: left alone (not enabled)" in out
    left = _files(writer)
    assert not [p for p in left if p.suffix == ".kvc"]
    assert any(".tmp" in p.parts for p in left)  # the live writer's in-flight file stays


@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_clear_names_and_clears_redis_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from redis_servers import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        with server.client() as client:
            client.set("kvtier:_:" + "00" * 32, b"x")
            client.set("kvtier:other-tenant:" + "00" * 32, b"x")
            client.set("unrelated", b"x")
        flags = ["--cache-dir", str(tmp_path / "cache"), "--set", "l3.enabled=true", "--set", f"l3.url={server.url}"]
        rc, out, _ = _run(capsys, "clear", "--yes", "--tier", "l3", *flags)
        assert rc == 0
        assert "l2: left alone (not in --tier)" in out
        assert "l3: removed 1 chunks from redis redis://127.0.0.1" in out
        with server.client() as client:
            assert sorted(client.keys("*")) == [b"kvtier:other-tenant:" + b"00" * 32, b"unrelated"]
        assert not (tmp_path / "cache").exists()  # l2 was not even opened
        rc, out, _ = _run(capsys, "stats", *flags)
        assert rc == 0 and "l3: redis redis://127.0.0.1" in out and "shared store" in out

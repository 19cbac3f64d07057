"""Real Redis for tests: redis-server processes on free loopback ports, a 3-node cluster, a black-hole proxy.

Every server runs in the foreground (``--daemonize no``) in its own folder,
with persistence off, and is terminated by ``stop`` (or the context manager).
"""

from __future__ import annotations

import contextlib
import random
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
HOST = "127.0.0.1"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A free loopback port; with ``with_bus`` also port + 10000 (a cluster node's bus port)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 40000)
        if _port_free(port) and (not with_bus or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found")


class RedisServer:
    """One redis-server process; ``start`` waits until it answers PING."""

    def __init__(self, folder: Path, port: int | None = None, *args: str, cluster: bool = False) -> None:
        self.folder = Path(folder)
        self.port = port if port is not None else free_port(with_bus=cluster)
        self.args = list(args)
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert REDIS_SERVER is not None, "redis-server is not installed"
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.folder),
            "--logfile", str(self.folder / "redis.log"),
        ]  # fmt: skip
        if self.cluster:
            cmd += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.folder / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        self.proc = subprocess.Popen([*cmd, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._wait_for_ping(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_ping(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                if self.proc.poll() is not None:
                    log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server on port {self.port} exited: {log}")
                try:
                    if client.ping():
                        return
                except (redis.AuthenticationError, redis.ResponseError):
                    return  # it answered: the server wants a password
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout}s")
                time.sleep(0.02)

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 5 s) and wait for it."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self) -> redis.Redis:
        """A plain redis-py client for direct inspection (short timeouts, no retries)."""
        return redis.Redis(
            host=HOST, port=self.port, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterServers:
    """Three cluster-enabled primaries (no replicas), the slots spread over them by ``redis-cli --cluster create``."""

    def __init__(self, folder: Path, nodes: int = 3) -> None:
        self.nodes = [RedisServer(Path(folder) / f"node{i}", cluster=True) for i in range(nodes)]

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        assert REDIS_CLI is not None, "redis-cli is not installed"
        for node in self.nodes:
            node.start()
        addresses = [f"{HOST}:{n.port}" for n in self.nodes]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            with node.client() as client:
                while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node {node.port} did not reach cluster_state:ok")
                    time.sleep(0.05)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BlackHoleProxy:
    """A loopback TCP proxy to ``target_port`` that can turn into a black hole.

    While ``black_hole`` is set it still accepts connections and reads what
    clients send, but forwards nothing and answers nothing, on new and
    existing connections alike: a client sees a peer that hangs, not one
    that refuses. ``stop`` closes everything.

    ``reply_delay_s``: every piece of data the server sends is held this
    long before it is passed on (a slow server that still answers within a
    client's socket timeout). Settable while running. While ``garbage`` is
    set, what the server sends is replaced by random bytes of the same length.
    """

    def __init__(self, target_port: int, *, reply_delay_s: float = 0.0) -> None:
        self.target_port = target_port
        self.reply_delay_s = reply_delay_s
        self.black_hole = threading.Event()
        self.garbage = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> BlackHoleProxy:
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        sock.settimeout(None)  # blocking; pumps poll with select so they notice stop()
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._track(client)
            if self.black_hole.is_set():
                self._spawn(self._pump, client, None)
                continue
            try:
                upstream = self._track(socket.create_connection((HOST, self.target_port), timeout=1))
            except OSError:
                client.close()
                continue
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket | None, reply: bool = False) -> None:
        while not self._stop.is_set():
            try:
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(1 << 16)
            except (OSError, ValueError):  # ValueError: select on a socket closed by stop()
                break
            if not data:
                break
            if dst is None or self.black_hole.is_set():
                continue  # swallowed
            if reply and self.reply_delay_s:
                time.sleep(self.reply_delay_s)
            if reply and self.garbage.is_set():
                data = random.randbytes(len(data))
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in sendall
            with contextlib.suppress(OSError):
                s.close()
        for t in threads:
            t.join(timeout=2)

    def __enter__(self) -> BlackHoleProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_only(url: str, chunk_size: int, **values: object) -> dict[str, object]:
    """Config overrides for an engine on Redis alone (no l1, no l2, full chunks only), plus ``values``."""
    return {
        "chunk_size": chunk_size,
        "store_partial": False,
        "l1.enabled": False,
        "l2.enabled": False,
        "l3.enabled": True,
        "l3.url": url,
        **values,
    }

"""The node memory tier's two designs on the restart case: shared-memory files + a ledger vs a cache process.

    python bench/node_designs.py --json bench/results/node_designs.json [--restarts 5] [--chunks 10] [--quick]

A 2,560-token prefix in SmolLM2-135M's layout (10 chunks of 256 tokens,
11.8 MB each, raw codec, random payload) was stored by an engine process that
is gone; a *new* process (the restarted engine, started fresh for every
repetition) gets it back as verified ``Chunk`` objects it owns:

* ``files`` (what kvtier ships: ``kvtier.storage.NodeBackend``): chunk files
  under ``/dev/shm`` with the folder's ledger. Timed: ``start`` (open the
  folder, reconcile the ledger) and one batched ``get`` (ledger lookup, reads
  on the reader threads, checksums, touch).
* ``server`` (LMCache's choice, prototyped here, bench-only): a cache process
  that outlives the engine holds the encoded chunks in its own memory; the
  engine sends the keys over a ZeroMQ REQ/REP socket (``ipc://``), the server
  copies the chunks into a shared-memory segment and answers with offsets,
  the engine verifies and decodes them (``decode_payload``) either straight
  from the segment (``server_view``: one copy, by the server; the engine
  must then hold the segment while it uses the chunks) or after copying
  them into memory it owns (``server_copy``: two copies, what a tier must
  return). Timed: connect + attach (the restart's set-up), and the request.
  ``rtt_us`` is the round trip of an empty request: the design's fixed cost.

Both paths verify the same checksums, so the difference is the transport.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
from multiprocessing import shared_memory
from pathlib import Path
from statistics import median
from typing import Any

import harness as h

QUICK = {"restarts": 2, "chunks": 2}
_CLIENT_FILES = """
import json, sys, time
t0 = time.perf_counter()
from kvtier.keys import ChunkKey
from kvtier.storage import NodeBackend
import torch
t_import = time.perf_counter() - t0
root, budget, keys = sys.argv[1], int(sys.argv[2]), [ChunkKey.from_hex(k) for k in sys.argv[3].split(",")]
t0 = time.perf_counter(); tier = NodeBackend(root, budget); tier.start(); t_start = time.perf_counter() - t0
t0 = time.perf_counter(); got = tier.get(keys); t_get = time.perf_counter() - t0
assert all(g is not None for g in got)
print(json.dumps({"import_s": t_import, "setup_s": t_start, "get_s": t_get}))
"""
_CLIENT_SERVER = """
import json, struct, sys, time
t0 = time.perf_counter()
import torch, zmq
from multiprocessing import resource_tracker, shared_memory
from kvtier.chunk import decode_header, decode_payload
t_import = time.perf_counter() - t0
addr, shm_name, keys = sys.argv[1], sys.argv[2], [bytes.fromhex(k) for k in sys.argv[3].split(",")]
t0 = time.perf_counter()
ctx = zmq.Context(); sock = ctx.socket(zmq.REQ); sock.connect(addr)
seg = shared_memory.SharedMemory(name=shm_name)
resource_tracker.unregister(seg._name, "shared_memory")  # Python < 3.13 would unlink the server's segment at exit
t_setup = time.perf_counter() - t0
rtts = []
for _ in range(20):
    t0 = time.perf_counter(); sock.send(b""); sock.recv(); rtts.append(time.perf_counter() - t0)
out = {}
for mode in ("view", "copy"):
    t0 = time.perf_counter()
    sock.send(b"".join(keys))
    reply = sock.recv()
    chunks = []
    for off, n in struct.iter_unpack("<QQ", reply):
        data = seg.buf[off : off + n]
        header = decode_header(data)
        body = data[header.offset :]
        if mode == "copy":
            own = torch.empty(len(body), dtype=torch.uint8).numpy()
            own[:] = body
            body = memoryview(own)
        chunks.append(decode_payload(header, body))
    out[mode + "_s"] = time.perf_counter() - t0
    del chunks, data, body
print(json.dumps({"import_s": t_import, "setup_s": t_setup, "rtt_s": sorted(rtts)[len(rtts) // 2], **out}))
sock.close(); ctx.term(); seg.close()
"""


def serve(addr: str, shm_name: str, blobs_dir: Path) -> None:
    """The prototype cache process: holds every ``*.kvc`` of ``blobs_dir`` in memory, serves them through ``shm``."""
    import zmq

    held = {}
    for path in blobs_dir.glob("*/*.kvc"):
        held[bytes.fromhex(path.name.split(".")[0])] = path.read_bytes()
    seg = shared_memory.SharedMemory(name=shm_name, create=True, size=sum(len(b) for b in held.values()))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.bind(addr)
    print("ready", flush=True)
    while True:
        msg = sock.recv()
        if msg == b"stop":
            sock.send(b"")
            break
        out, pos = [], 0
        for i in range(0, len(msg), 32):
            blob = held[msg[i : i + 32]]
            seg.buf[pos : pos + len(blob)] = blob
            out.append(struct.pack("<QQ", pos, len(blob)))
            pos += len(blob)
        sock.send(b"".join(out))
    seg.close()
    seg.unlink()


def _python(code: str, *args: str) -> dict[str, Any]:
    import json

    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"client failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
        return 0
    from load_path import make_prefix

    from kvtier.storage import NodeBackend

    parser = h.BenchParser(
        __doc__, ("seed", "threads", "tmp_dir", *h.TIMER_FLAGS), quick=QUICK, positive=("restarts", "chunks")
    )
    parser.add_argument("--restarts", type=int, default=5, help="fresh engine processes per design (median)")
    parser.add_argument("--chunks", type=int, default=10, help="256-token chunks in the prefix (default 10)")
    args = parser.parse_args(argv)
    run = h.Run(args, "node-designs")
    chunks = make_prefix(args.chunks, 256, args.seed)
    nbytes = sum(c.payload.nbytes for c in chunks)
    keys = ",".join(c.key.hex() for c in chunks)
    shm = Path(tempfile.mkdtemp(prefix="kvtier-node-designs-", dir="/dev/shm"))
    root, budget = shm / "node", 4 * nbytes
    tier = NodeBackend(root, budget)
    tier.start()
    assert all(tier.put(chunks))  # the engine that stored the prefix, now "gone"
    tier.close()
    del chunks
    env_path = os.pathsep.join([str(h.ROOT), str(h.ROOT / "bench")])
    os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
    addr, shm_name = f"ipc://{shm}/server.sock", f"kvtier-bench-{os.getpid()}"
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", addr, shm_name, str(root)], stdout=subprocess.PIPE, text=True
    )
    files: list[dict[str, Any]] = []
    srv: list[dict[str, Any]] = []
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        run.timer.own_pids.add(server.pid)
        for i in range(args.restarts):  # interleaved: drift hits both designs alike
            # each restart is a process's whole life; CleanTimer gates it on a quiet machine
            files.append(run.timer.once(f"files#{i}", lambda: _python(_CLIENT_FILES, str(root), str(budget), keys))[1])
            srv.append(run.timer.once(f"server#{i}", lambda: _python(_CLIENT_SERVER, addr, shm_name, keys))[1])
            got = f"files get {files[-1]['get_s'] * 1e3:.1f} ms, server copy {srv[-1]['copy_s'] * 1e3:.1f} ms"
            print(f"restart {i + 1}: {got}", file=sys.stderr)
    finally:
        import zmq

        with zmq.Context() as ctx, ctx.socket(zmq.REQ) as sock:
            sock.connect(addr)
            sock.send(b"stop")
            sock.recv()
        server.wait(timeout=30)
        shutil.rmtree(shm, ignore_errors=True)
        run.remove_tmp()

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return median(r[key] for r in rows)

    rows = [
        {
            "design": "files",
            "setup_ms": med(files, "setup_s") * 1e3,
            "get_ms": med(files, "get_s") * 1e3,
            "get_gbps": nbytes / med(files, "get_s") / 1e9,
            "rtt_us": None,
        },
        *(
            {
                "design": f"server_{mode}",
                "setup_ms": med(srv, "setup_s") * 1e3,
                "get_ms": med(srv, f"{mode}_s") * 1e3,
                "get_gbps": nbytes / med(srv, f"{mode}_s") / 1e9,
                "rtt_us": med(srv, "rtt_s") * 1e6,
            }
            for mode in ("view", "copy")
        ),
    ]
    result = {
        "benchmark": "node_designs",
        "settings": {"restarts": args.restarts, "chunks": args.chunks, "chunk_tokens": 256, "payload_bytes": nbytes},
        "machine": run.machine(),
        "rows": rows,
        "raw": {"files": files, "server": srv},
        "contention": run.timer.report(blocks=True),
        "runtime_s": run.runtime_s,
    }

    def table() -> None:
        con = h.console()
        h.print_table(
            con,
            f"restart case: a fresh process gets a {nbytes / 1e6:.0f} MB prefix from the node tier",
            {"design": "design", "setup ms": "setup_ms", "get ms": "get_ms", "GB/s": "get_gbps", "rtt us": "rtt_us"},
            rows,
        )

    run.finish(result, table=table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`kvtier serve` up to the point where vLLM would start, and the core's independence from vLLM."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from kvtier import serve
from kvtier.cli import main


def test_core_imports_without_vllm():
    code = (
        "import sys, kvtier, kvtier.engine, kvtier.cli, kvtier.serve, kvtier.adapters.vllm, kvtier.adapters.vllm.paged;"
        "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules), 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def printed(capsys, tmp_path):
    pytest.importorskip("vllm", reason="kvtier serve needs vLLM installed")

    def run(*args: str) -> tuple[int, list[str], str]:
        rc = main(["serve", "--print-command", "--set", f"l2.path={tmp_path}", *args])
        out, err = capsys.readouterr()
        return rc, shlex.split(out.strip()) if out.strip() else [], err

    return run


def test_print_command_carries_the_connector_and_the_kvtier_config(printed, tmp_path):
    rc, argv, _ = printed("--port", "8123", "--set", "l1.max_bytes=1GB", "--metrics-port", "9464", "--", "--seed", "3")
    assert rc == 0
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[-2:] == ["--seed", "3"]
    transfer = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == "KvtierConnector"
    assert transfer["kv_connector_module_path"] == "kvtier.adapters.vllm"
    assert transfer["kv_load_failure_policy"] == "recompute"
    extra = transfer["kv_connector_extra_config"]
    node = {k: v for k, v in extra["set"].items() if k.startswith("node.")}
    assert {k: v for k, v in extra["set"].items() if k not in node} == {"l2.path": str(tmp_path), "l1.max_bytes": "1GB"}
    assert extra["metrics_port"] == 9464


def test_no_kvtier_is_the_same_server_without_the_connector(printed):
    rc, argv, _ = printed("--no-kvtier")
    assert rc == 0 and "--kv-transfer-config" not in argv and "--enforce-eager" in argv


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "chunk_size=100"], "must be a multiple of vLLM's block size 128"),
        (["--set", "chunk_size=256", "--", "--block-size", "96"], "must be a multiple of vLLM's block size 96"),
        (["--set", "l2.enabled=false", "--set", "node.enabled=false"], "needs node (memory), l2 (disk) or l3 (Redis)"),
        (["--set", "l1.max_bytes=lots"], "l1.max_bytes"),
    ],
)
def test_bad_settings_are_refused_before_vllm_starts(printed, args, message):
    rc, argv, err = printed(*args)
    assert rc == 2 and argv == []
    assert message in err


def test_node_tier_is_on_by_default_where_there_is_room_and_says_so(printed, tmp_path):
    shm = tmp_path / "shm"
    rc, argv, err = printed("--set", f"node.path={shm}")
    assert rc == 0
    extra = json.loads(argv[argv.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
    budget = serve.node_budget(serve._mem_available(), serve._free_bytes(shm), None)
    if budget is None:  # a machine without room: off, and the line says why
        assert extra["set"]["node.enabled"] == "false" and "node memory tier off" in err
        return
    assert extra["set"]["node.enabled"] == "true"
    assert abs(int(extra["set"]["node.max_bytes"]) - budget) < 64 * 10**6  # free memory moves a little
    (line,) = [x for x in err.splitlines() if "node memory tier" in x]
    assert f"node memory tier at {shm}, budget" in line and "node.enabled=false turns it off" in line


def test_node_tier_off_when_asked(printed):
    rc, argv, err = printed("--set", "node.enabled=false")
    extra = json.loads(argv[argv.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
    assert rc == 0 and extra["set"]["node.enabled"] == "false"
    assert "node memory tier off (node.enabled=false)" in err


def test_node_budget_is_a_share_of_free_memory_capped_by_the_folder():
    gb = 10**9
    assert serve.node_budget(16 * gb, 20 * gb, None) == 4 * gb  # a quarter of the memory
    assert serve.node_budget(16 * gb, 4 * gb, None) == 2 * gb  # half of the tmpfs
    assert serve.node_budget(16 * gb, 0, None) is None  # no tmpfs room
    assert serve.node_budget(10**8, 20 * gb, None) is None  # too little memory for a useful tier
    assert serve.node_budget(16 * gb, 3 * gb, 2 * gb) == 2 * gb  # a configured budget that fits
    assert serve.node_budget(16 * gb, 1 * gb, 2 * gb) is None


def test_only_compat_reaches_into_vllm():
    """kvtier talks to vLLM through adapters/vllm/compat.py and the public connector base class only."""
    import ast
    from pathlib import Path

    import kvtier

    root = Path(kvtier.__file__).parent
    base = "vllm.distributed.kv_transfer.kv_connector.v1.base"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        if rel == "kvtier/adapters/vllm/compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{rel}:{node.lineno} {n}" for n in names if (n == "vllm" or n.startswith("vllm.")) and n != base
            ]
    assert offenders == []


def test_vllm_logging_env_adds_a_kvtier_logger_to_vllms_config(tmp_path):
    pytest.importorskip("vllm", reason="the logging config starts from vLLM's own")
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    from kvtier.config import load_config
    from kvtier.serve import vllm_logging_env

    config = load_config(env={}, overrides={"cache_dir": str(tmp_path), "log_level": "DEBUG"})
    env = vllm_logging_env(config, {"PATH": "/bin"})
    path = env.pop("VLLM_LOGGING_CONFIG_PATH")
    assert env == {"PATH": "/bin"} and path.startswith(str(tmp_path))
    written = json.loads(open(path).read())
    assert written["loggers"]["kvtier"] == {"handlers": ["kvtier"], "level": "DEBUG", "propagate": False}
    assert written["handlers"]["kvtier"]["level"] == "DEBUG"
    assert written["loggers"]["vllm"] == DEFAULT_LOGGING_CONFIG["loggers"]["vllm"]
    assert written["handlers"]["vllm"] == DEFAULT_LOGGING_CONFIG["handlers"]["vllm"]
    assert vllm_logging_env(config, {})["VLLM_LOGGING_CONFIG_PATH"] == path  # same content, same file
    # The user's own file, or vLLM's logging set-up turned off (a file would then be refused): left alone.
    for mine in ({"VLLM_LOGGING_CONFIG_PATH": "/mine.json"}, {"VLLM_CONFIGURE_LOGGING": "0"}):
        assert vllm_logging_env(config, mine) == mine


def test_shared_tiers_without_a_secret_are_warned_about_and_a_secret_never_shows(printed, tmp_path, monkeypatch):
    rc, _, err = printed("--set", "node.enabled=false")
    assert rc == 0 and "shared tiers l2 are on without a chunk-signing secret" in err
    value = "kvtier-serve-secret-" + "z" * 24
    monkeypatch.setenv("KVT_TEST_SECRET", value)
    rc, argv, err = printed("--set", "node.enabled=false", "--set", "security.secret_env=KVT_TEST_SECRET")
    assert rc == 0 and "chunk-signing secret" not in err
    assert value not in " ".join(argv) + err and "KVT_TEST_SECRET" in " ".join(argv)
    rc, argv, err = printed("--set", "node.enabled=false", "--set", "security.secret_env=KVT_UNSET_SECRET")
    assert rc == 2 and argv == [] and "KVT_UNSET_SECRET is unset" in err

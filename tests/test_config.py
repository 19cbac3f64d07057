"""kvtier.config: defaults, precedence (file < env < overrides), sizes, and every kind of error."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

from kvtier.config import KvtierConfig, default_cache_dir, load_config, parse_overrides
from kvtier.errors import ConfigError


def _toml(tmp_path: Path, text: str, name: str = "kvtier.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _json(tmp_path: Path, data: object, name: str = "kvtier.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    c = load_config(env={})
    assert c.model == "smollm2-135m"
    assert c.cache_dir == tmp_path / "kvtier"
    assert c.chunk_dir == tmp_path / "kvtier" / "chunks"
    assert c.chunk_size == 256
    assert c.hash == "blake3"
    assert c.tenant is None
    assert c.store_partial is True
    assert c.store_generated is True
    assert c.write_queue_bytes == 10**9
    assert c.log_level == "INFO"
    assert (c.l1.enabled, c.l1.max_bytes) == (True, 2 * 10**9)
    assert (c.l2.enabled, c.l2.path, c.l2.max_bytes, c.l2.fsync) == (True, None, 20 * 10**9, False)
    assert c == KvtierConfig(cache_dir=tmp_path / "kvtier")


def test_default_cache_dir_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "kvtier"


def test_l2_path_overrides_chunk_dir(tmp_path: Path) -> None:
    c = load_config(env={}, overrides={"l2.path": str(tmp_path / "elsewhere"), "cache_dir": str(tmp_path)})
    assert c.chunk_dir == tmp_path / "elsewhere"


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_precedence_file_env_overrides(tmp_path: Path, fmt: str) -> None:
    data = {"chunk_size": 8, "tenant": "file", "hash": "sha256", "l1": {"max_bytes": "1MB"}, "l2": {"fsync": True}}
    if fmt == "toml":
        path = _toml(
            tmp_path,
            'chunk_size = 8\ntenant = "file"\nhash = "sha256"\n[l1]\nmax_bytes = "1MB"\n[l2]\nfsync = true\n',
        )
    else:
        path = _json(tmp_path, data)
    only_file = load_config(path, env={})
    assert (only_file.chunk_size, only_file.tenant, only_file.hash) == (8, "file", "sha256")
    assert (only_file.l1.max_bytes, only_file.l2.fsync) == (10**6, True)

    env = {"KVTIER_CHUNK_SIZE": "16", "KVTIER_TENANT": "env", "KVTIER_L1__MAX_BYTES": "2MB"}
    with_env = load_config(path, env=env)
    assert (with_env.chunk_size, with_env.tenant, with_env.hash) == (16, "env", "sha256")
    assert (with_env.l1.max_bytes, with_env.l2.fsync) == (2 * 10**6, True)

    full = load_config(path, env=env, overrides={"chunk_size": "32", "l1.max_bytes": "3MB"})
    assert (full.chunk_size, full.tenant, full.hash) == (32, "env", "sha256")
    assert (full.l1.max_bytes, full.l2.fsync) == (3 * 10**6, True)


def test_env_only_reads_kvtier_prefix() -> None:
    c = load_config(env={"CHUNK_SIZE": "7", "KVTIERX_CHUNK_SIZE": "9", "kvtier_chunk_size": "11"})
    assert c.chunk_size == 256


@pytest.mark.parametrize("name", ["KVTIER_NUMBA", "KVTIER_NO_VLLM"])
def test_documented_switches_are_not_config_keys(name: str) -> None:
    # README and docs/codecs.md document KVTIER_NUMBA=0; setup.sh reads KVTIER_NO_VLLM. Neither may break loading.
    c = load_config(env={name: "0", "KVTIER_CHUNK_SIZE": "64"})
    assert c.chunk_size == 64


def test_kernel_switch_in_the_real_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_NUMBA", "0")
    assert load_config().chunk_size == 256


def test_env_bools_and_literals() -> None:
    c = load_config(env={"KVTIER_STORE_PARTIAL": "false", "KVTIER_L2__ENABLED": "0", "KVTIER_LOG_LEVEL": "DEBUG"})
    assert (c.store_partial, c.l2.enabled, c.log_level) == (False, False, "DEBUG")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4_000_000_000),
        ("4GiB", 4 * 2**30),
        ("4 GiB", 4 * 2**30),
        ("1.5MB", 1_500_000),
        ("512KiB", 512 * 1024),
        ("123", 123),
        ("1KB", 1000),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    c = load_config(env={}, overrides={"l1.max_bytes": text, "l2.max_bytes": text, "write_queue_bytes": text})
    assert c.l1.max_bytes == c.l2.max_bytes == c.write_queue_bytes == expected
    assert int(c.l1.max_bytes) == expected


def test_sizes_from_env_and_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[l2]\nmax_bytes = 5000\n")
    c = load_config(path, env={"KVTIER_L1__MAX_BYTES": "4GiB"})
    assert (c.l1.max_bytes, c.l2.max_bytes) == (4 * 2**30, 5000)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "nope = 1\n[l1]\nalso_nope = 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    msg = str(exc.value)
    assert f"nope: unknown key (from file {path})" in msg
    assert f"l1.also_nope: unknown key (from file {path})" in msg


def test_unknown_key_in_json_file(tmp_path: Path) -> None:
    path = _json(tmp_path, {"l2": {"nope": True}})
    with pytest.raises(ConfigError, match=r"l2\.nope: unknown key \(from file .*kvtier\.json\)"):
        load_config(path, env={})


@pytest.mark.parametrize(
    ("name", "key"), [("KVTIER_NOPE", "nope"), ("KVTIER_L1__NOPE", "l1.nope"), ("KVTIER_L2__PATHS", "l2.paths")]
)
def test_unknown_key_in_env(name: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={name: "1"})
    assert f"{key}: unknown key (from env {name})" in str(exc.value)


def test_unknown_key_in_overrides() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"l1.nope": "3"})
    assert "l1.nope: unknown key (from flag l1.nope=3)" in str(exc.value)


def test_unknown_section_names_its_source() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"KVTIER_NOPE__DEEP": "1"})
    assert "KVTIER_NOPE__DEEP" in str(exc.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"KVTIER_CHUNK_SIZE": "0", "KVTIER_HASH": "md5"})
    msg = str(exc.value)
    assert "chunk_size: Input should be greater than 0 (from env KVTIER_CHUNK_SIZE)" in msg
    assert "hash: " in msg and "(from env KVTIER_HASH)" in msg


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("chunk_size", 0, "chunk_size: Input should be greater than 0"),
        ("chunk_size", "-3", "chunk_size: Input should be greater than 0"),
        ("chunk_size", 1 << 17, "chunk_size: Input should be less than or equal to 65536"),
        ("chunk_size", "abc", "chunk_size: Input should be a valid integer"),
        ("l1.max_bytes", "-1", "l1.max_bytes: "),
        ("l1.max_bytes", "abc", "l1.max_bytes: could not parse value and unit"),
        ("l1.max_bytes", "0", "l1.max_bytes: Input should be greater than 0"),
        ("l2.max_bytes", "4XB", "l2.max_bytes: "),
        ("write_queue_bytes", "0", "write_queue_bytes: Input should be greater than 0"),
        ("hash", "md5", "hash: Input should be 'blake3' or 'sha256'"),
        ("tenant", "", "tenant: String should have at least 1 character"),
        ("log_level", "LOUD", "log_level: "),
        ("store_partial", "maybe", "store_partial: "),
        ("l1", "5", "l1: "),
    ],
)
def test_bad_values(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={key: value})
    msg = str(exc.value)
    assert fragment in msg
    assert f"(from flag {key}={value})" in msg


def test_bad_value_from_env_names_the_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"KVTIER_L1__MAX_BYTES": "-1"})
    assert "l1.max_bytes" in str(exc.value)
    assert "(from env KVTIER_L1__MAX_BYTES)" in str(exc.value)


def test_value_under_a_non_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="'chunk_size' is not a section"):
        load_config(env={"KVTIER_CHUNK_SIZE": "4", "KVTIER_CHUNK_SIZE__X": "1"})


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_config_file_from_env(tmp_path: Path, fmt: str) -> None:
    path = _toml(tmp_path, "chunk_size = 64\n") if fmt == "toml" else _json(tmp_path, {"chunk_size": 64})
    assert load_config(env={"KVTIER_CONFIG": str(path)}).chunk_size == 64
    # KVTIER_CONFIG is the file's name, not a config key, and an explicit file wins over it
    other = _toml(tmp_path, "chunk_size = 128\n", name="other.toml")
    assert load_config(other, env={"KVTIER_CONFIG": str(path)}).chunk_size == 128


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("bad.toml", "chunk_size = = 3\n", "is not valid TOML"),
        ("bad.json", "{chunk_size: 3", "is not valid JSON"),
        ("list.json", "[1, 2]", "must hold a table/object at the top level"),
        ("scalar.json", "3", "must hold a table/object at the top level"),
    ],
)
def test_malformed_file(tmp_path: Path, name: str, content: str, fragment: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path, env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml", env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(env={"KVTIER_CONFIG": str(tmp_path / "absent.json")})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, env={})  # a directory


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('tenant = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError):
        load_config(path, env={})


def test_parse_overrides() -> None:
    assert parse_overrides([]) == {}
    assert parse_overrides(["a=1", " l1.max_bytes =4GB", "x=y=z", "empty="]) == {
        "a": "1",
        "l1.max_bytes": "4GB",
        "x": "y=z",
        "empty": "",
    }
    assert parse_overrides(["a=1", "a=2"]) == {"a": "2"}


@pytest.mark.parametrize("pair", ["novalue", "=3", "  =3", ""])
def test_parse_overrides_errors(pair: str) -> None:
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        parse_overrides(["ok=1", pair])


@pytest.mark.parametrize("key", ["", "a..b", ".a", "l1."])
def test_malformed_override_keys(key: str) -> None:
    with pytest.raises(ConfigError, match="malformed config key"):
        load_config(env={}, overrides={key: "1"})


def test_config_is_frozen() -> None:
    c = load_config(env={})
    with pytest.raises(pydantic.ValidationError):
        c.chunk_size = 8  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        c.l1.max_bytes = 8  # type: ignore[misc]
    assert c.chunk_size == 256
    changed = c.model_copy(update={"chunk_size": 8})
    assert (changed.chunk_size, c.chunk_size) == (8, 256)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        load_config(env={"KVTIER_NOPE": "1"})


def test_redis_url_is_validated_and_its_password_never_shown() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"l3.url": "http://user:s3cret@host"})
    assert "l3.url" in str(exc.value) and "scheme" in str(exc.value)
    assert "s3cret" not in str(exc.value)
    config = load_config(env={}, overrides={"l3.url": "redis://user:s3cret@host:6380/1"})
    assert "s3cret" not in repr(config) and config.l3.url.endswith("@host:6380/1")

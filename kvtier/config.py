"""kvtier's one configuration: typed, nested, frozen, validated.

Sources, lowest precedence first: defaults, a TOML or JSON file (``--config``
or ``KVTIER_CONFIG``), ``KVTIER_*`` environment variables, CLI overrides.
Nested keys use ``__`` in the environment and ``.`` on the command line::

    KVTIER_L1__MAX_BYTES=4GB      kvtier demo --set l1.max_bytes=4GB

The variables in :data:`ENV_SWITCHES` (``KVTIER_NUMBA``, ``KVTIER_NO_VLLM``)
are switches read by other code, not config keys. Sizes accept ``4GB``
(10^9), ``4GiB`` (2^30) or plain bytes. An unknown key
or a bad value raises :class:`~kvtier.errors.ConfigError` naming the key, the
source it came from and the reason.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kvtier.errors import ConfigError

ENV_PREFIX = "KVTIER_"
ENV_CONFIG_FILE = "KVTIER_CONFIG"
# KVTIER_* variables that are switches read elsewhere, not config keys: never parsed as keys.
ENV_SWITCHES: frozenset[str] = frozenset(
    {
        ENV_CONFIG_FILE,  # the config file
        "KVTIER_NUMBA",  # 0: the codecs' torch code instead of the compiled kernels (kvtier/codec/kernels.py)
        "KVTIER_NO_VLLM",  # scripts/setup.sh: install without vLLM
    }
)

PositiveBytes = Annotated[ByteSize, Field(gt=0)]


def _valid_codec(spec: str) -> str:
    from kvtier.codec import get_codec

    return get_codec(spec).name  # ValueError (listing the valid specs) for an unknown one


CodecSpec = Annotated[str, AfterValidator(_valid_codec)]


def _valid_redis_url(url: str) -> str:
    from kvtier.storage.urls import parse_redis_url

    parse_redis_url(url)  # ValueError naming what is wrong (credentials redacted)
    return url


RedisUrl = Annotated[str, AfterValidator(_valid_redis_url)]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvtier"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# eviction policies and admission filters (kvtier.eviction; tests/test_policies.py checks the names match)
EvictionPolicyName = Literal["adaptive", "lru", "lfu", "arc", "s3fifo"]
AdmissionName = Literal["always", "second_sight"]


class L1Config(_Frozen):
    """CPU-memory tier."""

    enabled: bool = True
    max_bytes: PositiveBytes = ByteSize(2 * 10**9)
    codec: CodecSpec = Field(default="raw", description="how chunks are held in memory (raw: as tensors)")
    policy: EvictionPolicyName = Field(default="adaptive", description="eviction order (docs/eviction.md)")
    admission: AdmissionName = Field(default="always", description="second_sight: store a chunk when seen twice")


class NodeConfig(_Frozen):
    """Memory tier shared by every engine process of this user on the machine (files in a tmpfs); outlives them.

    ``enabled`` None: ``kvtier serve`` turns it on where the machine has room
    (and says so at start-up); everything else leaves it off. ``max_bytes``
    None: ``kvtier serve`` picks it from the free memory; elsewhere it is
    needed when the tier is enabled.
    """

    enabled: bool | None = Field(default=None, description="None: on under kvtier serve where there is room")
    path: Path | None = Field(default=None, description="folder in a tmpfs; default /dev/shm/kvtier-<uid>")
    max_bytes: PositiveBytes | None = Field(default=None, description="one budget for every process on the machine")
    codec: CodecSpec = Field(default="raw", description="codec of the chunk files, e.g. int8+zstd")
    policy: EvictionPolicyName = Field(
        default="adaptive", description="eviction order of this process's chunks (docs/eviction.md)"
    )

    @model_validator(mode="after")
    def _budget_when_enabled(self) -> NodeConfig:
        if self.enabled and self.max_bytes is None:
            raise ValueError("node.max_bytes is needed when node.enabled is true (e.g. node.max_bytes=4GB)")
        return self


class L2Config(_Frozen):
    """Local-disk tier."""

    enabled: bool = True
    path: Path | None = Field(default=None, description="chunk directory; default <cache_dir>/chunks")
    max_bytes: PositiveBytes = ByteSize(20 * 10**9)
    fsync: bool = False
    codec: CodecSpec = Field(default="raw", description="codec of chunk files, e.g. int8+zstd")
    policy: EvictionPolicyName = Field(default="adaptive", description="eviction order (docs/eviction.md)")
    shared_group: str | None = Field(
        default=None,
        min_length=1,
        description="open the chunk folder to this group (2770/0660); default: private to its owner (0700/0600)",
    )
    map_reads: bool = Field(
        default=True,
        description="read chunk files through a read-only mapping of the page cache (no copy into fresh memory); "
        "off: read() into new memory (for folders something else may truncate in place)",
    )


class L3Config(_Frozen):
    """Shared tier on Redis (standalone or cluster). Off unless enabled."""

    enabled: bool = False
    url: RedisUrl = Field(
        default="redis://127.0.0.1:6379/0",
        repr=False,  # may carry a password
        description="redis://[user:password@]host:port/db, rediss://… (TLS), or redis+cluster://host:port[,host:port…]",
    )
    key_prefix: str = Field(default="kvtier", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    ttl_s: int | None = Field(default=None, gt=0, description="expire chunks after this many seconds")
    connect_timeout_s: float = Field(default=0.5, gt=0)
    timeout_s: float = Field(default=0.5, gt=0, description="bound on every Redis call")
    max_connections: int = Field(default=16, gt=0)
    retry_interval_s: float = Field(default=2.0, ge=0, description="after a failure, skip Redis this long")
    lookup_deadline_s: float | None = Field(
        default=0.5, gt=0, description="with l3 on: bound on one engine lookup (the prefix found so far counts)"
    )
    retrieve_deadline_s: float | None = Field(
        default=2.0, gt=0, description="with l3 on: bound on one engine retrieve (the prefix read so far is returned)"
    )
    codec: CodecSpec = Field(default="raw", description="codec of chunk values, e.g. int8+zstd")
    # access control (docs/security.md): an ACL user, its password from a file or the environment, TLS files
    username: str | None = Field(default=None, min_length=1, description="ACL user (default: the URL's, or none)")
    password_file: Path | None = Field(default=None, description="file holding the Redis password")
    password_env: str | None = Field(default=None, min_length=1, description="environment variable holding it")
    tls_ca_file: Path | None = Field(default=None, description="rediss://: CA bundle that signed the server's cert")
    tls_cert_file: Path | None = Field(default=None, description="rediss://: client certificate (mutual TLS)")
    tls_key_file: Path | None = Field(default=None, description="rediss://: the client certificate's key")

    @model_validator(mode="after")
    def _access(self) -> L3Config:
        from kvtier.storage.urls import parse_redis_url

        target = parse_redis_url(self.url)
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give l3.password_file or l3.password_env, not both")
        if (self.password_file is not None or self.password_env is not None) and target.password is not None:
            raise ValueError("the Redis password is both in l3.url and in l3.password_file/password_env")
        tls_files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if any(f is not None for f in tls_files) and not target.tls:
            raise ValueError("l3.tls_* files need a rediss:// URL (TLS)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("l3.tls_cert_file and l3.tls_key_file go together")
        return self


class VllmConfig(_Frozen):
    """``[vllm]``: how the vLLM connector moves KV between kvtier and vLLM's blocks."""

    async_loads: bool = Field(default=True, description="load hits on kvtier's threads while vLLM steps other requests")
    load_threads: int = Field(default=2, gt=0, le=64, description="threads that load hits into vLLM's blocks")
    load_parts: int = Field(
        default=1, gt=0, le=64, description="a load is split into up to this many chunk-aligned parts, run at once"
    )
    load_deadline_s: float = Field(
        default=5.0, gt=0, description="a load still running after this long is cut short; vLLM recomputes the rest"
    )
    store_queue_bytes: PositiveBytes = Field(
        default=ByteSize(2 * 10**9),
        description="KV of finished requests waiting to be copied out of vLLM's blocks; beyond it stores are dropped",
    )
    quiet_idle_waits: bool = Field(
        default=False,
        description="on steps with nothing to compute (requests wait for loads), vLLM's processes wait for each "
        "other's messages asleep instead of spinning on them",
    )


class SecurityConfig(_Frozen):
    """``[security]``: the secret that signs chunks on shared tiers (node, l2, l3). See docs/security.md.

    The secret comes from a file (``secret_file``, whitespace stripped) or an
    environment variable (``secret_env``, its name here, never its value), at
    least 16 bytes. Rotation: set the new secret and list the previous ones in
    ``old_secret_files``/``old_secret_envs``: chunks they signed stay readable,
    new chunks are signed with the new one.
    """

    secret_file: Path | None = Field(default=None, description="file holding the chunk-signing secret")
    secret_env: str | None = Field(default=None, min_length=1, description="environment variable holding it")
    old_secret_files: tuple[Path, ...] = Field(default=(), description="previous secrets still accepted on read")
    old_secret_envs: tuple[str, ...] = Field(default=(), description="variables holding previous secrets")
    encrypt: bool = Field(default=False, description="also encrypt chunk bodies (the KV) on node, l2 and l3 (AES-GCM)")

    @field_validator("old_secret_files", "old_secret_envs", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """From a flag or the environment a list comes as one string: ``a,b`` (or a JSON list)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _one_source(self) -> SecurityConfig:
        if self.secret_file is not None and self.secret_env is not None:
            raise ValueError("give security.secret_file or security.secret_env, not both")
        if self.encrypt and self.secret_file is None and self.secret_env is None:
            raise ValueError("security.encrypt needs a secret (security.secret_file or secret_env)")
        if (self.old_secret_files or self.old_secret_envs) and self.secret_file is None and self.secret_env is None:
            raise ValueError("old secrets are listed but no current secret (security.secret_file or secret_env)")
        return self

    @property
    def configured(self) -> bool:
        return self.secret_file is not None or self.secret_env is not None


class EventsConfig(_Frozen):
    """``[events]``: publish each tier's chunk stores and removals as vLLM KV events over ZMQ. Off unless enabled.

    Only a process that writes the tiers publishes (vLLM's worker, not its scheduler). ``endpoint`` is
    bound (port 0: a free one); with ``connect`` it is connected instead (to a consumer's bound socket).
    Events carry token ids: bind beyond localhost only on a trusted network.
    """

    enabled: bool = False
    endpoint: str = Field(default="tcp://127.0.0.1:5557", pattern=r"^(tcp|ipc|inproc)://.+$")
    replay_endpoint: str | None = Field(default=None, pattern=r"^(tcp|ipc|inproc)://.+$")
    topic: str = Field(default="", description="first frame of every message (vLLM's default: empty)")
    connect: bool = False
    buffer_steps: int = Field(default=10_000, gt=0, description="batches kept for replay")
    max_queue: int = Field(default=100_000, gt=0, description="reports waiting for the publisher; beyond: dropped")
    hwm: int = Field(default=100_000, gt=0, description="ZMQ high-water mark of the PUB socket")


class AdminConfig(_Frozen):
    """``[admin]``: the admin HTTP API (lookup, pin/unpin, clear, stats, health) on its own port. Off unless enabled.

    Runs in the process that holds the engine (under ``kvtier serve``: vLLM's worker). A bearer
    token (from ``token_file`` or the variable ``token_env``; never inline) is required whenever
    ``host`` is not a loopback address: the server refuses to start otherwise.
    """

    enabled: bool = False
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8101, ge=0, le=65535)
    token_file: Path | None = None
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class RouterInstance(_Frozen):
    """One instance behind ``kvtier router``: its OpenAI URL, and where it publishes KV events / its admin API."""

    url: str = Field(pattern=r"^https?://.+$")
    events: str | None = Field(default=None, pattern=r"^(tcp|ipc)://.+$", description="its [events] endpoint")
    replay: str | None = Field(default=None, pattern=r"^(tcp|ipc)://.+$", description="its replay endpoint")
    admin: str | None = Field(default=None, pattern=r"^https?://.+$", description="its admin API (a fallback index)")


class RouterConfig(_Frozen):
    """``[router]``: ``kvtier router``, the KV-aware, load-aware front over several instances.

    An instance's score, in prompt tokens, is ``hit - beta * load``: ``hit`` the leading prompt tokens
    its own tiers hold (plus ``shared_credit`` times the further ones only the shared Redis tier holds),
    ``load`` the prefill tokens queued there (requests routed there still waiting for a first token,
    less their hits, less what the instance has done of them at its prefill rate, learned online from
    streamed first tokens) plus ``decode_tokens_per_request`` per decoding request.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    instances: list[RouterInstance] = Field(default_factory=list)
    policy: Literal["kvtier", "round_robin"] = "kvtier"
    beta: float = Field(default=1.0, ge=0, description="weight of an instance's queued work against a prefix hit")
    shared_credit: float = Field(default=0.5, ge=0, le=1, description="weight of tokens held only in l3")
    decode_tokens_per_request: int = Field(
        default=8, ge=0, description="a decoding request as prefill tokens (its token in the next prefill's step)"
    )
    sent_hint_s: float = Field(
        default=30.0, ge=0, description="a finished request's prompt counts as held there this long (0: never)"
    )
    sent_hint_block: int = Field(default=256, gt=0, description="such a hint counts in whole blocks (chunk_size)")
    sent_hint_max: int = Field(default=256, ge=0, description="prompts kept per instance as such hints (0: none)")
    rate_decay: float = Field(
        default=0.9, ge=0, lt=1, description="weight of the older samples in each instance's learned prefill rate"
    )
    local_media: list[str] = Field(default_factory=lambda: ["l1", "node", "l2"])
    shared_media: list[str] = Field(default_factory=lambda: ["l3"])
    stale_after_s: float = Field(default=30.0, gt=0, description="an index unrepaired after a gap this long: stale")
    health_interval_s: float = Field(default=1.0, gt=0)
    health_timeout_s: float = Field(default=1.0, gt=0)
    unhealthy_after: int = Field(default=2, gt=0, description="failed health checks in a row that drop an instance")
    tokenize_timeout_s: float = Field(default=2.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)


class PinsConfig(_Frozen):
    """Prefixes kept in ``l1``/``l2`` whatever the eviction policy (system prompts, few-shot blocks)."""

    max_bytes_per_tenant: PositiveBytes = Field(
        default=ByteSize(10**9), description="cap on the KV bytes one tenant may pin (raw size of the chunks)"
    )
    prefixes: tuple[tuple[int, ...], ...] = Field(
        default=(), description="token-id prefixes each engine pins for its tenant when it is built"
    )


class KvtierConfig(_Frozen):
    """Everything kvtier can be told. Immutable; build variants with ``model_copy(update=...)``."""

    model: str = Field(default="smollm2-135m", description="known model name or a Hugging Face folder")
    cache_dir: Path = Field(default_factory=default_cache_dir)
    chunk_size: int = Field(default=256, gt=0, le=1 << 16)
    hash: Literal["blake3", "sha256"] = "blake3"
    tenant: str | None = Field(default=None, min_length=1)
    store_partial: bool = Field(default=True, description="store the trailing partial chunk of a sequence")
    store_generated: bool = Field(default=True, description="also store the KV of generated tokens (HF adapter)")
    write_queue_bytes: PositiveBytes = ByteSize(10**9)
    store_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="OS niceness added to the threads that build and write stored chunks (the vLLM worker's store "
        "thread, the write-behind), so stores yield the CPU to the engine's forward pass; 0: the engine's priority",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    l1: L1Config = L1Config()
    node: NodeConfig = NodeConfig()
    l2: L2Config = L2Config()
    l3: L3Config = L3Config()
    vllm: VllmConfig = VllmConfig()
    security: SecurityConfig = SecurityConfig()
    events: EventsConfig = EventsConfig()
    admin: AdminConfig = AdminConfig()
    router: RouterConfig = RouterConfig()
    pins: PinsConfig = PinsConfig()

    @property
    def chunk_dir(self) -> Path:
        return self.l2.path if self.l2.path is not None else self.cache_dir / "chunks"

    @property
    def node_dir(self) -> Path:
        """The node tier's folder: ``node.path``, else ``/dev/shm/kvtier-<uid>`` (one per user)."""
        return self.node.path if self.node.path is not None else Path("/dev/shm") / f"kvtier-{os.getuid()}"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, origins: dict[str, str], origin: str) -> None:
    parts = [p for p in dotted.split(".")]
    if not all(parts):
        raise ConfigError(f"malformed config key {dotted!r} ({origin})")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted!r} ({origin}): {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    origins[dotted] = origin


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object at the top level")
    return data


def load_config(
    file: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> KvtierConfig:
    """Build the configuration from file, environment and overrides (that order of precedence).

    ``env`` defaults to ``os.environ``; ``overrides`` maps dotted keys
    (``"l1.max_bytes"``) to values, as the CLI's ``--set`` gives them.
    Raises ConfigError for unknown keys, bad values or an unreadable file.
    """
    environ = os.environ if env is None else env
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    path = file if file is not None else environ.get(ENV_CONFIG_FILE)
    if path:
        for dotted, value in _flatten(_read_file(Path(path))).items():
            _set_dotted(tree, dotted, value, origins, f"file {path}")
    for name, value in sorted(environ.items()):
        if name.startswith(ENV_PREFIX) and name not in ENV_SWITCHES:
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(tree, dotted, value, origins, f"env {name}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value, origins, f"flag {dotted}={_shown(dotted, value)}")
    try:
        return KvtierConfig.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            dotted = ".".join(str(p) for p in err["loc"])
            where = origins.get(dotted) or next(
                (src for key, src in origins.items() if key.startswith(dotted + ".")), "default"
            )
            reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"  {dotted}: {reason} (from {where})")
        raise ConfigError("invalid kvtier configuration:\n" + "\n".join(problems)) from None


def _shown(dotted: str, value: Any) -> str:
    """A value as error messages may show it: URLs with their passwords redacted."""
    if dotted.endswith("url") and isinstance(value, str):
        from kvtier.storage.urls import redact

        return redact(value)
    return str(value)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """Turn CLI ``KEY=VALUE`` strings into an overrides mapping; malformed pairs raise ConfigError."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out

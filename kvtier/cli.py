"""The ``kvtier`` command: serve, demo, stats, clear, model."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from rich.console import Console

from kvtier import maintenance
from kvtier.config import KvtierConfig, load_config, parse_overrides
from kvtier.errors import KvtierError
from kvtier.maintenance import PERSISTENT_TIERS


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML or JSON config file (also: KVTIER_CONFIG)")
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set l1.max_bytes=4GB (repeatable; beats file and env)",
    )
    common.add_argument("--model", help="shorthand for --set model=NAME_OR_FOLDER")
    common.add_argument("--cache-dir", help="shorthand for --set cache_dir=PATH")
    p = argparse.ArgumentParser(prog="kvtier", description="kvtier: a tiered prefix KV cache for LLM inference")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[common], help="ask two questions about a long document, cold then warm")
    demo.add_argument("--document", type=Path, help="a UTF-8 text file to ask about (default: Python's LICENSE.txt)")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    stats = sub.add_parser(
        "stats", parents=[common], help="show the persistent tiers (read-only: safe next to running engines)"
    )
    stats.add_argument("--json", action="store_true", help="print JSON")
    clear = sub.add_parser("clear", parents=[common], help="delete every chunk of the persistent tiers")
    clear.add_argument(
        "--tier",
        action="append",
        choices=PERSISTENT_TIERS,
        help="clear only this tier (repeatable; default: every enabled persistent tier)",
    )
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation (required without a terminal)")
    sub.add_parser("model", parents=[common], help="resolve (convert once) the configured model and print its folder")
    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run vLLM's OpenAI-compatible server with the kvtier connector",
        description="Run vLLM's OpenAI-compatible server with kvtier as its KV connector. "
        "Arguments after `--` go to vLLM unchanged.",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-model-len", type=int, default=4096)
    serve.add_argument(
        "--kv-cache-gib", type=float, help="vLLM's own KV memory in GiB (VLLM_CPU_KVCACHE_SPACE; default 4)"
    )
    serve.add_argument("--served-model-name", help="the model name clients send (default: --model)")
    serve.add_argument("--metrics-port", type=int, help="serve kvtier's Prometheus metrics on this port too")
    serve.add_argument("--no-kvtier", action="store_true", help="the same vLLM server without kvtier (a baseline)")
    serve.add_argument("--print-command", action="store_true", help="print the vLLM command and exit")
    serve.add_argument("vllm_args", nargs="*", help="extra vLLM arguments, after --")
    _admin_parser(sub)
    router = sub.add_parser(
        "router",
        parents=[common],
        help="an OpenAI-compatible, KV-aware and load-aware front over several instances",
        description="Route OpenAI requests over instances ([router] in the config, or --instance). "
        "--instance URL[,events=ENDPOINT][,replay=ENDPOINT][,admin=URL] (repeatable).",
    )
    router.add_argument("--instance", action="append", default=[], metavar="URL[,events=EP,replay=EP,admin=URL]")
    router.add_argument("--host", help="listen address (router.host)")
    router.add_argument("--port", type=int, help="listen port (router.port)")
    router.add_argument("--policy", choices=["kvtier", "round_robin"], help="router.policy")
    return p


def _instance(spec: str) -> dict[str, str]:
    url, *rest = spec.split(",")
    out = {"url": url}
    for part in rest:
        key, sep, value = part.partition("=")
        if not sep or key not in ("events", "replay", "admin"):
            raise KvtierError(f"--instance {spec!r}: expected URL[,events=EP][,replay=EP][,admin=URL]")
        out[key] = value
    return out


def _router(args: argparse.Namespace) -> None:
    import uvicorn

    from kvtier.config import RouterConfig
    from kvtier.errors import ConfigError
    from kvtier.router.proxy import create_app

    config = load_config(args.config, overrides=_overrides(args)).router
    update: dict = {}
    if args.instance:
        update["instances"] = [_instance(s) for s in args.instance]
    for key in ("host", "port", "policy"):
        if getattr(args, key) is not None:
            update[key] = getattr(args, key)
    try:
        config = RouterConfig.model_validate({**config.model_dump(), **update})
    except ValueError as exc:
        raise ConfigError(f"router configuration: {exc}") from exc
    if not config.instances:
        raise ConfigError("kvtier router needs instances: --instance URL (or [[router.instances]] in --config)")
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning")


def _admin_parser(sub: argparse._SubParsersAction) -> None:
    admin = sub.add_parser("admin", help="talk to a running server's admin API ([admin] enabled)")
    admin.add_argument("--url", default="http://127.0.0.1:8101", help="the admin API (default %(default)s)")
    admin.add_argument("--token-file", type=Path, help="file holding the bearer token")
    admin.add_argument("--token-env", help="environment variable holding the bearer token")
    ops = admin.add_subparsers(dest="admin_command", required=True)
    ops.add_parser("health", help="is it up; its tiers and models")
    ops.add_parser("stats", help="tier and engine counters")
    for name, what in (("lookup", "matched tokens per tier"), ("pin", "pin a prefix"), ("unpin", "unpin a prefix")):
        op = ops.add_parser(name, help=what)
        _prompt_args(op, required=True)
    clear = ops.add_parser("clear", help="remove chunks: --all, --tenant SALT (or --default-tenant), or a prefix")
    scope = clear.add_mutually_exclusive_group(required=True)
    scope.add_argument("--all", action="store_true", help="every chunk of the tiers")
    scope.add_argument("--tenant", metavar="CACHE_SALT", help="one tenant's chunks (a request cache_salt)")
    scope.add_argument("--default-tenant", action="store_true", help="the chunks of requests without a cache_salt")
    scope.add_argument("--prefix", action="store_true", help="the chunks covering --prompt/--token-ids")
    _prompt_args(clear, required=False)
    clear.add_argument("--tier", action="append", help="only this tier (repeatable)")


def _prompt_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--prompt", help="prompt text (the server tokenizes it)")
    src.add_argument("--token-ids", help="comma-separated token ids")
    p.add_argument("--model", help="the model name (checked by the server)")
    p.add_argument("--cache-salt", help="the tenant (a request cache_salt)")


def _admin(args: argparse.Namespace) -> None:
    from kvtier.admin.client import AdminClient
    from kvtier.security import load_secret

    try:
        secret = load_secret(args.token_file, args.token_env)
    except (OSError, ValueError) as exc:
        raise KvtierError(f"admin token: {exc}") from exc
    token = secret.value.decode() if secret is not None else None
    client = AdminClient(args.url, token)
    try:
        body: dict = {}
        if getattr(args, "prompt", None) is not None:
            body["prompt"] = args.prompt
        if getattr(args, "token_ids", None) is not None:
            try:
                body["token_ids"] = [int(t) for t in args.token_ids.split(",") if t.strip()]
            except ValueError as exc:
                raise KvtierError(f"--token-ids takes comma-separated integers: {exc}") from exc
        for key in ("model", "cache_salt"):
            if getattr(args, key, None) is not None:
                body[key] = getattr(args, key)
        cmd = args.admin_command
        if cmd == "health":
            out = client.health()
        elif cmd == "stats":
            out = client.stats()
        elif cmd == "lookup":
            out = client.lookup(body)
        elif cmd in ("pin", "unpin"):
            out = client.pin(body, pin=cmd == "pin")
        else:
            if args.tenant is not None:
                body |= {"scope": "tenant", "cache_salt": args.tenant}
            elif args.default_tenant:
                body["scope"] = "tenant"
            elif args.prefix:
                body["scope"] = "prefix"
            else:
                body["scope"] = "all"
            if args.tier:
                body["tiers"] = args.tier
            out = client.clear(body)
        print(json.dumps(out, indent=2))
    finally:
        client.close()


def _overrides(args: argparse.Namespace) -> dict:
    overrides = parse_overrides(args.overrides)
    if args.model:
        overrides["model"] = args.model
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    return overrides


def _config(args: argparse.Namespace) -> KvtierConfig:
    return load_config(args.config, overrides=_overrides(args))


def _serve(args: argparse.Namespace, config: KvtierConfig) -> None:
    from kvtier import serve

    options = serve.ServeOptions(
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        kvtier=not args.no_kvtier,
        served_model_name=args.served_model_name,
        metrics_port=args.metrics_port,
        vllm_args=tuple(args.vllm_args),
    )
    argv, env = serve.prepare(config, args.config, _overrides(args), options)
    if args.print_command:
        print(shlex.join(argv))
        return
    serve.run(argv, env)


def _stats(args: argparse.Namespace, config: KvtierConfig, console: Console) -> None:
    reports = maintenance.stats(config)
    if args.json:
        print(json.dumps({"tiers": [r.to_dict() for r in reports]}, indent=2))
        return
    if not reports:
        console.print("no persistent tier is enabled (node, l2, l3)")
    for r in reports:
        if r.entries is None:
            console.print(f"{r.name}: {r.where}: shared store, not counted here (ask the server, e.g. INFO memory)")
        else:
            budget = f"{r.max_bytes / 1e9:.1f} GB budget"
            console.print(f"{r.name}: {r.where}: {r.entries} chunks, {(r.used_bytes or 0) / 1e6:.1f} MB of {budget}")


def _clear(args: argparse.Namespace, config: KvtierConfig, console: Console) -> int:
    enabled = maintenance.enabled_tiers(config)
    chosen = list(dict.fromkeys(args.tier or enabled))
    for name in maintenance.PERSISTENT_TIERS:
        if name not in chosen:
            why = "not enabled" if name not in enabled else "not in --tier"
            console.print(f"{name}: left alone ({why})")
    if not chosen:
        return 0
    targets = "\n".join(f"  {name}: {maintenance.describe(config, name)}" for name in chosen)
    if not args.yes:
        if not sys.stdin.isatty():
            raise KvtierError(f"clear would delete every chunk of:\n{targets}\nstdin is not a terminal: pass --yes")
        if input(f"delete every chunk of:\n{targets}\n[y/N] ").strip().lower() != "y":
            console.print("nothing deleted")
            return 1
    for name, n in maintenance.clear(config, chosen).items():
        console.print(f"{name}: removed {n} chunks from {maintenance.describe(config, name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=False, soft_wrap=True)  # paths and URLs stay on one line
    try:
        if args.command == "admin":  # talks to a server: no local config
            _admin(args)
            return 0
        config = _config(args)
        logging.basicConfig(level=config.log_level, format="%(levelname)s %(name)s: %(message)s")
        if args.command == "serve":
            _serve(args, config)
        elif args.command == "router":
            _router(args)
        elif args.command == "demo":
            from kvtier.demo import run_demo

            run_demo(config, args.document, args.max_new_tokens, console)
        elif args.command == "stats":
            _stats(args, config, console)
        elif args.command == "clear":
            return _clear(args, config, console)
        elif args.command == "model":
            from kvtier.models import resolve_model

            print(resolve_model(config.model, config.cache_dir))
    except KvtierError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

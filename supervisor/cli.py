"""model-supervisor: the command line. `run` starts the daemon; the other commands talk to a running one."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .config import CONFIG_ENV, Config, ConfigError, find_llama_server, load_config, preflight

URL_ENV = "MODEL_SUPERVISOR_URL"
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"model-supervisor: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model-supervisor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--url", help=f"the daemon's URL (default: ${URL_ENV}, else the config's listen)")
        sub.add_argument("--config", help=f"config to read listen/admin token from (default: ${CONFIG_ENV} or ./models.toml)")
        return sub

    run = commands.add_parser("run", help="start the daemon in the foreground")
    run.add_argument("--config", help=f"path to models.toml (default: ${CONFIG_ENV}, else ./models.toml)")
    run.add_argument("--log-level", default=os.environ.get("MODEL_SUPERVISOR_LOG_LEVEL", "info"))
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check-config", help="validate a config and print what would run")
    check.add_argument("path")
    check.add_argument("--no-files", action="store_true", help="do not require the GGUF files and llama-server here")
    check.set_defaults(func=cmd_check_config)

    status = client("status", "what runs, loads and waits")
    status.add_argument("--json", action="store_true", help="print the raw /status document")
    status.set_defaults(func=cmd_status)

    load = client("load", "load a model and wait until it is ready")
    load.add_argument("model")
    load.set_defaults(func=cmd_load)

    unload = client("unload", "unload one model, or all")
    unload.add_argument("model", nargs="?")
    unload.set_defaults(func=cmd_unload)
    return parser


def config_path(given: str | None) -> Path:
    return Path(given or os.environ.get(CONFIG_ENV) or "models.toml")


# ---------------------------------------------------------------- run / check-config


def cmd_run(args: argparse.Namespace) -> int:
    from . import logs
    from .daemon import check_exposure, serve

    logs.configure(args.log_level)
    config = load_config(config_path(args.config))
    binary = find_llama_server(config)
    problems = preflight(config)
    if problems:
        raise ConfigError(problems, str(config_path(args.config)))
    check_exposure(config)
    return asyncio.run(serve(config, binary))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.path)
    problems: list[str] = []
    binary = "(not checked)"
    if not args.no_files:
        problems += preflight(config)
        try:
            binary = find_llama_server(config)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems, args.path)
    print(f"{args.path}: valid")
    print(f"listen {config.daemon.listen}   llama-server {binary}   ports {config.daemon.port_range[0]}-"
          f"{config.daemon.port_range[1]}   queue timeout {config.daemon.queue_timeout_s:g} s")
    print(describe_models(config))
    return EXIT_OK


def describe_models(config: Config) -> str:
    rows = [("MODEL", "GROUP", "TTL", "PRIO", "ALIASES", "FILE", "ARGS")]
    for name, model in config.models.items():
        group = config.group_of(name)
        flags = ",".join(f for f, on in (("swap", group.swap), ("exclusive", group.exclusive),
                                          ("persistent", group.persistent)) if on)  # fmt: skip
        ttl = "never" if not model.ttl_s else f"{model.ttl_s:g}s"
        size = f" ({model.model.stat().st_size / 2**20:.0f} MB)" if model.model.is_file() else ""
        rows.append((name, f"{model.group}[{flags}]", ttl, str(model.priority), ",".join(model.aliases) or "-",
                     f"{model.model}{size}", " ".join(model.args) or "-"))  # fmt: skip
    return table(rows)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# ---------------------------------------------------------------- client commands


class Unreachable(Exception):
    pass


def _client_settings(args: argparse.Namespace) -> tuple[str, str]:
    """The daemon's URL and the admin token to send, from flags, env, or the config file if there is one."""
    url = args.url or os.environ.get(URL_ENV)
    token_env = "MODEL_SUPERVISOR_ADMIN_TOKEN"
    path = config_path(args.config)
    if path.is_file():
        config = load_config(path)
        token_env = config.daemon.admin_token_env or token_env
        if not url:
            host, port = config.daemon.host, config.daemon.port
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    return (url or "http://127.0.0.1:8080").rstrip("/"), os.environ.get(token_env, "")


def call(args: argparse.Namespace, method: str, path: str, timeout: float = 30) -> tuple[int, Any]:
    url, token = _client_settings(args)
    request = urllib.request.Request(url + path, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except json.JSONDecodeError:
            return exc.code, {"error": {"message": body.decode(errors="replace")}}
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"the daemon at {url} is unreachable: {getattr(exc, 'reason', exc)}") from None


def _client_command(args: argparse.Namespace, method: str, path: str, timeout: float = 30) -> tuple[int, Any] | None:
    try:
        return call(args, method, path, timeout)
    except Unreachable as exc:
        print(f"model-supervisor: {exc}", file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    answer = _client_command(args, "GET", "/status")
    if answer is None:
        return EXIT_FAIL
    _, document = answer
    if args.json:
        print(json.dumps(document, indent=2))
        return EXIT_OK
    print(render_status(document))
    return EXIT_OK


def render_status(document: dict[str, Any]) -> str:
    rows = [("MODEL", "STATE", "PID", "PORT", "IN-FLIGHT", "QUEUED", "TTL LEFT", "LAST LOAD", "NOTE")]
    for name, model in document.get("models", {}).items():
        ttl = "-" if model.get("ttl_remaining_s") is None else f"{model['ttl_remaining_s']:.0f}s"
        load = "-" if model.get("last_load_ms") is None else f"{model['last_load_ms']} ms"
        note = (model.get("last_error") or "").splitlines()[0][:60] if model.get("last_error") else ""
        rows.append((name, model["state"], str(model.get("pid") or "-"), str(model.get("port") or "-"),
                     str(model.get("in_flight", 0)), str(model.get("queued", 0)), ttl, load, note))  # fmt: skip
    lines = [table(rows)]
    lines.append(f"gaming mode: {'on' if document.get('gaming_mode') else 'off'}")
    return "\n".join(lines)


def cmd_load(args: argparse.Namespace) -> int:
    answer = _client_command(args, "POST", f"/models/{args.model}/load", timeout=3600)
    if answer is None:
        return EXIT_FAIL
    status, body = answer
    if status != 200:
        print(f"model-supervisor: load {args.model} failed: {_message(body)}", file=sys.stderr)
        return EXIT_FAIL
    print(f"{args.model}: ready (loaded in {body.get('load_ms')} ms)")
    return EXIT_OK


def cmd_unload(args: argparse.Namespace) -> int:
    path = f"/models/{args.model}/unload" if args.model else "/unload"
    answer = _client_command(args, "POST", path, timeout=600)
    if answer is None:
        return EXIT_FAIL
    status, body = answer
    if status != 200:
        print(f"model-supervisor: unload failed: {_message(body)}", file=sys.stderr)
        return EXIT_FAIL
    print(f"{args.model or 'all models'}: unloaded")
    return EXIT_OK


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return str(body)


if __name__ == "__main__":
    sys.exit(main())

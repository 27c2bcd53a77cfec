"""model-supervisor: the command line. `run` starts the daemon; the other commands talk to a running one."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .config import CONFIG_ENV, Config, ConfigError, find_llama_server, load_config, preflight

URL_ENV = "MODEL_SUPERVISOR_URL"
EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_NOT_GRANTED = 0, 1, 2, 3


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
    except BrokenPipeError:  # `model-supervisor status | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model-supervisor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"model-supervisor {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--url", help=f"the daemon's URL (default: ${URL_ENV}, else the config's listen)")
        sub.add_argument("--config", help=f"config to read listen/admin token from (default: ${CONFIG_ENV}, else "
                                          f"./models.toml, else {INSTALLED_CONFIG})")
        return sub

    run = commands.add_parser("run", help="start the daemon in the foreground")
    run.add_argument("--config", help=f"path to models.toml (default: ${CONFIG_ENV}, else ./models.toml)")
    run.add_argument("--log-level", default=os.environ.get("MODEL_SUPERVISOR_LOG_LEVEL", "info"))
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check-config", help="validate a config and print what would run")
    check.add_argument("path", nargs="?", help="the config (default: as --config)")
    check.add_argument("--config", dest="config", help=f"the same as PATH (default: ${CONFIG_ENV}, else ./models.toml, "
                                                     f"else {INSTALLED_CONFIG})")
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

    gaming = client("gaming", "gaming mode: on, off, or status")
    gaming.add_argument("action", choices=["on", "off", "status"])
    gaming.set_defaults(func=cmd_gaming)

    lease = client("lease", "run a command while holding a GPU-memory lease (exit 3 if not granted)")
    lease.add_argument("--vram-mb", type=int, required=True, help="memory to hold, in MB")
    lease.add_argument("--owner", default=None, help="who holds it (default: the command's name)")
    lease.add_argument("--priority", type=int, default=50, help="idle models of lower priority are unloaded for it")
    lease.add_argument("--wait-s", type=float, default=30.0, help="how long to wait for the memory")
    lease.add_argument("--ttl-s", type=float, default=60.0, help="lease lifetime; renewed while the command runs")
    lease.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    lease.set_defaults(func=cmd_lease)

    usage = client("usage", "requests, tokens, local share and money saved (from the daemon, else its ledger file)")
    usage.add_argument("--days", type=float, default=7.0, help="today and the days before it (default 7)")
    usage.add_argument("--json", action="store_true", help="print the /usage document")
    usage.set_defaults(func=cmd_usage)

    models = commands.add_parser("models", help="the configured model files")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    stale = models_commands.add_parser("stale", help="model files unused for --days, and the disk they take "
                                                     "(reports only; deletes nothing)")  # fmt: skip
    stale.add_argument("--days", type=float, default=30.0, help="unused for at least this many days (default 30)")
    stale.add_argument("--config", help=f"path to models.toml (default: ${CONFIG_ENV}, else ./models.toml)")
    stale.add_argument("--json", action="store_true", help="print a JSON document")
    stale.set_defaults(func=cmd_models_stale)

    importer = commands.add_parser("import", help="print an equivalent models.toml for another tool's config "
                                                  "(what has no equivalent: comments at the top and stderr)")
    importer.add_argument("tool", choices=["llama-swap"], help="the tool the config is for")
    importer.add_argument("path", help="its config file (llama-swap: config.yaml)")
    importer.set_defaults(func=cmd_import)
    return parser


INSTALLED_CONFIG = Path("/etc/model-supervisor/models.toml")


def config_path(given: str | None) -> Path:
    """--config, else $MODEL_SUPERVISOR_CONFIG, else ./models.toml, else the installed host's config."""
    if given or os.environ.get(CONFIG_ENV):
        return Path(given or os.environ[CONFIG_ENV])
    local = Path("models.toml")
    if _exists(local) or not _exists(INSTALLED_CONFIG):
        return local
    return INSTALLED_CONFIG


def _exists(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a directory we may not enter: as good as absent
        return False


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("model-supervisor")
    except PackageNotFoundError:
        return "unknown"


def warn_unset_keys(config: Config) -> None:
    """A cloud target whose key variable is unset will be refused by its provider: say so before it matters."""
    for name, target in config.cloud.items():
        if target.api_key_env and not os.environ.get(target.api_key_env):
            print(f"model-supervisor: warning: cloud.{name}.api_key_env: ${target.api_key_env} is not set; requests "
                  f"to {name!r} will be sent without a key", file=sys.stderr)


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
    warn_unset_keys(config)
    return asyncio.run(serve(config, binary, config_path=str(config_path(args.config))))


def cmd_check_config(args: argparse.Namespace) -> int:
    args.path = str(args.path or config_path(args.config))
    config = load_config(args.path)
    warn_unset_keys(config)
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
        if model.model is None:  # a cmd model
            what, args = "cmd: " + " ".join(model.argv()[:1]), " ".join(model.argv()[1:]) or "-"
        else:
            size = f" ({model.model.stat().st_size / 2**20:.0f} MB)" if model.model.is_file() else ""
            what, args = f"{model.model}{size}", " ".join(model.args) or "-"
        rows.append((name, f"{model.group}[{flags}]", ttl, str(model.priority), ",".join(model.aliases) or "-",
                     what, args))  # fmt: skip
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
    if _exists(path):
        config = load_config(path)
        token_env = config.daemon.admin_token_env or token_env
        if not url:
            host, port = config.daemon.host, config.daemon.port
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    return (url or "http://127.0.0.1:8080").rstrip("/"), os.environ.get(token_env, "")


def call(args: argparse.Namespace, method: str, path: str, timeout: float = 30, body: Any = None) -> tuple[int, Any]:
    url, token = _client_settings(args)
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url + path, method=method, data=data)
    if body is not None:
        request.add_header("Content-Type", "application/json")
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


def _client_command(args: argparse.Namespace, method: str, path: str, timeout: float = 30,
                    body: Any = None) -> tuple[int, Any] | None:
    try:
        return call(args, method, path, timeout, body)
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
    rows = [("MODEL", "STATE", "PID", "PORT", "VRAM MB", "IN-FLIGHT", "QUEUED", "TTL LEFT", "LAST LOAD", "NOTE")]
    for name, model in document.get("models", {}).items():
        ttl = "-" if model.get("ttl_remaining_s") is None else f"{model['ttl_remaining_s']:.0f}s"
        load = "-" if model.get("last_load_ms") is None else f"{model['last_load_ms']} ms"
        note = (model.get("last_error") or "").splitlines()[0][:60] if model.get("last_error") else ""
        vram = f"{model.get('vram_mb')} ({model.get('vram_source', '?')})"
        rows.append((name, model["state"], str(model.get("pid") or "-"), str(model.get("port") or "-"), vram,
                     str(model.get("in_flight", 0)), str(model.get("queued", 0)), ttl, load, note))  # fmt: skip
    lines = [table(rows), ""]
    cached = [(name, model["prompt_cache"]) for name, model in document.get("models", {}).items()
              if model.get("prompt_cache")]
    if cached:
        lines.append("prompt cache: " + "; ".join(
            f"{name} {c['tokens']} tokens in {c['slots']} slot{'s' if c['slots'] != 1 else ''} "
            f"({c['bytes'] / 2**20:.1f} MB, saved {c['age_s']:.0f}s ago)" for name, c in cached))
    for device in document.get("memory", []):
        lines.append(f"memory: {device['device']} ({device['backend']}, budget on {device['pool']}): "
                     f"{device['used_mb']} of {device['total_mb']} MB used, {device['free_mb']} MB free")
        if "gtt_total_mb" in device:
            lines.append(f"  GTT {device['gtt_used_mb']} of {device['gtt_total_mb']} MB used"
                         + (f", VRAM {device['vram_used_mb']} of {device['vram_total_mb']} MB used"
                            if "vram_total_mb" in device else ""))  # fmt: skip
        lines.append(f"  models {device['models_mb']} MB, leases {device['leases_mb']} MB, "
                     f"other programs {device['foreign_mb']} MB, reserve {device['reserve_mb']} MB, "
                     f"available {device['available_mb']} MB")
    leases = document.get("leases", [])
    if leases:
        lease_rows = [("LEASE", "OWNER", "MB", "PRIORITY", "PID", "EXPIRES IN")]
        lease_rows += [(str(x["id"]), x["owner"], str(x["vram_mb"]), str(x["priority"]), str(x.get("pid") or "-"),
                        f"{x['expires_in_s']:.0f}s") for x in leases]  # fmt: skip
        lines += ["", table(lease_rows)]
    lines.append(f"gaming mode: {'on' if document.get('gaming_mode') else 'off'}")
    return "\n".join(lines)


def _admin_call(args: argparse.Namespace, what: str, method: str, path: str, timeout: float = 30,
                body: Any = None) -> dict[str, Any] | None:
    """Call the daemon; the answer's body on 200, else None after saying why on stderr."""
    answer = _client_command(args, method, path, timeout, body)
    if answer is None:
        return None
    status, document = answer
    if status != 200:
        print(f"model-supervisor: {what} failed: {_message(document)}", file=sys.stderr)
        return None
    return document


def cmd_load(args: argparse.Namespace) -> int:
    body = _admin_call(args, f"load {args.model}", "POST", f"/models/{args.model}/load", timeout=3600)
    if body is None:
        return EXIT_FAIL
    print(f"{args.model}: ready (loaded in {body.get('load_ms')} ms)")
    return EXIT_OK


def cmd_unload(args: argparse.Namespace) -> int:
    path = f"/models/{args.model}/unload" if args.model else "/unload"
    if _admin_call(args, "unload", "POST", path, timeout=600) is None:
        return EXIT_FAIL
    print(f"{args.model or 'all models'}: unloaded")
    return EXIT_OK


def cmd_gaming(args: argparse.Namespace) -> int:
    if args.action == "status":
        body = _admin_call(args, "gaming status", "GET", "/gaming-mode")
    else:
        body = _admin_call(args, f"gaming {args.action}", "POST", "/gaming-mode", body={"enabled": args.action == "on"})
    if body is None:
        return EXIT_FAIL
    print(f"gaming mode: {'on' if body['enabled'] else 'off'}")
    return EXIT_OK


def cmd_lease(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("model-supervisor lease: give the command after --", file=sys.stderr)
        return EXIT_CONFIG
    owner = args.owner or os.path.basename(command[0])
    # The lease is tied to this process: if the wrapper is killed outright, the daemon sees it die and releases.
    body = {"owner": owner, "vram_mb": args.vram_mb, "priority": args.priority, "pid": os.getpid(),
            "ttl_s": args.ttl_s, "wait_s": args.wait_s}  # fmt: skip
    try:
        status, answer = call(args, "POST", "/leases", timeout=args.wait_s + 30, body=body)
    except Unreachable as exc:
        print(f"model-supervisor lease: not granted: {exc}", file=sys.stderr)
        return EXIT_NOT_GRANTED
    if status != 201:
        print(f"model-supervisor lease: not granted: {_message(answer)}", file=sys.stderr)
        return EXIT_NOT_GRANTED
    lease = _HeldLease(answer["id"])
    stop_renewing = threading.Event()
    renewer = threading.Thread(target=_renew_until, args=(args, body, lease, args.ttl_s / 3, stop_renewing),
                               daemon=True)  # fmt: skip
    renewer.start()
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"model-supervisor lease: cannot run {command[0]}: {exc}", file=sys.stderr)
        _release(args, lease, stop_renewing)
        return 127
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, lambda signum, frame: child.send_signal(signum)) for signum in forwarded}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _release(args, lease, stop_renewing)
    return 128 - code if code < 0 else code  # killed by signal N: 128+N, as a shell reports it


LEASE_RETRY_S = 1.0  # while the lease is not held: how often to try again


class _HeldLease:
    """The lease the wrapper holds. Its id changes when a restarted daemon grants it again."""

    def __init__(self, lease_id: int):
        self.id = lease_id
        self.released = False
        self.lock = threading.Lock()


def _listed(args: argparse.Namespace, lease_id: int, pid: int) -> bool | None:
    """Whether the daemon lists lease `lease_id` as this process's; None if it does not say. A restarted daemon
    numbers leases from 1 again, so a renewal that succeeds may have renewed another holder's lease."""
    status, answer = call(args, "GET", "/leases", timeout=10)
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("leases"), list):
        return None
    return any(x.get("id") == lease_id and x.get("pid") == pid for x in answer["leases"] if isinstance(x, dict))


def _renew_until(args: argparse.Namespace, body: dict[str, Any], lease: _HeldLease, every_s: float,
                 stop: threading.Event) -> None:
    """Renew every every_s. When the daemon no longer knows the lease (it restarted, or the lease expired while
    it was unreachable), ask for it again with the same figures; until it is held again, retry every second and
    say so once."""
    said: str | None = None  # what was last said about trouble, so that each is said once

    def trouble(kind: str, text: str) -> None:
        nonlocal said
        if said != kind:
            print(f"model-supervisor lease: {text}", file=sys.stderr)
        said = kind

    pause = every_s
    while not stop.wait(pause):
        pause = min(every_s, LEASE_RETRY_S)  # until the lease is known to be held again
        lease_id = lease.id
        try:
            if _listed(args, lease_id, body["pid"]) is not False:
                status, answer = call(args, "POST", f"/leases/{lease_id}/renew", timeout=10)
                if status == 200:
                    if said is not None:
                        print(f"model-supervisor lease: the daemon answers again; lease {lease_id} still held",
                              file=sys.stderr)  # fmt: skip
                    said, pause = None, every_s
                    continue
                if status != 404:
                    trouble("refused", f"renewing lease {lease_id} failed: {_message(answer)}; retrying")
                    continue
            status, answer = call(args, "POST", "/leases", timeout=body["wait_s"] + 30, body=body)
        except Unreachable as exc:
            trouble("unreachable", f"{exc}; the command keeps running; retrying until the daemon is back")
            continue
        if status != 201:
            trouble("not_granted", f"lease {lease_id} is gone and cannot be taken again yet: {_message(answer)}; "
                                   "retrying")  # fmt: skip
            continue
        with lease.lock:
            lease.id, released = answer["id"], lease.released
        if released:  # the command ended meanwhile: nothing to hold it for
            _delete_lease(args, answer["id"])
            return
        print(f"model-supervisor lease: the daemon no longer knew lease {lease_id} (restarted, or the lease "
              f"expired); lease taken again (id {answer['id']})", file=sys.stderr)  # fmt: skip
        said, pause = None, every_s


def _release(args: argparse.Namespace, lease: _HeldLease, stop_renewing: threading.Event) -> None:
    stop_renewing.set()
    with lease.lock:
        lease.released = True
        lease_id = lease.id
    _delete_lease(args, lease_id)


def _delete_lease(args: argparse.Namespace, lease_id: int) -> None:
    try:
        call(args, "DELETE", f"/leases/{lease_id}", timeout=10)
    except Unreachable as exc:  # it expires on its own, or goes when the daemon sees this process exit
        print(f"model-supervisor lease: release failed: {exc}", file=sys.stderr)


# ---------------------------------------------------------------- usage ledger


def cmd_usage(args: argparse.Namespace) -> int:
    from . import ledger

    if not 0 < args.days <= 3660:
        print("model-supervisor usage: --days must be between 0 and 3660", file=sys.stderr)
        return EXIT_CONFIG
    path = config_path(args.config)
    config = load_config(path) if path.is_file() else None
    target = config.ledger.local_share_target if config else 0.7
    try:
        status, document = call(args, "GET", f"/usage?days={args.days:g}")
        source = f"the daemon at {_client_settings(args)[0]}"
        if status != 200:  # e.g. 503 ledger_unavailable: the file may still be there
            print(f"model-supervisor usage: the daemon answered {status}: {_message(document)}", file=sys.stderr)
            document = None
    except Unreachable as exc:
        print(f"model-supervisor usage: {exc}; reading the ledger file", file=sys.stderr)
        document = None
    if document is None:
        if config is None:
            print(f"model-supervisor usage: no config at {path} to find the ledger in (give --config)",
                  file=sys.stderr)  # fmt: skip
            return EXIT_FAIL
        file = ledger.ledger_path(config)
        try:
            connection = ledger.open_readonly(file)
        except FileNotFoundError:
            print(f"no usage recorded yet (no ledger at {file})")
            return EXIT_OK
        except (sqlite3.Error, ledger.LedgerError) as exc:
            print(f"model-supervisor usage: cannot read {file}: {exc}", file=sys.stderr)
            return EXIT_FAIL
        try:
            document = ledger.usage_from(connection, args.days)
        finally:
            connection.close()
        source = str(file)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(render_usage(document, target, source))
    return EXIT_OK


def render_usage(doc: dict[str, Any], target: float, source: str) -> str:
    daily = doc.get("daily") or []
    span = f" ({daily[0]['date']} to {daily[-1]['date']})" if daily else ""
    share = doc.get("local_share")
    if share is None:
        share_text = f"-  (no local or cloud requests; target {target:.0%})"
    else:
        verdict = "met" if share >= target else "below"
        share_text = f"{share:.0%}  (target {target:.0%}: {verdict})"
    return "\n".join([
        f"usage over {_days(doc['days'])}{span}, from {source}",
        f"requests     {doc['requests']:,}  (local {doc['local']:,}, cloud {doc['cloud']:,}, "
        f"rejected {doc['rejected']:,})",
        f"tokens       {doc['tokens_in']:,} in, {doc['tokens_out']:,} out",
        f"local share  {share_text}",
        f"cloud spend  {_usd(doc['cloud_cost_usd'])}",
        f"saved        {_usd(doc['saved_usd'])}  (what the local requests would have cost in the cloud)",
    ])  # fmt: skip


def _days(days: float) -> str:
    return f"{days:g} day{'' if days == 1 else 's'}"


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4f}"


def cmd_models_stale(args: argparse.Namespace) -> int:
    from . import ledger

    if args.days <= 0:
        print("model-supervisor models stale: --days must be above 0", file=sys.stderr)
        return EXIT_CONFIG
    config = load_config(config_path(args.config))
    file = ledger.ledger_path(config)
    try:
        connection = ledger.open_readonly(file)
    except FileNotFoundError:
        last_used, began, file_used = {}, None, None
    except (sqlite3.Error, ledger.LedgerError) as exc:
        print(f"model-supervisor models stale: cannot read {file} ({exc}); using access times", file=sys.stderr)
        last_used, began, file_used = {}, None, None
    else:
        try:
            last_used, began, file_used = ledger.last_used_from(connection), ledger.created_at_from(connection), file
        finally:
            connection.close()
    report = stale_files(config, last_used, began, args.days, time.time())
    report["ledger"] = None if file_used is None else str(file_used)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_stale(report))
    return EXIT_OK


def stale_files(config: Config, last_used: dict[str, float], ledger_began: float | None, days: float,
                now: float) -> dict[str, Any]:
    """The configured model files (every shard of a split GGUF) not used for `days`.

    Last use: the ledger's last request for a model using the file; without one, the file's atime, but no later
    than the ledger's start (the daemon reads GGUF headers at start, which refreshes atimes without any use).
    Never earlier than the file's mtime: a file just downloaded or replaced is not stale."""
    from .estimate import shard_paths

    users: dict[Path, list[str]] = {}
    for name, model in config.models.items():
        for shard in shard_paths(model.model) if model.model is not None else []:
            users.setdefault(shard, []).append(name)
    cutoff = now - days * 86400
    stale, missing = [], []
    for shard, names in users.items():
        try:
            stat = shard.stat()
        except OSError:
            missing.append(str(shard))
            continue
        requested = [last_used[n] for n in names if n in last_used]
        if requested:
            used, source = max(requested), "ledger"
        else:
            used, source = stat.st_atime, "atime"
            if ledger_began is not None and ledger_began < used:
                used, source = ledger_began, "ledger_start"
        if stat.st_mtime > used:
            used, source = stat.st_mtime, "mtime"
        if used < cutoff:
            stale.append({"path": str(shard), "models": names, "bytes": stat.st_size, "last_used": used,
                          "source": source, "age_days": round((now - used) / 86400, 1)})  # fmt: skip
    stale.sort(key=lambda entry: entry["last_used"])
    return {"days": days, "files": stale, "total_bytes": sum(e["bytes"] for e in stale), "missing": missing}


def render_stale(report: dict[str, Any]) -> str:
    lines = []
    if report["files"]:
        rows = [("MODEL", "LAST USED", "FROM", "SIZE", "FILE")]
        for entry in report["files"]:
            when = time.strftime("%Y-%m-%d", time.localtime(entry["last_used"]))
            source = {"ledger_start": "no request since ledger began", "mtime": "modified"}
            rows.append((",".join(entry["models"]), f"{when} ({entry['age_days']:g} days ago)",
                         source.get(entry["source"], entry["source"]), _size(entry["bytes"]), entry["path"]))
        lines += [table(rows), ""]
    count = len(report["files"])
    lines.append(f"{count} file{'s' if count != 1 else ''} unused for {_days(report['days'])} or more; removing "
                 f"{'them' if count != 1 else 'it'} would free {_size(report['total_bytes'])}. Nothing was deleted.")
    if report["ledger"] is None:
        lines.append("(no usage ledger found: last use is the files' access time)")
    for path in report["missing"]:
        lines.append(f"missing: {path}")
    return "\n".join(lines)


def _size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------- import


def cmd_import(args: argparse.Namespace) -> int:
    from . import llamaswap

    try:
        toml, warnings = llamaswap.convert_file(args.path)
    except llamaswap.LlamaSwapError as exc:
        print(f"model-supervisor import: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in warnings:
        print(f"model-supervisor import: {warning}", file=sys.stderr)
    sys.stdout.write(toml)
    return EXIT_OK


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return str(body)


if __name__ == "__main__":
    sys.exit(main())

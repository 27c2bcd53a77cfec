"""model-supervisor: the command line. `run` starts the daemon; the other commands talk to a running one."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import CONFIG_ENV, Config, ConfigError, find_llama_server, load_config, preflight

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

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
    status.add_argument("--json", action="store_true", help="print the raw /status document (with --watch: each "
                                                            "document, one per line)")
    status.add_argument("--watch", action="store_true", help="follow /events: print loads, swaps, unloads, "
                                                             "waits, leases and gaming changes as they happen, "
                                                             "one line each, until Ctrl-C")
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
    from .daemon import check_exposure, run, serve

    logs.configure(args.log_level)
    config = load_config(config_path(args.config))
    binary = find_llama_server(config)
    problems = preflight(config)
    if problems:
        raise ConfigError(problems, str(config_path(args.config)))
    check_exposure(config)
    warn_unset_keys(config)
    return run(serve(config, binary, config_path=str(config_path(args.config))))  # on uvloop where installed


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
    from rich.text import Text

    console = make_console()
    emit(console, Text(f"{args.path}: valid"),
         Text(f"listen {config.daemon.listen}   llama-server {binary}   ports {config.daemon.port_range[0]}-"
              f"{config.daemon.port_range[1]}   queue timeout {config.daemon.queue_timeout_s:g} s"),
         *describe_models(config, console.width))  # fmt: skip
    return EXIT_OK


def describe_models(config: Config, width: int | None = None) -> list[Any]:
    """One row per model; when the file and arguments do not fit `width` beside the rest, they go below the table,
    two indented lines per model."""
    from rich.padding import Padding
    from rich.text import Text

    rows = []
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
    headers = ("MODEL", "GROUP", "TTL", "PRIO", "ALIASES", "FILE", "ARGS")
    natural = sum(max(len(cell) for cell in column) for column in zip(headers, *rows)) + 2 * (len(headers) - 1)
    below = width is not None and natural > width
    table = new_table(*((header, {"no_wrap": True}) for header in headers[:5 if below else 7]))
    details: list[Any] = []
    for row in rows:
        table.add_row(*row[:5 if below else 7])
        if below:
            details += [Text(row[0], style="bold"),
                        Padding(Text(f"file: {row[5]}", overflow="fold"), (0, 0, 0, 2), expand=False),
                        Padding(Text(f"args: {row[6]}", overflow="fold"), (0, 0, 0, 2), expand=False)]
    return [table, *([Text("")] + details if details else [])]


# ---------------------------------------------------------------- terminal output (rich)
# On a terminal, tables fit its width ($COLUMNS, else the terminal's own; the columns that matter first, rich wraps
# or shortens the rest) and states are coloured, unless $NO_COLOR is set. In a pipe there is no width to fit and
# no colour: lines stay whole for grep and scripts ($COLUMNS is not looked at there: shells and readline export
# it for the terminal they run in). Console markup is off: an error text is printed as it is, brackets and all.

STATE_STYLES = {"ready": "green", "loading": "yellow", "unloading": "yellow", "failed": "bold red", "unloaded": "dim"}
ROUTE_STYLES = {"local": "green", "queued": "yellow", "cloud": "cyan", "rejected": "red"}
UNBOUNDED_WIDTH = 100_000
_TRAILING_BLANKS = re.compile(r"[ \t]+((?:\x1b\[[0-9;]*m)*)$", re.MULTILINE)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed
        return False


def make_console(stderr: bool = False) -> Console:
    from rich.console import Console

    terminal = _isatty(sys.stderr if stderr else sys.stdout)
    width = None if terminal else UNBOUNDED_WIDTH
    colour = terminal and not os.environ.get("NO_COLOR")
    return Console(stderr=stderr, width=width, color_system="auto" if colour else None, force_terminal=terminal,
                   markup=False, emoji=False, highlight=False)  # fmt: skip


def emit(console: Console, *renderables: Any) -> None:
    """Print, without the blanks rich pads table cells with at the end of a line."""
    with console.capture() as captured:
        for renderable in renderables:
            console.print(renderable)
    console.file.write(_TRAILING_BLANKS.sub(r"\1", captured.get()))
    console.file.flush()


def new_table(*columns: tuple[str, dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for header, options in columns:
        table.add_column(header, **options)
    return table


def _duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


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
    if args.watch:
        return cmd_watch(args)
    answer = _client_command(args, "GET", "/status")
    if answer is None:
        return EXIT_FAIL
    _, document = answer
    if args.json:
        print(json.dumps(document, indent=2))
        return EXIT_OK
    console = make_console()
    emit(console, *render_status(document, console.width))
    return EXIT_OK


def render_status(document: dict[str, Any], width: int = UNBOUNDED_WIDTH) -> list[Any]:
    """The /status document for a person: the models' table (the columns that fit `width`), then each model's
    whole last error, the latest loads and unloads, prompt caches, memory, leases and gaming mode."""
    from rich.padding import Padding
    from rich.text import Text

    models = document.get("models", {})
    longest = max((len(name) for name in models), default=5)
    columns: list[tuple[str, dict[str, Any]]] = [
        ("MODEL", {"min_width": min(longest, 24), "overflow": "fold"}),
        ("STATE", {"no_wrap": True}),
        ("ROUTE", {"no_wrap": True}),
        ("VRAM MB", {}),
        ("IN/QUEUED", {"no_wrap": True}),
        ("TTL LEFT", {"no_wrap": True}),
    ]
    # What fits: the first columns always (73 characters with a 16-character name); then the note (else it goes
    # below the table, one line per model), the last load time, recent latency, and the process.
    wide = {"note": width >= 110, "last_load": width >= 120, "latency": width >= 130, "process": width >= 150}
    if wide["last_load"]:
        columns.append(("LAST LOAD", {"no_wrap": True}))
    if wide["latency"]:
        columns += [("TTFT P50", {"no_wrap": True}), ("TOK/S", {"no_wrap": True})]
    if wide["process"]:
        columns += [("PID", {"no_wrap": True}), ("PORT", {"no_wrap": True})]
    if wide["note"]:
        columns.append(("NOTE", {"overflow": "fold", "ratio": 1, "min_width": 20}))
    table = new_table(*columns)
    notes: list[Any] = []
    for name, model in models.items():
        state = model["state"]
        progress = model.get("load_progress")
        shown_state = f"{state} {progress:.0%}" if state == "loading" and progress is not None else state
        if state == "ready" and (model.get("waiting_for") or "").startswith("draining"):
            shown_state = "draining"  # still serving, but on its way out: not a plain "ready"
        route = model.get("route") or "-"
        row: list[Any] = [
            name, Text(shown_state, style=STATE_STYLES.get(shown_state.split()[0], "yellow")),
            Text(route, style=ROUTE_STYLES.get(route, "")),
            f"{model.get('vram_mb')} ({model.get('vram_source', '?')})",
            f"{model.get('in_flight', 0)}/{model.get('queued', 0)}",
            "-" if model.get("ttl_remaining_s") is None else f"{model['ttl_remaining_s']:.0f}s",
        ]  # fmt: skip
        if wide["last_load"]:
            row.append("-" if model.get("last_load_ms") is None else f"{model['last_load_ms']} ms")
        if wide["latency"]:
            latency = model.get("latency") or {}
            rate = latency.get("tokens_per_s")
            row += [_duration(latency.get("ttft_p50_ms")), "-" if rate is None else f"{rate:g}"]
        if wide["process"]:
            row += [str(model.get("pid") or "-"), str(model.get("port") or "-")]
        note = _status_note(model, with_error=wide["note"])
        if wide["note"]:
            row.append(note or "-")
        elif note:
            notes.append(Text.assemble((name, "bold"), f": {note}"))
        table.add_row(*row)
    out: list[Any] = [table, *notes]
    for name, model in models.items():  # the whole cause, every line of it: it is what the operator needs
        if model.get("last_error"):
            title = f"{name} failed:" if model["state"] == "failed" else f"{name}: last error (now {model['state']}):"
            out += [Text(""), Text(title, style="bold red" if model["state"] == "failed" else "bold"),
                    Padding(Text(model["last_error"].rstrip("\n"), overflow="fold"), (0, 0, 0, 2), expand=False)]
    recent = document.get("timeline") or []
    if recent:
        out += [Text(""), Text("recent:", style="bold")]
        for entry in recent[-5:]:
            kind, style, text = timeline_event(entry)
            out.append(Text.assemble(f"  {_clock(entry.get('at'))}  ", (f"{kind:<9}", style), f" {text}"))
    lines: list[str] = []  # a line that starts with two blanks is indented, wrapped lines too
    cached = [(name, model["prompt_cache"]) for name, model in models.items() if model.get("prompt_cache")]
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
    out.append(Text(""))
    for line in lines:
        indent = len(line) - len(line.lstrip(" "))
        out.append(Padding(Text(line.lstrip(" ")), (0, 0, 0, indent), expand=False) if indent else Text(line))
    leases = document.get("leases", [])
    if leases:
        lease_table = new_table(("LEASE", {}), ("OWNER", {"overflow": "fold"}), ("MB", {}), ("PRIORITY", {}),
                                ("PID", {}), ("EXPIRES IN", {}))  # fmt: skip
        for x in leases:
            lease_table.add_row(str(x["id"]), x["owner"], str(x["vram_mb"]), str(x["priority"]),
                                str(x.get("pid") or "-"), f"{x['expires_in_s']:.0f}s")  # fmt: skip
        out += [Text(""), lease_table]
    gaming = bool(document.get("gaming_mode"))
    out.append(Text.assemble("gaming mode: ", ("on", "bold yellow") if gaming else "off"))
    return out


def _status_note(model: dict[str, Any], with_error: bool = True) -> str:
    """Why a model waits or how its load goes, in words; the first line of its error (all of it is below)."""
    notes = []
    if model.get("waiting_for") and model["waiting_for"] != "loading":
        notes.append(model["waiting_for"])
    if model["state"] == "loading":
        if model.get("load_progress_basis"):
            notes.append(model["load_progress_basis"])
        if model.get("eta_ms"):
            notes.append(f"ready in about {_duration(model['eta_ms'])}")
    if model.get("last_error"):
        if with_error:
            notes.append("error: " + model["last_error"].splitlines()[0][:60] + " (below)")
    elif model["state"] == "unloaded" and isinstance(model.get("last_stop"), dict):
        notes.append(f"last stop: {model['last_stop'].get('cause')}")
    return "; ".join(notes)


def _clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at if at is not None else time.time()))


def timeline_event(entry: dict[str, Any]) -> tuple[str, str, str]:
    """One /status timeline entry, for a person: (what, its colour, the rest)."""
    model, cause, event = entry.get("model", "?"), entry.get("cause") or "-", entry.get("event")
    if event == "loaded":
        if entry.get("displaced"):
            return "swapped", "green", (f"{', '.join(entry['displaced'])} -> {model} in "
                                        f"{_duration(entry.get('swap_ms'))} ({cause}; loading {model} took "
                                        f"{_duration(entry.get('ms'))})")
        return "loaded", "green", f"{model} in {_duration(entry.get('ms'))} ({cause})"
    if event == "unloaded":
        return "unloaded", "cyan", f"{model} ({cause}; stopped in {_duration(entry.get('ms'))})"
    if event == "load_failed":
        return "failed", "bold red", f"{model} did not load: {cause}"
    if event == "crashed":
        return "crashed", "bold red", f"{model}: {cause}"
    return str(event), "", f"{model} ({cause})"


# ---------------------------------------------------------------- /events: the live document


class EventStream:
    """GET /events, read as it arrives: iterating yields each `status` event's document and ends with the stream.
    close() may come from another thread: it unblocks a read in progress."""

    def __init__(self, args: argparse.Namespace, timeout: float = 40):  # the daemon sends a keep-alive every 15 s
        import http.client
        import urllib.parse

        self.url, token = _client_settings(args)
        parts = urllib.parse.urlsplit(self.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        headers = {"Accept": "text/event-stream"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.connection = kind(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
        try:
            self.connection.request("GET", parts.path.rstrip("/") + "/events", headers=headers)
            self.response = self.connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unreachable(f"the daemon at {self.url} is unreachable: {exc}") from None
        if self.response.status != 200:
            self.close()
            raise Unreachable(f"the daemon at {self.url} answered {self.response.status} to GET /events")

    def __iter__(self) -> Any:
        event, data = "message", []
        try:
            for raw in self.response:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif not line:
                    if event == "status" and data:
                        yield json.loads("\n".join(data))
                    event, data = "message", []
        except Exception as exc:  # the socket, http.client's chunk reader (also after close()), the JSON
            raise Unreachable(f"the connection to {self.url} was lost: {exc or type(exc).__name__}") from None

    def close(self) -> None:
        sock = self.connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.connection.close()


class _Follower(threading.Thread):
    """Keeps the latest /events document (and when it came) for a foreground loop; reconnects when it drops."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(daemon=True)
        self.args = args
        self.latest: dict[str, Any] | None = None
        self.received = 0.0  # time.monotonic() of the latest
        self.stopped = threading.Event()
        self.stream: EventStream | None = None

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.stream = EventStream(self.args)
                if self.stopped.is_set():
                    break
                for document in self.stream:
                    self.latest, self.received = document, time.monotonic()
            except Exception:  # noqa: BLE001 - progress is a nicety: without it the load still goes on
                pass
            finally:
                if self.stream is not None:
                    self.stream.close()
            self.stopped.wait(1.0)

    def stop(self) -> None:
        self.stopped.set()
        if self.stream is not None:
            self.stream.close()
        self.join(2)


def load_progress_now(model: dict[str, Any], age_s: float) -> float | None:
    """The document's load_progress, carried forward by the time since it came (the daemon sends a document when
    something changes, not as a load goes on): eta_ms says how fast it moves."""
    progress = model.get("load_progress")
    if progress is None:
        return None
    if model.get("eta_ms"):
        progress += age_s * 1000 * (1 - progress) / model["eta_ms"]
    return min(0.99, progress)


def _load_phase(model: dict[str, Any]) -> str | None:
    """Where a load stands, in words (None: nothing to say yet)."""
    if model["state"] == "loading":
        basis = model.get("load_progress_basis")
        if model.get("load_progress") is None:
            return "loading (never loaded before)" if basis and basis.startswith("never loaded") else "loading"
        return f"loading ({basis})" if basis else "loading"
    if model.get("waiting_for"):
        return f"waiting: {model['waiting_for']}"
    return None


class _LoadBar:
    """A progress bar on a terminal: by load_progress, or a spinner when the model was never loaded before."""

    def __init__(self, console: Console, model: str):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)  # fmt: skip
        self.model = model
        self.task = self.progress.add_task(f"{model}: asking the daemon", total=None)
        self.progress.start()

    def show(self, model: dict[str, Any] | None, age_s: float) -> None:
        if model is None:
            return
        phase = _load_phase(model)
        fraction = load_progress_now(model, age_s) if model["state"] == "loading" else None
        if phase is not None:
            self.progress.update(self.task, description=f"{self.model}: {phase}", total=None if fraction is None else 1,
                                 completed=fraction or 0)  # fmt: skip

    def close(self) -> None:
        self.progress.stop()


class _LoadLines:
    """Plain lines when stderr is not a terminal: each change of phase, and every quarter of a load."""

    def __init__(self, console: Console, model: str):
        self.console, self.model = console, model
        self.said: tuple[str, int] | None = None

    def show(self, model: dict[str, Any] | None, age_s: float) -> None:
        if model is None:
            return
        phase = _load_phase(model)
        if phase is None:
            return
        fraction = load_progress_now(model, age_s) if model["state"] == "loading" else None
        quarter = -1 if fraction is None else int(fraction * 4)
        if self.said is not None and self.said[0] == phase:
            if quarter > self.said[1]:
                self.console.print(f"{self.model}: loading {quarter * 25}%")
                self.said = (phase, quarter)
            return
        self.console.print(f"{self.model}: {phase}" + (f" {fraction:.0%}" if fraction is not None else ""))
        self.said = (phase, quarter)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- status --watch


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow /events and print what happens, one line each, until Ctrl-C (or each document, with --json)."""
    console = make_console()
    try:
        stream = EventStream(args)
    except Unreachable as exc:
        print(f"model-supervisor: {exc}", file=sys.stderr)
        return EXIT_FAIL
    previous: dict[str, Any] | None = None
    lost: str | None = None
    try:
        while True:
            try:
                for document in stream:
                    if lost is not None and not args.json:
                        _watch_line(console, "connected", "green", f"to {stream.url} again")
                    lost = None
                    if args.json:
                        print(json.dumps(document), flush=True)
                    else:
                        for kind, style, text in watch_events(previous, document, stream.url):
                            _watch_line(console, kind, style, text)
                    previous = document
                raise Unreachable(f"the daemon at {stream.url} ended the stream")
            except Unreachable as exc:
                stream.close()
                if lost is None and not args.json:
                    _watch_line(console, "lost", "bold red", f"{exc}; reconnecting")
                lost = str(exc)
            while True:
                time.sleep(1.0)
                try:
                    stream = EventStream(args)
                    break
                except Unreachable:
                    continue
    except KeyboardInterrupt:
        stream.close()
        return EXIT_OK


def _watch_line(console: Console, kind: str, style: str, text: str, at: float | None = None) -> None:
    from rich.text import Text

    emit(console, Text.assemble(f"{_clock(at)}  ", (f"{kind:<9}", style), f" {text}"))


def watch_events(previous: dict[str, Any] | None, document: dict[str, Any],
                 url: str) -> list[tuple[str, str, str]]:  # fmt: skip
    """What changed from `previous` to `document`, as (what, colour, the rest) lines; the first document gets one
    line that says what runs."""
    models = document.get("models", {})
    leases = {lease["id"]: lease for lease in document.get("leases", [])}
    if previous is None:
        running = [f"{name} {m['state']}" for name, m in models.items() if m["state"] != "unloaded"]
        return [("watching", "bold", f"{url}: {', '.join(running) or 'no model loaded'}; gaming mode "
                                     f"{'on' if document.get('gaming_mode') else 'off'}; {len(leases)} "
                                     f"lease{'' if len(leases) == 1 else 's'} (Ctrl-C to stop)")]
    lines: list[tuple[str, str, str]] = []
    seen = {(e.get("at"), e.get("model"), e.get("event")) for e in previous.get("timeline") or []}
    for entry in document.get("timeline") or []:
        if (entry.get("at"), entry.get("model"), entry.get("event")) not in seen:
            lines.append(timeline_event(entry))
    before = previous.get("models", {})
    for name, model in models.items():
        old = before.get(name)
        if old is None:
            lines.append(("added", "bold", f"{name} (config reloaded)"))
            continue
        if model["state"] == "loading" and old["state"] != "loading":
            phase = _load_phase(model) or "loading"
            eta = f", ready in about {_duration(model['eta_ms'])}" if model.get("eta_ms") else ""
            lines.append(("loading", "yellow", f"{name}{phase.removeprefix('loading')}{eta}"))
        waiting = model.get("waiting_for")
        if waiting and waiting != old.get("waiting_for") and waiting != "loading":
            if waiting.startswith("draining:"):
                lines.append(("draining", "yellow", f"{name}: {waiting.removeprefix('draining:').strip()}"))
            else:
                lines.append(("waiting", "yellow", f"{name}: {waiting}"))
    for name in before:
        if name not in models:
            lines.append(("removed", "bold", f"{name} (config reloaded)"))
    old_leases = {lease["id"]: lease for lease in previous.get("leases", [])}
    for lease_id, lease in leases.items():
        if lease_id not in old_leases:
            lines.append(("lease", "magenta", f"{lease_id} granted: {lease['owner']} holds {lease['vram_mb']} MB "
                                              f"(priority {lease['priority']}, pid {lease.get('pid') or '-'}, "
                                              f"ttl {lease.get('ttl_s', 0):g}s)"))
    for lease_id, lease in old_leases.items():
        if lease_id not in leases:
            lines.append(("lease", "magenta", f"{lease_id} released: {lease['owner']}'s {lease['vram_mb']} MB"))
    if bool(document.get("gaming_mode")) != bool(previous.get("gaming_mode")):
        on = bool(document.get("gaming_mode"))
        lines.append(("gaming", "bold yellow" if on else "bold", f"gaming mode {'on' if on else 'off'}"))
    return lines


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
    """POST the load and wait for its answer; meanwhile show how it goes (from /events) on stderr: a progress bar
    on a terminal, plain lines otherwise."""
    answer: dict[str, Any] = {}

    def post() -> None:
        try:
            answer["reply"] = call(args, "POST", f"/models/{args.model}/load", timeout=3600)
        except Unreachable as exc:
            answer["unreachable"] = exc

    poster = threading.Thread(target=post, daemon=True)
    poster.start()
    follower = _Follower(args)
    follower.start()
    console = make_console(stderr=True)
    view = _LoadBar(console, args.model) if console.is_terminal else _LoadLines(console, args.model)
    try:
        while poster.is_alive():
            poster.join(0.1)
            document = follower.latest
            if document is not None:
                view.show(document.get("models", {}).get(args.model), time.monotonic() - follower.received)
    finally:
        follower.stop()
        view.close()
    if "unreachable" in answer:
        print(f"model-supervisor: {answer['unreachable']}", file=sys.stderr)
        return EXIT_FAIL
    status, body = answer["reply"]
    if status != 200:
        print(f"model-supervisor: load {args.model} failed: {_message(body)}", file=sys.stderr)
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
        from rich.text import Text

        emit(make_console(), *(Text(line) for line in render_usage(document, target, source).splitlines()))
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
        console = make_console()
        emit(console, *render_stale(report, console.width))
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


def render_stale(report: dict[str, Any], width: int | None = None) -> list[Any]:
    """A table of the stale files; when it does not fit `width`, one block per file: its path, then the rest."""
    from rich.padding import Padding
    from rich.text import Text

    out: list[Any] = []
    source = {"ledger_start": "no request since ledger began", "mtime": "modified"}
    rows = [(",".join(e["models"]), f"{time.strftime('%Y-%m-%d', time.localtime(e['last_used']))} "
             f"({e['age_days']:g} days ago)", source.get(e["source"], e["source"]), _size(e["bytes"]), e["path"])
            for e in report["files"]]  # fmt: skip
    if rows:
        headers = ("MODEL", "LAST USED", "FROM", "SIZE", "FILE")
        natural = sum(max(len(cell) for cell in column) for column in zip(headers, *rows)) + 2 * (len(headers) - 1)
        if width is None or natural <= width:
            table = new_table(*((header, {"no_wrap": True}) for header in headers))
            for row in rows:
                table.add_row(*row)
            out.append(table)
        else:
            for models, used, why, size, path in rows:
                out += [Text(path, style="bold", overflow="fold"),
                        Padding(Text(f"{models} · {size} · last used {used}, {why}"), (0, 0, 0, 2), expand=False)]
        out.append(Text(""))
    lines = []
    count = len(report["files"])
    lines.append(f"{count} file{'s' if count != 1 else ''} unused for {_days(report['days'])} or more; removing "
                 f"{'them' if count != 1 else 'it'} would free {_size(report['total_bytes'])}. Nothing was deleted.")
    if report["ledger"] is None:
        lines.append("(no usage ledger found: last use is the files' access time)")
    for path in report["missing"]:
        lines.append(f"missing: {path}")
    return out + [Text(line) for line in lines]


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

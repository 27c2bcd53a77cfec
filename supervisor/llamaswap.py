"""llama-swap's config.yaml → an equivalent models.toml (`model-supervisor import llama-swap FILE`).

:func:`translate` is the pure part: the decoded YAML in, the TOML text and the warnings (what has no equivalent
here, what was renamed) out. :func:`load_yaml` decodes the file and remembers where each value is, so that
:func:`convert_file` can name the line of a bad value or of a warning.

What is translated (see docs/migration-llama-swap.md for every key):
- a model whose ``cmd`` runs ``llama-server`` (the first word's basename) becomes a native model: ``model`` is
  its ``-m``/``--model``, ``args`` the rest without the flags the daemon sets itself, and ``[daemon]
  llama_server`` the binary (the most common one, when the models use several);
- any other ``cmd`` becomes a ``cmd`` model (``cmd``, ``env``, ``check_endpoint``, ``proxy``), its ``${PORT}``
  and ``${MODEL_ID}`` left for the daemon to expand;
- macros (global, per model, ``${env.VAR}``) are expanded as llama-swap expands them;
- ``groups`` (or ``routing.router.settings.groups``), ``aliases``, ``ttl``/``globalTTL``, ``env``,
  ``checkEndpoint``, ``healthCheckTimeout``, ``startPort``, ``unloadTimeout``, the fifo scheduler's priorities
  and ``hooks.on_startup.preload`` (when this version has ``preload``).

The TOML is written by the package's small writer (tomlwriter.py) rather than tomli-w: the output interleaves
comments (the header, each model's notes) with the tables, which tomli-w cannot write, and it only needs
strings, numbers, booleans and arrays of strings.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from .config import DEFAULT_GROUP, NAME_PATTERN, RESERVED_ARGS, ModelConfig
from .tomlwriter import TomlWriter

KeyPath = tuple[Any, ...]

MACRO_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
MACRO_USE = re.compile(r"\$\{([a-zA-Z0-9_-]+)\}")
ENV_MACRO = re.compile(r"\$\{env\.([a-zA-Z_][a-zA-Z0-9_]*)\}")
RESERVED_MACROS = {"PORT", "MODEL_ID", "PID"}
# Kept in a cmd model's command for our daemon to expand, as llama-swap would.
DAEMON_MACROS = {"PORT", "MODEL_ID"}
DEFAULT_PROXY = re.compile(r"^http://(localhost|127\.0\.0\.1):\$\{PORT\}/?$")
HEALTH_TIMEOUT_MIN_S = 15  # llama-swap raises anything lower to 15
PORT_RANGE_SIZE = 100

# llama-swap keys with no equivalent here, and what to do instead. Keys that are translated are not listed.
GLOBAL_KEYS = {
    "logLevel": "no config key: use `model-supervisor run --log-level LEVEL` or MODEL_SUPERVISOR_LOG_LEVEL",
    "logRequests": "no equivalent (deprecated in llama-swap too)",
    "logTimeFormat": "no equivalent",
    "logToStdout": "no equivalent: the daemon logs to stderr; a model's own output is at GET /logs/{model}",
    "metricsMaxInMemory": "no equivalent: requests are kept in the usage ledger ([ledger]); metrics at /metrics",
    "captureBuffer": "no equivalent (request/response captures)",
    "store": "no equivalent: the usage ledger is kept in [daemon] state_dir",
    "sendLoadingState": "no equivalent: loading shows in /status and /events, not in the response",
    "includeAliasesInList": "no key needed: /v1/models always lists aliases (with alias_of)",
    "apiKeys": "not copied (they are secrets): set [daemon] api_key_env to the name of an environment variable "
               "holding the key",
    "peers": "no equivalent: a [cloud.NAME] section (base_url, model, api_key_env) per remote model is the "
             "closest",
    "profiles": "no equivalent",
    "selectors": "no equivalent",
    "ui": "no equivalent (the dashboard is at /)",
    "performance": "no equivalent",
    "upstream": "no equivalent (upstream.ignorePaths): /upstream/{model}/... always loads the model",
}
MODEL_KEYS = {
    "cmdStop": "no equivalent: a child is stopped with SIGTERM, then SIGKILL after [daemon] stop_timeout_s",
    "name": "no equivalent (kept as a comment)",
    "description": "no equivalent (kept as a comment)",
    "useModelName": "no equivalent: the request's model name is not rewritten",
    "filters": "no equivalent: request parameters are not stripped or set",
    "metadata": "no equivalent (not shown in /v1/models)",
    "capabilities": "no equivalent (not shown in /v1/models)",
    "concurrencyLimit": "no equivalent: requests are not limited per model",
    "sendLoadingState": "no equivalent",
    "timeouts": "no equivalent (proxy connection timeouts)",
    "compat": "no equivalent",
    "unlisted": "no equivalent: every model is listed in /v1/models",
    "unloadTimeout": "no per-model equivalent: [daemon] stop_timeout_s applies to all models",
}
GROUP_KEYS = {"swap", "exclusive", "persistent", "members"}


class LlamaSwapError(Exception):
    """A config that cannot be translated. ``path`` is the key path of the bad value; ``line`` (1-based) where
    the YAML parser found the problem; ``needle`` a piece of text inside the value, to find its exact line."""

    def __init__(self, message: str, path: KeyPath = (), needle: str | None = None, line: int | None = None):
        super().__init__(message)
        self.message, self.path, self.needle, self.line = message, path, needle, line


@dataclass(frozen=True)
class Note:
    """Something that has no equivalent here, or changed on the way: the key path and what happened."""

    path: KeyPath
    message: str

    def __str__(self) -> str:
        return f"{key_text(self.path)}: {self.message}" if self.path else self.message


@dataclass
class Result:
    toml: str
    warnings: list[Note]


def key_text(path: KeyPath) -> str:
    """models.llama.cmdStop; a key that is not a plain word is quoted: models."org/model".ttl"""
    parts = []
    for part in path:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
        else:
            text = str(part)
            parts.append(text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else f'"{text}"')
    return ".".join(parts)


# ---------------------------------------------------------------- YAML with positions


class _Loader(yaml.SafeLoader):
    """YAML as llama-swap (Go, yaml.v3) reads it: only true/false are booleans (not yes/no/on/off, YAML 1.1's),
    and dates stay strings."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))  # fmt: skip


@dataclass
class Document:
    """The decoded YAML and, for each key path, the node of its value (for line numbers)."""

    data: Any
    nodes: dict[KeyPath, yaml.Node] = field(default_factory=dict)
    key_lines: dict[KeyPath, int] = field(default_factory=dict)

    def line(self, path: KeyPath, needle: str | None = None) -> int | None:
        """1-based line of the key at path (or of the nearest enclosing one); with needle, the line inside the
        value (a ``|`` block, a multi-line string) that holds it."""
        while path and path not in self.nodes:
            path = path[:-1]
        node = self.nodes.get(path)
        if node is None:
            return None
        if needle and isinstance(node, yaml.ScalarNode) and node.start_mark.buffer is not None:
            text = node.start_mark.buffer[node.start_mark.index:node.end_mark.index]
            index = text.find(needle)
            if index >= 0:
                return node.start_mark.line + 1 + text.count("\n", 0, index)
        return self.key_lines.get(path, node.start_mark.line + 1)


def load_yaml(text: str) -> Document:
    """Decode llama-swap YAML. Raises LlamaSwapError (with the line) when it is not valid YAML, holds more than
    one document, or defines a key twice (llama-swap refuses that too)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        document = Document(None)
        if node is not None:
            _index(node, (), document, set())
            document.data = loader.construct_document(node)
        return document
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "cannot be parsed"
        if exc.context:  # e.g. "while scanning a quoted scalar", begun on an earlier line than the problem
            begun = exc.context_mark
            where = f" (begun on line {begun.line + 1})" if begun and mark and begun.line != mark.line else ""
            problem += f" {exc.context}{where}"
        raise LlamaSwapError(f"not valid YAML: {problem}", line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise LlamaSwapError(f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _index(node: yaml.Node, path: KeyPath, document: Document, visited: set[int]) -> None:
    """Record each value's node by key path, and each key's line; refuse keys defined twice. A node reached
    again through a YAML alias is not walked again (aliases of aliases would grow exponentially)."""
    document.nodes.setdefault(path, node)
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value
            if key in seen:
                raise LlamaSwapError(f"{key_text(path + (key,))}: defined twice (first on line {seen[key]})",
                                     line=key_node.start_mark.line + 1)  # fmt: skip
            seen[key] = key_node.start_mark.line + 1
            document.key_lines.setdefault(path + (key,), seen[key])
            _index(value_node, path + (key,), document, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, path + (i,), document, visited)


def convert_file(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """Read and translate a llama-swap config file: (the TOML text, the warnings as "FILE:LINE: key: message").
    Raises LlamaSwapError whose message names the file and line."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LlamaSwapError(f"{source}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise LlamaSwapError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    document: Document | None = None
    try:
        document = load_yaml(text)
        result = translate(document.data, source=source, environ=environ, locate=document.line)
    except LlamaSwapError as exc:
        line = exc.line or (document.line(exc.path, exc.needle) or 1 if document is not None else None)
        where = f"{source}:{line}" if line else source
        raise LlamaSwapError(f"{where}: {exc.message}", exc.path, line=line) from None
    warnings = []
    for warning in result.warnings:
        line = document.line(warning.path) if warning.path else None
        warnings.append(f"{source}:{line}: {warning}" if line else f"{source}: {warning}")
    return result.toml, warnings


# ---------------------------------------------------------------- translation


@dataclass
class _Model:
    name: str
    original: str
    path: KeyPath
    comments: list[str] = field(default_factory=list)
    entries: list[tuple[str, Any]] = field(default_factory=list)
    native: bool = False
    binary: str | None = None
    aliases: list[str] = field(default_factory=list)


def translate(data: Any, source: str | None = None, environ: Mapping[str, str] | None = None,
              locate: Callable[[KeyPath], int | None] | None = None) -> Result:
    """A decoded llama-swap config → models.toml text and the warnings. Raises LlamaSwapError on bad input
    (not a mapping, a macro that cannot be resolved, a value of the wrong type). ``environ`` resolves
    ``${env.VAR}`` (default: this process's environment); ``locate`` gives a key path's line, to list the
    warnings in the file's order."""
    return _Translator(data, os.environ if environ is None else environ, locate).run(source)


class _Translator:
    def __init__(self, data: Any, environ: Mapping[str, str], locate: Callable[[KeyPath], int | None] | None):
        if not isinstance(data, dict):
            shown = "empty" if data is None else f"a {type(data).__name__}"
            raise LlamaSwapError(f"not a llama-swap config: the file is {shown}, not a mapping with a `models:` "
                                 "section")  # fmt: skip
        self.data = data
        self.environ = environ
        self.locate = locate
        self.warnings: list[Note] = []
        self.daemon: list[tuple[str, Any]] = []
        self.daemon_comments: list[str] = []

    def warn(self, path: KeyPath, message: str) -> None:
        self.warnings.append(Note(path, message))

    # ------------------------------------------------------------ the whole file

    def run(self, source: str | None) -> Result:
        data = self.data
        handled = {"models", "groups", "macros", "healthCheckTimeout", "startPort", "globalTTL", "unloadTimeout",
                   "hooks", "routing"}  # fmt: skip
        for key in data:
            if key not in handled:
                self.warn((key,), GLOBAL_KEYS.get(str(key), "unknown llama-swap key; ignored"))
        self.macros = self._macros(data.get("macros"), ("macros",))
        models = data.get("models")
        if models is None:
            models = {}
            self.warn(("models",), "no models in this config")
        if not isinstance(models, dict):
            raise LlamaSwapError("models: must be a mapping of model IDs to settings", ("models",))
        models = {str(k): v for k, v in models.items()}
        self.names = self._model_names(models)
        self.global_ttl = self._number(data.get("globalTTL"), ("globalTTL",), minimum=0)
        groups, membership = self._groups(data, models)
        priorities = self._priorities(data)
        preload = self._preload(data)
        out = [self._model(model_id, settings, membership.get(model_id), priorities.get(model_id, 0),
                           model_id in preload) for model_id, settings in models.items()]  # fmt: skip
        self._aliases(models, out)
        self._daemon_keys(data, out)
        locate = self.locate
        if locate is not None:  # in the file's order; sort() is stable
            self.warnings.sort(key=lambda w: locate(w.path) or 0)
        return Result(self._render(source, groups, out), self.warnings)

    def _daemon_keys(self, data: dict[str, Any], models: list[_Model]) -> None:
        binaries = Counter(m.binary for m in models if m.native)
        if binaries:
            chosen = max(binaries, key=lambda b: (binaries[b], -list(binaries).index(b)))
            self.daemon.append(("llama_server", chosen))
            if "/" in chosen and not chosen.startswith(("/", "~")):
                first = next(m for m in models if m.native and m.binary == chosen)
                self.warn(first.path + ("cmd",), f"llama-server path {chosen!r} is relative (llama-swap resolved "
                                                 "it from its working directory): make [daemon] llama_server "
                                                 "absolute")  # fmt: skip
            for other in binaries:
                if other == chosen:
                    continue
                users = [m for m in models if m.native and m.binary == other]
                self.daemon_comments.append(f"llama-swap also ran {other} for "
                                            f"{', '.join(m.name for m in users)}; they run {chosen} here")
                for model in users:
                    self.warn(model.path + ("cmd",), f"ran {other}; every native model runs one llama-server "
                                                     f"here: [daemon] llama_server = {chosen!r}")  # fmt: skip
        start = data.get("startPort")
        if start is not None:
            if not _is_int(start) or not 1 <= start <= 65535:
                raise LlamaSwapError("startPort: must be a port number (1 to 65535)", ("startPort",))
            self.daemon.append(("port_range", [start, min(start + PORT_RANGE_SIZE - 1, 65535)]))
        timeout = self._number(data.get("healthCheckTimeout"), ("healthCheckTimeout",))
        if timeout is not None:
            self.daemon.append(("health_timeout_s", _whole(max(timeout, HEALTH_TIMEOUT_MIN_S))))
        unload = self._number(data.get("unloadTimeout"), ("unloadTimeout",), minimum=0)
        if unload:
            self.daemon.append(("stop_timeout_s", _whole(unload)))

    # ------------------------------------------------------------ macros

    def _macros(self, raw: Any, path: KeyPath, base: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        """Ordered (name, text) pairs; a model's macros override the global ones of the same name in place."""
        macros = list(base or [])
        if raw is None:
            return macros
        if not isinstance(raw, dict):
            raise LlamaSwapError(f"{key_text(path)}: must be a mapping of names to values", path)
        for name, value in raw.items():
            name = str(name)
            where = path + (name,)
            if not MACRO_NAME.match(name) or len(name) >= 64:
                raise LlamaSwapError(f"{key_text(where)}: a macro name is letters, digits, '_' and '-' (under 64)",
                                     where)  # fmt: skip
            if name in RESERVED_MACROS:
                raise LlamaSwapError(f"{key_text(where)}: {name} is reserved by llama-swap", where)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int):
                text = str(value)
            elif isinstance(value, float):
                text = go_float(value)
            elif isinstance(value, str):
                text = self._env(value, where)
            else:
                raise LlamaSwapError(f"{key_text(where)}: a macro's value is a string, number or boolean", where)
            for i, (existing, _) in enumerate(macros):
                if existing == name:
                    macros[i] = (name, text)
                    break
            else:
                macros.append((name, text))
        return macros

    def _env(self, text: str, path: KeyPath) -> str:
        def value(match: re.Match[str]) -> str:
            if match[1] not in self.environ:
                raise LlamaSwapError(f"{key_text(path)}: {match[0]} cannot be resolved: the environment variable "
                                     f"{match[1]} is not set (llama-swap reads it when it loads the config; "
                                     "the import does too)", path, needle=match[0])  # fmt: skip
            return self.environ[match[1]]

        return ENV_MACRO.sub(value, text)

    def _expand(self, text: str, macros: list[tuple[str, str]], path: KeyPath, keep: set[str]) -> str:
        """Substitute as llama-swap does: env macros first, then the macros last-defined first (so a macro may
        use one defined before it); any ${NAME} left that is not in keep is an error."""
        text = self._env(text, path)
        for name, value in reversed(macros):
            text = text.replace("${" + name + "}", value)
        for match in MACRO_USE.finditer(text):
            if match[1] not in keep:
                raise LlamaSwapError(f"{key_text(path)}: macro {match[0]} cannot be resolved (not defined in "
                                     "macros, nor in this model's macros)", path, needle=match[0])  # fmt: skip
        return text

    # ------------------------------------------------------------ names, groups, scheduling

    def _model_names(self, models: dict[str, Any]) -> dict[str, str]:
        """llama-swap model ID → our name. Valid IDs keep theirs; the others are mapped ('/' and the like → '-')."""
        names: dict[str, str] = {}
        used: set[str] = set()
        for model_id in sorted(models, key=lambda m: not NAME_PATTERN.match(m)):
            if NAME_PATTERN.match(model_id):
                names[model_id] = model_id
            else:
                names[model_id] = _unique(sanitize(model_id, "model"), used)
                self.warn(("models", model_id), f"{model_id!r} is not a valid name here (letters, digits, '.', "
                          f"'_', ':', '-'; starting with a letter or digit): renamed {names[model_id]!r}; clients "
                          "must ask for the new name")  # fmt: skip
            used.add(names[model_id])
        return {model_id: names[model_id] for model_id in models}

    def _groups(self, data: dict[str, Any], models: dict[str, Any]) -> tuple[list[tuple[str, dict[str, bool]]],
                                                                             dict[str, str]]:
        raw, path = data.get("groups"), ("groups",)
        routing = data.get("routing")
        if routing is not None:
            raw, path = self._routing_groups(routing, raw)
        if raw is None:
            return [], {}
        if not isinstance(raw, dict):
            raise LlamaSwapError(f"{key_text(path)}: must be a mapping of group names to settings", path)
        raw = {str(k): v for k, v in raw.items()}
        members_of: dict[str, list[str]] = {}
        membership: dict[str, str] = {}
        for group_id, settings in raw.items():
            where = path + (group_id,)
            if settings is None:
                settings = {}
            if not isinstance(settings, dict):
                raise LlamaSwapError(f"{key_text(where)}: must be a mapping (swap, exclusive, persistent, members)",
                                     where)  # fmt: skip
            for key in settings:
                if key not in GROUP_KEYS:
                    self.warn(where + (key,), "unknown group key; ignored")
            members = settings.get("members") or []
            if not isinstance(members, list):
                raise LlamaSwapError(f"{key_text(where + ('members',))}: must be a list of model IDs",
                                     where + ("members",))  # fmt: skip
            members_of[group_id] = []
            for i, member in enumerate(members):
                member = str(member)
                if member not in models:
                    self.warn(where + ("members", i), f"{member!r} is not a model ID in models; ignored")
                elif member in membership:
                    self.warn(where + ("members", i), f"{member!r} is already a member of {membership[member]!r} "
                                                      "(a model belongs to one group); ignored here")  # fmt: skip
                else:
                    membership[member] = group_id
                    members_of[group_id].append(member)
        ungrouped = any(model_id not in membership for model_id in models)
        used = {DEFAULT_GROUP} if ungrouped else set()
        names: dict[str, str] = {}
        for group_id in sorted(raw, key=lambda g: not NAME_PATTERN.match(g) or (g == DEFAULT_GROUP and ungrouped)):
            name = group_id
            if not NAME_PATTERN.match(group_id) or name in used:
                name = _unique(sanitize(group_id, "group"), used)
                why = (f"models outside any group are in the group {DEFAULT_GROUP!r} here" if group_id == DEFAULT_GROUP
                       else "not a valid name here")  # fmt: skip
                self.warn(path + (group_id,), f"renamed {name!r}: {why}")
            used.add(name)
            names[group_id] = name
        groups = []
        for group_id, settings in raw.items():
            settings = settings or {}
            flags = {}
            for key, default in (("swap", True), ("exclusive", True), ("persistent", False)):
                value = settings.get(key, default)
                if not isinstance(value, bool):
                    raise LlamaSwapError(f"{key_text(path + (group_id, key))}: must be true or false",
                                         path + (group_id, key))  # fmt: skip
                flags[key] = value
            groups.append((names[group_id], flags))
        return groups, {model_id: names[group_id] for model_id, group_id in membership.items()}

    def _routing_groups(self, routing: Any, groups: Any) -> tuple[Any, KeyPath]:
        """llama-swap's newer `routing:` section: the group router's groups are ours; the matrix router and the
        scheduler's other settings have no equivalent."""
        if not isinstance(routing, dict):
            raise LlamaSwapError("routing: must be a mapping", ("routing",))
        path: KeyPath = ("groups",)
        for key in routing:
            if key not in ("router", "scheduler"):
                self.warn(("routing", key), "unknown llama-swap key; ignored")
        router = routing.get("router") or {}
        if isinstance(router, dict):
            use = router.get("use", "group")
            settings = router.get("settings") or {}
            if use == "matrix" or (isinstance(settings, dict) and "matrix" in settings):
                self.warn(("routing", "router"), "the matrix router has no equivalent: use groups (swap, exclusive, "
                                                 "persistent) and the memory budget")  # fmt: skip
            if isinstance(settings, dict) and settings.get("groups") is not None:
                if groups is not None:
                    self.warn(("groups",), "ignored: routing.router.settings.groups is used")
                groups, path = settings["groups"], ("routing", "router", "settings", "groups")
        return groups, path

    def _priorities(self, data: dict[str, Any]) -> dict[str, int]:
        routing = data.get("routing")
        scheduler = routing.get("scheduler") if isinstance(routing, dict) else None
        if not isinstance(scheduler, dict):
            return {}
        path: KeyPath = ("routing", "scheduler", "settings", "fifo", "priority")
        settings = scheduler.get("settings") or {}
        fifo = settings.get("fifo") if isinstance(settings, dict) else None
        raw = fifo.get("priority") if isinstance(fifo, dict) else None
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise LlamaSwapError(f"{key_text(path)}: must be a mapping of model IDs to numbers", path)
        priorities = {}
        for model_id, value in raw.items():
            model = self._resolve(str(model_id))
            if not _is_int(value):
                raise LlamaSwapError(f"{key_text(path + (model_id,))}: must be a whole number", path + (model_id,))
            if model is None:
                self.warn(path + (model_id,), f"{model_id!r} is not a model; ignored")
            else:
                priorities[model] = value
        return priorities

    def _preload(self, data: dict[str, Any]) -> set[str]:
        hooks = data.get("hooks")
        if hooks is None:
            return set()
        if not isinstance(hooks, dict):
            raise LlamaSwapError("hooks: must be a mapping", ("hooks",))
        startup = hooks.get("on_startup") or {}
        for key in hooks:
            if key != "on_startup":
                self.warn(("hooks", key), "unknown llama-swap key; ignored")
        if not isinstance(startup, dict):
            raise LlamaSwapError("hooks.on_startup: must be a mapping", ("hooks", "on_startup"))
        for key in startup:
            if key != "preload":
                self.warn(("hooks", "on_startup", key), "no equivalent" if key == "profile" else
                          "unknown llama-swap key; ignored")  # fmt: skip
        preload = startup.get("preload") or []
        path: KeyPath = ("hooks", "on_startup", "preload")
        if not isinstance(preload, list):
            raise LlamaSwapError(f"{key_text(path)}: must be a list of model IDs", path)
        if preload and "preload" not in ModelConfig.model_fields:
            self.warn(path, "no equivalent in this version: load them with `model-supervisor load MODEL`")
            return set()
        chosen = set()
        for i, model_id in enumerate(preload):
            model = self._resolve(str(model_id).strip())
            if model is None:
                self.warn(path + (i,), f"{model_id!r} is not a model; ignored")
            else:
                chosen.add(model)
        return chosen

    def _resolve(self, name: str) -> str | None:
        """A llama-swap model ID or alias → the model ID."""
        if name in self.names:
            return name
        for model_id, settings in (self.data.get("models") or {}).items():
            aliases = settings.get("aliases") if isinstance(settings, dict) else None
            if isinstance(aliases, list) and name in [str(a) for a in aliases]:
                return str(model_id)
        return None

    # ------------------------------------------------------------ one model

    def _model(self, model_id: str, settings: Any, group: str | None, priority: int, preload: bool) -> _Model:
        path: KeyPath = ("models", model_id)
        model = _Model(self.names[model_id], model_id, path)
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise LlamaSwapError(f"{key_text(path)}: must be a mapping (cmd, aliases, ttl, ...)", path)
        handled = {"cmd", "macros", "aliases", "ttl", "env", "checkEndpoint", "proxy"}
        for key in settings:
            if key not in handled:
                self.warn(path + (key,), MODEL_KEYS.get(str(key), "unknown llama-swap key; ignored"))
        title = " - ".join(str(settings[k]).strip() for k in ("name", "description") if settings.get(k))
        if title:
            model.comments.append(" ".join(title.split()))
        if model.name != model_id:
            if NAME_PATTERN.match(model_id):  # renamed for another reason: the old ID still works
                model.aliases.append(model_id)
            else:
                model.comments.append(f"llama-swap ID {model_id!r} (not a valid name here; ask for {model.name!r})")
        macros = self._macros(settings.get("macros"), path + ("macros",), self.macros)
        cmd = settings.get("cmd")
        if cmd is None:
            raise LlamaSwapError(f"{key_text(path)}: no cmd (llama-swap requires one)", path)
        if not isinstance(cmd, str):
            raise LlamaSwapError(f"{key_text(path + ('cmd',))}: must be a string", path + ("cmd",))
        # As llama-swap: comment lines go first (a macro in a comment is not expanded), then the macros.
        expanded = self._expand(strip_comments(cmd), macros, path + ("cmd",), DAEMON_MACROS)
        words = split_command(expanded, path + ("cmd",))
        if not words:
            raise LlamaSwapError(f"{key_text(path + ('cmd',))}: empty", path + ("cmd",))
        env = self._list_of_strings(settings.get("env"), path + ("env",))
        env = [self._expand(item, macros, path + ("env", i), DAEMON_MACROS) for i, item in enumerate(env)]
        for i, item in enumerate(env):
            if "=" not in item:
                self.warn(path + ("env", i), f"{item!r} is not NAME=value")
        # ${MODEL_ID} is the model's name (llama-swap: its ID) in these; ${PORT} only in the proxy.
        named = [("MODEL_ID", model.name), *macros]
        check = settings.get("checkEndpoint")
        if check is not None:
            check = self._expand(go_scalar(check), named, path + ("checkEndpoint",), set())
        proxy = settings.get("proxy")
        if proxy is not None:
            proxy = self._expand(go_scalar(proxy), named, path + ("proxy",), {"PORT"})

        native = _program(words[0]) in ("llama-server", "llama-server.exe")
        model_path, args, dropped = _native_parts(words[1:]) if native else (None, [], [])
        if not native and _program(words[0]).startswith("llama-server"):
            self.warn(path + ("cmd",), f"runs {_program(words[0])!r}, not 'llama-server': kept as a cmd model; "
                                       "if it is a llama-server build, a native model (model, args, [daemon] "
                                       "llama_server) gets memory estimates and prompt-cache persistence")  # fmt: skip
        if native and model_path is None:
            native = False
            self.warn(path + ("cmd",), "llama-server without -m/--model (e.g. -hf): kept as a cmd model, without "
                                       "memory estimates or prompt-cache persistence")  # fmt: skip
        if native:
            assert model_path is not None
            model.native, model.binary = True, words[0]
            model_path = model_path.replace("${MODEL_ID}", model.name)
            args = [arg.replace("${MODEL_ID}", model.name) for arg in args]
            env = [item.replace("${MODEL_ID}", model.name) for item in env]
            model.entries.append(("model", model_path))
            if not model_path.startswith(("/", "~")):
                self.warn(path + ("cmd",), f"model path {model_path!r} is relative: llama-swap read it from its "
                                           "working directory, models.toml resolves it from the file's own "
                                           "directory")  # fmt: skip
            if any("${PORT}" in arg for arg in args):
                self.warn(path + ("cmd",), "${PORT} in an argument other than --port is not expanded for native "
                                           "models; it is kept as written")  # fmt: skip
            if dropped:
                model.comments.append(f"set by the daemon, dropped from llama-swap's cmd: {' '.join(dropped)}")
            if check is not None and check.rstrip("/") != "/health":
                self.warn(path + ("checkEndpoint",), f"{check!r} ignored: native models are ready when "
                                                     "llama-server's /health answers 200")  # fmt: skip
            if proxy is not None and not DEFAULT_PROXY.match(proxy):
                model.comments.append(f"llama-swap's proxy {proxy} dropped: the daemon picks the port")
        model.entries.append(("aliases", model.aliases))  # completed by _aliases
        if native:
            if args:
                model.entries.append(("args", args))
        else:
            model.entries.append(("cmd", words))
        if group is not None:
            model.entries.append(("group", group))
        ttl = self._number(settings.get("ttl"), path + ("ttl",), minimum=-1)
        if ttl is None or ttl == -1:
            ttl = self.global_ttl
        if ttl:
            model.entries.append(("ttl_s", _whole(ttl)))
        if priority:
            model.entries.append(("priority", priority))
        if preload:
            model.entries.append(("preload", True))
        if env:
            model.entries.append(("env", env))
        if not native:
            if model.name != model_id and "${MODEL_ID}" in " ".join(words + env):
                model.comments.append(f"${{MODEL_ID}} is {model.name!r} here (llama-swap: {model_id!r})")
            if check is not None:
                model.entries.append(("check_endpoint", check))
            if proxy is not None and not DEFAULT_PROXY.match(proxy):
                model.entries.append(("proxy", proxy))
        return model

    def _aliases(self, models: dict[str, Any], out: list[_Model]) -> None:
        """Each model's aliases: mapped to valid names, unique across all names and aliases."""
        used = {m.name for m in out}
        for model in out:
            settings = models[model.original] or {}
            raw = self._list_of_strings(settings.get("aliases"), model.path + ("aliases",))
            keep = model.aliases  # the entry ("aliases", keep) is this list
            for i, alias in enumerate(raw):
                where = model.path + ("aliases", i)
                name = alias
                if not NAME_PATTERN.match(alias):
                    name = sanitize(alias, "alias")
                    self.warn(where, f"{alias!r} is not a valid name here: becomes {name!r}")
                if name == model.name or name in keep:
                    continue
                if name in used:
                    self.warn(where, f"{name!r} is already a model's name or alias; dropped")
                    continue
                keep.append(name)
            used.update(keep)
            if not keep:
                model.entries = [(k, v) for k, v in model.entries if k != "aliases"]

    # ------------------------------------------------------------ values

    def _number(self, value: Any, path: KeyPath, minimum: float | None = None) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LlamaSwapError(f"{key_text(path)}: must be a number of seconds", path)
        if minimum is not None and value < minimum:
            raise LlamaSwapError(f"{key_text(path)}: must be at least {minimum:g}", path)
        return value

    def _list_of_strings(self, value: Any, path: KeyPath) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or any(isinstance(v, (dict, list)) or v is None for v in value):
            raise LlamaSwapError(f"{key_text(path)}: must be a list of strings", path)
        return [go_scalar(v) for v in value]

    # ------------------------------------------------------------ output

    def _render(self, source: str | None, groups: list[tuple[str, dict[str, bool]]], models: list[_Model]) -> str:
        w = TomlWriter()
        w.comment(f"models.toml imported from the llama-swap config {source or '(given)'} by "
                  "`model-supervisor import llama-swap`.")  # fmt: skip
        w.comment("Check it with `model-supervisor check-config FILE`; see docs/migration-llama-swap.md.")
        if self.warnings:
            w.comment("")
            w.comment("Not carried over, or changed on the way:")
            for warning in self.warnings:
                w.comment(f"  {warning}")
        if self.daemon or self.daemon_comments:
            w.table(("daemon",))
            for key, value in self.daemon:
                w.entry(key, value)
            for comment in self.daemon_comments:
                w.comment(comment)
        for name, flags in groups:
            w.table(("groups", name))
            for key, value in flags.items():
                w.entry(key, value)
        for model in models:
            w.table(("models", model.name))
            for comment in model.comments:
                w.comment(comment)
            for key, value in model.entries:
                w.entry(key, value)
        text = w.text()
        tomllib.loads(text)  # the writer's own check: what it wrote must read back
        return text


# ---------------------------------------------------------------- helpers


def strip_comments(cmd: str) -> str:
    """The command without its comment lines (those whose first non-blank character is '#')."""
    return "\n".join(line for line in cmd.split("\n") if not line.strip().startswith("#"))


def split_command(cmd: str, path: KeyPath = ()) -> list[str]:
    """llama-swap's command splitting: lines starting with '#' are comments, a trailing '\\' joins lines, then
    POSIX shell-style words (quotes, no expansion)."""
    lines = []
    for line in cmd.split("\n"):
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        lines.append(stripped[:-1] + " " if stripped.endswith("\\") else line)
    try:
        return shlex.split("\n".join(lines), posix=True)
    except ValueError as exc:
        raise LlamaSwapError(f"{key_text(path)}: cannot split the command: {exc}", path) from None


def _program(word: str) -> str:
    return re.split(r"[\\/]", word)[-1]


def _native_parts(args: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(the -m/--model path, the other arguments, the dropped flags the daemon sets itself)."""
    model, kept, dropped = None, [], []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, has_value, value = arg.partition("=") if arg.startswith("-") else (arg, "", "")
        if flag not in RESERVED_ARGS:
            kept.append(arg)
            i += 1
            continue
        if not has_value:
            value = args[i + 1] if i + 1 < len(args) else ""
            i += 1
        i += 1
        if flag in ("-m", "--model"):
            model = value
        else:
            dropped.append(f"{flag} {value}".strip())
    return model, kept, dropped


def sanitize(text: str, fallback: str) -> str:
    """A valid name from any text: other characters become '-', and it starts with a letter or digit."""
    name = re.sub(r"[^A-Za-z0-9._:-]+", "-", text)
    name = re.sub(r"^[^A-Za-z0-9]+", "", name).rstrip("-")
    return name or fallback


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 2
    while candidate in used:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def go_scalar(value: Any) -> str:
    """A YAML scalar as Go's %v prints it (how llama-swap turns a macro's value into text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    return str(value)


def go_float(x: float) -> str:
    """Go's %v for a float64 (strconv's 'g' with the shortest precision): the shortest digits that read back, in
    exponent form when the exponent is below -4 or at least 6, e.g. 0.7, 1, 123456, 1e+06, 1.5e-05."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if x == 0:
        return "-0" if math.copysign(1, x) < 0 else "0"
    sign, digit_tuple, exponent = Decimal(repr(x)).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + exponent  # digits[:point] . digits[point:]
    neg = "-" if sign else ""
    power = point - 1
    if power < -4 or power >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{neg}{mantissa}e{'-' if power < 0 else '+'}{abs(power):02d}"
    if point <= 0:
        return f"{neg}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return neg + digits + "0" * (point - len(digits))
    return f"{neg}{digits[:point]}.{digits[point:]}"

"""models.toml: the operator's description of the host, validated with pydantic.

Every key is checked (unknown keys are errors) and every error names its key, so an operator can fix a config
without reading code. Environment variables ``MODEL_SUPERVISOR_<SECTION>__<KEY>`` override the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_ENV = "MODEL_SUPERVISOR_CONFIG"
LLAMA_SERVER_ENV = "LLAMA_SERVER"
DEFAULT_GROUP = "default"

# Flags the daemon sets itself on every child; an operator who sets them would fight the daemon.
RESERVED_ARGS = {"--host", "--port", "-m", "--model", "--alias", "-a", "--slot-save-path"}

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


class ConfigError(Exception):
    """A config that cannot be used. ``problems`` holds one line per bad key, each starting with the key."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "invalid config\n" + "\n".join(f"  {p}" for p in problems))


class Section(BaseModel):
    # allow_inf_nan: `max_body_mb = inf` or a NaN timeout is a mistake to name, not a value to run with.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


PositiveSeconds = Annotated[float, Field(gt=0)]
NonNegativeSeconds = Annotated[float, Field(ge=0)]


class DaemonConfig(Section):
    listen: str = "127.0.0.1:8080"
    llama_server: str = "llama-server"
    state_dir: Path = Path("/var/lib/model-supervisor")
    port_range: tuple[Annotated[int, Field(ge=1, le=65535)], Annotated[int, Field(ge=1, le=65535)]] = (5800, 5899)
    health_timeout_s: PositiveSeconds = 120
    queue_timeout_s: PositiveSeconds = 30
    # How long an unload waits for in-flight requests, and how long a child gets between SIGTERM and SIGKILL.
    drain_timeout_s: PositiveSeconds = 30
    stop_timeout_s: PositiveSeconds = 10
    admin_token_env: str = "MODEL_SUPERVISOR_ADMIN_TOKEN"
    api_key_env: str = ""
    max_body_mb: Annotated[float, Field(gt=0)] = 32
    # Slow clients: a request head must arrive within header_timeout_s of connecting, a body within body_timeout_s;
    # an idle keep-alive connection is closed after keepalive_timeout_s.
    header_timeout_s: PositiveSeconds = 10
    body_timeout_s: PositiveSeconds = 60
    keepalive_timeout_s: PositiveSeconds = 75
    notify_url: str = ""
    log_lines: Annotated[int, Field(ge=10, le=100_000)] = 1000
    # The model loaded again whenever nothing is wanted and it fits without displacing anything; see groups' home.
    home: str | None = None
    # Predicted preload: from the ledger, load a model predict_lead_s before the time of day it is usually first
    # asked for, by the home rules (nothing waits, it fits, displaces nothing). Off by default.
    predict_preload: bool = False
    predict_lead_s: Annotated[float, Field(gt=0, le=7200)] = 600
    # Host header names accepted besides the listen address and loopback names (DNS rebinding); "*" = any.
    allowed_hosts: list[str] = []

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for host in value:
            if host != "*" and not re.match(r"^[A-Za-z0-9._-]+$", host) and not is_address(host.strip("[]")):
                raise ValueError(f"{host!r} is not a host name or address (no scheme, port or path), nor \"*\"")
        return value

    @field_validator("port_range")
    @classmethod
    def _range_ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] > value[1]:
            raise ValueError(f"first port {value[0]} is above last port {value[1]}")
        return value

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


class SchedulerConfig(Section):
    batching: bool = True
    max_batch_wait_s: NonNegativeSeconds = 30
    min_residency_s: NonNegativeSeconds = 0
    # Start the incoming model of a swap while the outgoing one saves its slots and stops, when the memory budget
    # is known and holds both: the stop (~50 ms, more with a large prompt cache) is off the swap's path.
    overlap_swaps: bool = True


class GpuConfig(Section):
    backend: Literal["auto", "nvidia", "amd", "none"] = "auto"
    device: Annotated[int, Field(ge=0)] = 0
    reserve_mb: Annotated[int, Field(ge=0)] = 1024
    # How often device memory is read (foreign usage, lease holders' growth).
    poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # Yield to programs the daemon does not manage: when what they hold grows so that resident models and leases no
    # longer fit, idle models are unloaded (busy ones drain) until they do. Acts only on an overflow of at least
    # yield_margin_mb, at most once per yield_interval_s, so a program whose use wobbles does not make models flap.
    yield_to_others: bool = True
    yield_margin_mb: Annotated[int, Field(ge=0)] = 256
    yield_interval_s: Annotated[float, Field(ge=0, le=3600)] = 10.0


class PromptCacheConfig(Section):
    """Saving llama-server's slots (its prompt cache) before a planned stop and restoring them after the next load."""

    enabled: bool = True
    # Disk for saved slots, all models together, least recently used evicted first. "auto": a tenth of the free
    # space state_dir's filesystem has when the daemon starts, at most 64 GiB.
    max_mb: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"
    # A stop never waits longer than this on saving; what is not saved by then is not saved.
    save_timeout_s: Annotated[float, Field(gt=0, le=600)] = 5.0


class GroupConfig(Section):
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False
    # The member loaded again when nothing is wanted and it fits without displacing anything ("come home").
    home: str | None = None


class ModelConfig(Section):
    # Either a GGUF that the daemon runs llama-server for (model, args), or any server command (cmd): one of them.
    model: Path | None = None
    cmd: str | list[str] | None = None
    env: list[str] = []  # "K=V" entries added to the child's (minimal) environment
    check_endpoint: str = "/health"  # cmd: ready when this answers 200 at proxy; "none": when the port accepts
    proxy: str = "http://127.0.0.1:${PORT}"  # cmd: where it answers
    route_prefixes: list[str] = []  # request paths starting with one of these go to this model, unchanged
    aliases: list[str] = []
    args: list[str] = []
    group: str = DEFAULT_GROUP
    ttl_s: NonNegativeSeconds = 0
    priority: int = 0
    vram_mb: Literal["auto"] | int = "auto"
    fallback: str | None = None
    fallback_after_ms: Annotated[int, Field(ge=0)] = 2000
    local_only: bool = False
    allow_in_gaming: bool = False
    prompt_cache: bool = True  # off: this model's slots are never saved or restored
    preload: bool = False  # loaded when the daemon starts, before it tells systemd it is ready

    @field_validator("vram_mb", mode="before")
    @classmethod
    def _auto_or_megabytes(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError('must be "auto" or a whole number of MB >= 0')

    @field_validator("aliases")
    @classmethod
    def _aliases_are_names(cls, value: list[str]) -> list[str]:
        for alias in value:
            check_name(alias)
        return value

    @field_validator("env")
    @classmethod
    def _env_entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            name = entry.split("=", 1)[0]
            if "=" not in entry or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"{entry!r} is not NAME=VALUE")
        return value

    @field_validator("check_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value != "none" and not value.startswith("/"):
            raise ValueError('must be a path starting with "/", or "none" (ready when the port accepts)')
        return value

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// URL (${PORT} and ${MODEL_ID} are replaced)")
        return value.rstrip("/")

    @field_validator("route_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix.startswith("/") or prefix == "/":
                raise ValueError(f"{prefix!r}: a prefix is a path like \"/sdapi/\" (not \"/\")")
        return value

    @model_validator(mode="after")
    def _model_or_cmd(self) -> ModelConfig:
        if (self.model is None) == (self.cmd is None):
            raise ValueError("set either `model` (a GGUF file, run with llama-server) or `cmd` (any server's "
                             "command line), not both" if self.model is not None else
                             "needs `model` (a GGUF file, run with llama-server) or `cmd` (any server's command line)")
        if self.cmd is not None:
            argv = self.argv()
            if not argv:
                raise ValueError("cmd is empty")
            if self.args:
                raise ValueError("args are for a `model` run by llama-server; put a cmd's arguments in cmd")
        return self

    def argv(self) -> list[str]:
        """A cmd model's command line, macros not yet replaced."""
        if isinstance(self.cmd, list):
            return list(self.cmd)
        return shlex.split(self.cmd or "")

    def env_vars(self) -> dict[str, str]:
        return dict(entry.split("=", 1) for entry in self.env)

    @property
    def is_gguf(self) -> bool:
        return self.model is not None

    @field_validator("args")
    @classmethod
    def _no_reserved_args(cls, value: list[str]) -> list[str]:
        for arg in value:
            flag = arg.split("=", 1)[0]
            if flag in RESERVED_ARGS:
                raise ValueError(f"{flag} is set by the daemon for every child; remove it")
        return value


class CloudConfig(Section):
    base_url: str
    model: str
    api_key_env: str = ""
    input_usd_per_mtok: Annotated[float, Field(ge=0)] = 0
    output_usd_per_mtok: Annotated[float, Field(ge=0)] = 0
    # How long the target may take to send its response head; past it the client gets 504. Never retried: a
    # request that may have reached the target is not sent again.
    first_byte_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class GamingConfig(Section):
    auto_detect: list[str] = []
    # How often running processes are listed, and how long after the last listed one exits gaming mode ends.
    poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    off_delay_s: Annotated[float, Field(ge=0)] = 10.0


class LedgerConfig(Section):
    # The [cloud.*] target whose prices value local requests; "" = the model's fallback, else the first target.
    reference_target: str = ""
    local_share_target: Annotated[float, Field(ge=0, le=1)] = 0.7


class Config(BaseSettings):
    """The whole models.toml. Built with :func:`load_config`, which also applies env overrides."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        env_prefix="MODEL_SUPERVISOR_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    daemon: DaemonConfig = DaemonConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    gpu: GpuConfig = GpuConfig()
    groups: dict[str, GroupConfig] = {}
    models: dict[str, ModelConfig] = {}
    cloud: dict[str, CloudConfig] = {}
    gaming: GamingConfig = GamingConfig()
    ledger: LedgerConfig = LedgerConfig()
    prompt_cache: PromptCacheConfig = PromptCacheConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init values; the environment wins over it.
        return (env_settings, init_settings)

    @field_validator("models", "groups", "cloud")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            check_name(name)
        return value

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        problems: list[str] = []
        seen: dict[str, str] = {name: f"models.{name}" for name in self.models}
        for name in self.cloud:
            if name in self.models:
                problems.append(f"cloud.{name}: a model has the same name; a request naming it would be ambiguous")
        for name, model in self.models.items():
            if model.group not in self.groups and model.group != DEFAULT_GROUP:
                problems.append(f"models.{name}.group: no [groups.{model.group}] section")
            if model.fallback is not None and model.fallback not in self.cloud:
                problems.append(f"models.{name}.fallback: no [cloud.{model.fallback}] section")
            for alias in model.aliases:
                if alias in self.cloud:
                    problems.append(f"models.{name}.aliases: {alias!r} is also the name of [cloud.{alias}]")
                if alias in seen:
                    problems.append(f"models.{name}.aliases: {alias!r} is already used by {seen[alias]}")
                seen[alias] = f"models.{name}.aliases"
        if self.daemon.home is not None and self.daemon.home not in self.models:
            problems.append(f"daemon.home: no [models.{self.daemon.home}] section")
        for name, group in self.groups.items():
            if group.home is not None and (group.home not in self.models or self.models[group.home].group != name):
                problems.append(f"groups.{name}.home: {group.home!r} is not a model of this group")
        reference = self.ledger.reference_target
        if reference and reference not in self.cloud:
            problems.append(f"ledger.reference_target: no [cloud.{reference}] section")
        if problems:
            # Raised as ValueError so pydantic reports it with the others; the key is inside the message.
            raise ValueError("; ".join(problems))
        return self

    def group_of(self, model: str) -> GroupConfig:
        group = self.models[model].group
        return self.groups.get(group, GroupConfig())

    def resolve(self, name: str) -> str | None:
        """The model a name or alias refers to, or None."""
        if name in self.models:
            return name
        for model_name, model in self.models.items():
            if name in model.aliases:
                return model_name
        return None


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(f"{name!r} is not a valid name (letters, digits, '.', '_', ':', '-'; no '/' or spaces)")
    return name


def parse_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:8080' or '[::1]:8080' into (host, port)."""
    match = re.match(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)$", value.strip())
    if not match:
        raise ValueError(f"{value!r} is not HOST:PORT (use [addr]:port for IPv6)")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return (match["v6"] or match["host"]), port


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _format_error(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error" and not error["loc"]:
        # Cross-reference problems carry their own keys.
        return message.replace("; ", "\n  ")
    shown = error.get("input")
    if isinstance(shown, (str, int, float, bool)):
        return f"{key}: {message} (got {shown!r})"
    return f"{key}: {message}"


def parse_config(data: dict[str, Any], source: str | None = None) -> Config:
    """Validate a decoded models.toml (env overrides applied). Raises ConfigError naming every bad key."""
    try:
        return Config(**data)
    except ValidationError as exc:
        problems: list[str] = []
        for error in exc.errors(include_url=False):
            # Union types report each alternative; one line per key is enough for a person.
            line = _format_error(error)
            if not any(p.split(":", 1)[0] == line.split(":", 1)[0] for p in problems):
                problems.append(line)
        raise ConfigError(problems, source) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a models.toml. Raises ConfigError (with the file named) on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the config: {exc.strerror or exc}"], str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text (byte {exc.start}): a TOML file must be UTF-8"], str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
    config = parse_config(data, str(path))
    return _relative_to(config, path.parent)


def _relative_to(config: Config, base: Path) -> Config:
    """Model paths and state_dir in a config file are relative to that file, not to wherever the daemon starts."""
    models = {
        name: model.model_copy(update={"model": _anchor(model.model, base)}) if model.model is not None else model
        for name, model in config.models.items()
    }
    updates: dict[str, Any] = {"state_dir": _anchor(config.daemon.state_dir, base)}
    if "/" in config.daemon.llama_server:  # a path (not a name to look up on PATH)
        updates["llama_server"] = str(_anchor(Path(config.daemon.llama_server), base))
    daemon = config.daemon.model_copy(update=updates)
    return config.model_copy(update={"models": models, "daemon": daemon})


def _anchor(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def find_llama_server(config: Config) -> str:
    """The llama-server binary: env LLAMA_SERVER, else [daemon] llama_server (a path or a name on PATH); "" when
    every model is a cmd (none is needed)."""
    if not needs_llama_server(config):
        return ""
    candidate = os.environ.get(LLAMA_SERVER_ENV) or config.daemon.llama_server
    origin = LLAMA_SERVER_ENV if os.environ.get(LLAMA_SERVER_ENV) else "daemon.llama_server"
    resolved = shutil.which(os.path.expanduser(candidate))
    if resolved is None:
        raise ConfigError(
            [
                f"{origin}: llama-server not found at {candidate!r} (not an executable file, nor on PATH). "
                "Point [daemon] llama_server or LLAMA_SERVER at a binary, or build one with "
                "scripts/build-llama-server.sh"
            ]
        )
    return resolved


def preflight(config: Config) -> list[str]:
    """Problems that a valid config can still have on this host: missing model files, cmds not found."""
    problems = []
    for name, model in config.models.items():
        if model.model is not None and not model.model.is_file():
            problems.append(f"models.{name}.model: file not found: {model.model}")
        if model.cmd is not None:
            program = model.argv()[0]
            if shutil.which(os.path.expanduser(program)) is None:
                problems.append(f"models.{name}.cmd: {program!r} not found (not an executable file, nor on PATH)")
    return problems


def needs_llama_server(config: Config) -> bool:
    """A config whose models all use cmd runs without llama-server."""
    return any(model.is_gguf for model in config.models.values())


# Settings a running daemon keeps until it restarts: its socket, its state, its children's ports, its probe.
RESTART_ONLY = ("daemon.listen", "daemon.state_dir", "daemon.port_range", "daemon.max_body_mb",
                "daemon.admin_token_env", "daemon.api_key_env", "gpu.backend", "gpu.device", "gaming.auto_detect")


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload changes, model by model. process_changed: the model file or args differ, so its child must
    be started again; changed: other settings (TTL, priority, aliases, ...) that apply in place."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    process_changed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    needs_restart: tuple[str, ...]  # RESTART_ONLY keys that differ; kept as they were until a restart


def _setting(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    added, process_changed, changed, unchanged = [], [], [], []
    for name, model in new.models.items():
        before = old.models.get(name)
        if before is None:
            added.append(name)
        elif (before.model, before.args, before.cmd, before.env, before.proxy, before.check_endpoint) != \
                (model.model, model.args, model.cmd, model.env, model.proxy, model.check_endpoint):
            process_changed.append(name)
        elif before != model:
            changed.append(name)
        else:
            unchanged.append(name)
    removed = sorted(set(old.models) - set(new.models))
    needs_restart = sorted(key for key in RESTART_ONLY if _setting(old, key) != _setting(new, key))
    return ConfigDiff(tuple(added), tuple(removed), tuple(process_changed), tuple(changed), tuple(unchanged),
                      tuple(needs_restart))


def keep_restart_only(old: Config, new: Config, needs_restart: tuple[str, ...]) -> Config:
    """The new config with the restart-only settings as the running daemon has them, so it stays consistent."""
    sections: dict[str, dict[str, Any]] = {}
    for key in needs_restart:
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = _setting(old, key)
    updates = {section: getattr(new, section).model_copy(update=values) for section, values in sections.items()}
    return new.model_copy(update=updates)


class LiveConfig:
    """The one config in force. A reload replaces `current`; everything that reads settings reads them here, at
    the moment it needs them, so no component keeps a stale copy."""

    def __init__(self, config: Config, path: str | None = None, binary: str = ""):
        self.current = config
        self.path = path  # the file SIGHUP and POST /reload re-read; None when started from a Config object
        self.binary = binary  # llama-server as found for the current config

"""models.toml validation: every problem names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_supervisor.config import DEFAULT_GROUP, ConfigError, load_config, parse_config, parse_listen


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    return raised.value.problems


def test_defaults_match_the_documented_interface():
    config = parse_config({"models": {"m": {"model": "/m.gguf"}}})
    assert config.daemon.listen == "127.0.0.1:8080"
    assert config.daemon.port_range == (5800, 5899)
    assert (config.daemon.health_timeout_s, config.daemon.queue_timeout_s) == (120, 30)
    model = config.models["m"]
    assert (model.group, model.ttl_s, model.priority, model.vram_mb) == (DEFAULT_GROUP, 0, 0, "auto")
    # Without a group, a model is in the built-in group: one model at a time, like llama-swap.
    group = config.group_of("m")
    assert (group.swap, group.exclusive, group.persistent) == (True, True, False)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"daemon": {"listen": "8080"}}, "daemon.listen: '8080' is not HOST:PORT"),
        ({"daemon": {"listen": "127.0.0.1:70000"}}, "daemon.listen: port 70000 is out of range"),
        ({"daemon": {"port_range": [10, 5]}}, "daemon.port_range: first port 10 is above last port 5"),
        ({"daemon": {"health_timeout_s": 0}}, "daemon.health_timeout_s: Input should be greater than 0"),
        ({"gpu": {"backend": "cuda"}}, "gpu.backend: Input should be 'auto', 'nvidia', 'amd' or 'none'"),
        ({"models": {"m": {}}}, "models.m: needs `model` (a GGUF file, run with llama-server) or `cmd`"),
        ({"models": {"m": {"model": "a.gguf", "cmd": "x"}}}, "models.m: set either `model`"),
        ({"models": {"m": {"cmd": "x", "args": ["-c", "1"]}}}, "models.m: args are for a `model`"),
        ({"models": {"m": {"cmd": "x", "env": ["NOEQUALS"]}}}, "models.m.env"),
        ({"models": {"m": {"cmd": "x", "check_endpoint": "health"}}}, "models.m.check_endpoint"),
        ({"models": {"m": {"model": "/m", "ttl_s": -1}}}, "models.m.ttl_s: Input should be greater than or equal to 0"),
        ({"models": {"m": {"model": "/m", "args": ["--port", "9"]}}}, "models.m.args: --port is set by the daemon"),
        ({"models": {"m": {"model": "/m", "args": ["--model=x"]}}}, "models.m.args: --model is set by the daemon"),
        ({"models": {"m": {"model": "/m", "vram_mb": -5}}}, 'models.m.vram_mb: must be "auto" or a whole number'),
        ({"models": {"m/x": {"model": "/m"}}}, "models: 'm/x' is not a valid name"),
        ({"groups": {"g": {"swap": "yes please"}}}, "groups.g.swap: Input should be a valid boolean"),
        ({"cloud": {"c": {"base_url": "ftp://x", "model": "m"}}}, "cloud.c.base_url: must be an http"),
        ({"extra": {}}, "extra: unknown key"),
        ({"models": {"m": {"model": "/m", "tll_s": 5}}}, "models.m.tll_s: unknown key"),
    ],
)
def test_each_bad_value_is_reported_with_its_key(data, expected):
    assert any(problem.startswith(expected) for problem in problems_of(data)), problems_of(data)


def test_cross_references_are_checked():
    problems = problems_of({
        "models": {
            "a": {"model": "/a", "group": "missing", "aliases": ["fast"], "fallback": "nowhere"},
            "b": {"model": "/b", "aliases": ["fast", "a"]},
        }
    })  # fmt: skip
    text = "\n".join(problems)
    assert "models.a.group: no [groups.missing] section" in text
    assert "models.a.fallback: no [cloud.nowhere] section" in text
    assert "models.b.aliases: 'fast' is already used by models.a.aliases" in text
    assert "models.b.aliases: 'a' is already used by models.a" in text


def test_aliases_resolve_to_their_model():
    config = parse_config({"models": {"a": {"model": "/a", "aliases": ["speed"]}}})
    assert config.resolve("speed") == config.resolve("a") == "a"
    assert config.resolve("nope") is None


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    config_file = tmp_path / "sub" / "models.toml"
    config_file.write_text('[daemon]\nstate_dir = "state"\nllama_server = "bin/llama-server"\n'
                           '[models.a]\nmodel = "../weights/a.gguf"\n')
    config = load_config(config_file)
    assert config.models["a"].model == tmp_path / "weights" / "a.gguf"
    assert config.daemon.state_dir == tmp_path / "sub" / "state"
    assert config.daemon.llama_server == str(tmp_path / "sub" / "bin" / "llama-server")
    # A bare name is looked up on PATH, as a shell would.
    config_file.write_text('[daemon]\nllama_server = "llama-server"\n')
    assert load_config(config_file).daemon.llama_server == "llama-server"


def test_environment_overrides_nested_keys(monkeypatch):
    monkeypatch.setenv("MODEL_SUPERVISOR_DAEMON__QUEUE_TIMEOUT_S", "7")
    monkeypatch.setenv("MODEL_SUPERVISOR_GPU__RESERVE_MB", "2048")
    config = parse_config({"daemon": {"listen": "127.0.0.1:9000"}})
    assert config.daemon.queue_timeout_s == 7
    assert config.daemon.listen == "127.0.0.1:9000"  # the rest of the section stays
    assert config.gpu.reserve_mb == 2048


def test_a_bad_environment_override_names_the_key(monkeypatch):
    monkeypatch.setenv("MODEL_SUPERVISOR_DAEMON__QUEUE_TIMEOUT_S", "later")
    assert any(p.startswith("daemon.queue_timeout_s") for p in problems_of({}))


@pytest.mark.parametrize(("value", "parsed"), [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:8080", ("::1", 8080)),
                                                ("localhost:1", ("localhost", 1))])  # fmt: skip
def test_listen_forms(value, parsed):
    assert parse_listen(value) == parsed

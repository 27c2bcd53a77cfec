"""Config reload (POST /reload; SIGHUP does the same) against the real llama-server."""

from __future__ import annotations

import pytest

from conftest import llama_children

pytestmark = pytest.mark.llama


def write(path, tiny_models, models: dict[str, tuple[int, list[str]]], extra: str = "") -> str:
    lines = ['[daemon]', f'state_dir = "{path.parent / "state"}"', 'port_range = [19100, 19899]',
             '[groups.g]', 'swap = false', 'exclusive = false']  # fmt: skip
    for name, (seed, args) in models.items():
        lines += [f"[models.{name}]", f'model = "{tiny_models[seed]}"', 'group = "g"', f"args = {args!r}".replace("'", '"')]
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


async def test_reload_keeps_unchanged_models_restarts_changed_ones_and_adds_new(start_daemon, tiny_models, tmp_path):
    path = write(tmp_path / "models.toml", tiny_models, {"a": (1, ["-c", "512"]), "b": (2, ["-c", "512"])})
    d = await start_daemon({}, config_path=path)
    for model in ("a", "b"):
        assert (await d.chat(model))[0] == 200
    pid_a, pid_b = d.runtime.core.models["a"].pid, d.runtime.core.models["b"].pid

    assert pid_a is not None and pid_b is not None  # both loaded side by side
    write(tmp_path / "models.toml", tiny_models,
          {"a": (1, ["-c", "512"]), "b": (2, ["-c", "1024"]), "c": (3, ["-c", "512"])})
    status, summary = await d.post_json("/reload")
    assert status == 200
    assert (summary["unchanged"], summary["restarting"], summary["added"]) == (["a"], ["b"], ["c"])
    await d.wait_until(lambda: d.state("b") == "unloaded")  # b was idle: restarted at once
    assert d.timeline.of("stopped", "b")[0]["cause"] == "reload"
    assert d.runtime.core.models["a"].pid == pid_a  # a kept running
    assert (await d.chat("b"))[0] == 200
    _, props = await d.get_json("/upstream/b/props")
    assert props["default_generation_settings"]["n_ctx"] == 1024 and d.runtime.core.models["b"].pid != pid_b
    status, body, _ = await d.chat("c")
    assert status == 200 and body["model"] == "c"

    write(tmp_path / "models.toml", tiny_models, {"a": (1, ["-c", "512"])})
    status, summary = await d.post_json("/reload")
    assert sorted(summary["removed"]) == ["b", "c"]
    await d.wait_until(lambda: set(d.runtime.core.models) == {"a"})
    assert len(llama_children()) == 1
    status, body, _ = await d.chat("b")
    assert status == 404


async def test_an_invalid_config_is_refused_with_the_reason_and_the_old_one_stays(start_daemon, tiny_models, tmp_path):
    path = write(tmp_path / "models.toml", tiny_models, {"a": (1, ["-c", "512"])})
    d = await start_daemon({}, config_path=path)
    assert (await d.chat("a"))[0] == 200
    (tmp_path / "models.toml").write_text((tmp_path / "models.toml").read_text() + "ttl_s = 'soon'\n")
    status, body = await d.post_json("/reload")
    assert status == 400 and body["error"]["code"] == "invalid_config"
    assert any(p.startswith("models.a.ttl_s") for p in body["problems"])
    write(tmp_path / "models.toml", tiny_models, {"a": (1, ["-c", "512"]), "z": (2, [])})
    (tmp_path / "models.toml").write_text((tmp_path / "models.toml").read_text().replace(str(tiny_models[2]), "/nope.gguf"))
    status, body = await d.post_json("/reload")
    assert status == 400 and "models.z.model: file not found" in body["error"]["message"]
    assert list(d.runtime.config.models) == ["a"]
    assert (await d.chat("a"))[0] == 200

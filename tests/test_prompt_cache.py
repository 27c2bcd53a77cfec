"""Prompt-cache persistence against the real llama-server: a swapped-out model comes back with its prompt cache.

llama-server reports what it had to compute for a request as `timings.prompt_n` (and what it reused as
`timings.cache_n`): after a swap back, a restart, a changed model or a damaged file, that number says whether the
saved slots were restored.
"""

from __future__ import annotations

import pytest
import structlog

pytestmark = pytest.mark.llama

PROMPT = " ".join(f"word{i}" for i in range(400))  # about 1,500 tokens with the test models' vocabulary
ARGS = ["-c", "4096", "-np", "1"]


def pair(tiny_models, **a_extra) -> dict[str, dict]:
    return {"a": {"model": str(tiny_models[1]), "args": ARGS, **a_extra},
            "b": {"model": str(tiny_models[2]), "args": ARGS}}


async def ask(d, model: str, content: str = PROMPT) -> tuple[int, str]:
    """(prompt tokens computed, the greedy answer)."""
    status, body, _ = await d.chat(model, content=content, max_tokens=8, temperature=0)
    assert status == 200, body
    return body["timings"]["prompt_n"], body["choices"][0]["message"]["content"]


def saved_files(state_dir, model: str) -> list[str]:
    folder = state_dir / "prompt-cache" / model
    return sorted(p.name for p in folder.glob("slot-*.bin")) if folder.is_dir() else []


async def test_a_model_swapped_back_skips_the_prefill_and_answers_the_same(start_daemon, tiny_models, tmp_path):
    d = await start_daemon(pair(tiny_models))
    full, first_answer = await ask(d, "a")
    assert full > 1000
    await ask(d, "b", "something else")  # swaps a out: its slot is saved first
    _, status = await d.get_json("/status")
    saved = status["models"]["a"]["prompt_cache"]
    assert saved["tokens"] >= full and saved["bytes"] > 0 and saved["slots"] == 1 and saved["age_s"] >= 0
    computed, answer = await ask(d, "a")  # swapped back: restored before it was reported ready
    assert computed < full * 0.05 and answer == first_answer
    computed, _ = await ask(d, "a", "a different prompt " + PROMPT[::-1])
    assert computed > 1000  # a prompt that does not share the prefix is computed in full
    metrics = await (await d.http.get(f"{d.url}/metrics")).text()
    assert 'model_supervisor_prompt_cache_operations_total{model="a",operation="save"} 1.0' in metrics
    assert 'model_supervisor_prompt_cache_operations_total{model="a",operation="restore"} 1.0' in metrics


async def test_the_cache_survives_a_daemon_restart(start_daemon, tiny_models, tmp_path):
    d = await start_daemon(pair(tiny_models))
    full, first_answer = await ask(d, "a")
    await d.http.close()
    await d.daemon.stop()  # shutdown saves too
    d = await start_daemon(pair(tiny_models))
    computed, answer = await ask(d, "a")
    assert computed < full * 0.05 and answer == first_answer


async def test_a_changed_context_size_discards_the_old_state(start_daemon, tiny_models, tmp_path):
    d = await start_daemon(pair(tiny_models))
    full, _ = await ask(d, "a")
    await ask(d, "b", "x")
    assert saved_files(tmp_path / "state", "a") == ["slot-0.bin"]
    await d.http.close()
    await d.daemon.stop()
    d = await start_daemon(pair(tiny_models, args=["-c", "3072", "-np", "1"]))
    computed, _ = await ask(d, "a")
    assert computed > 1000
    await ask(d, "b", "x")  # and what it saves now is this configuration's
    assert saved_files(tmp_path / "state", "a") == ["slot-0.bin"]


async def test_opting_out_saves_nothing(start_daemon, tiny_models, tmp_path):
    d = await start_daemon(pair(tiny_models, prompt_cache=False))
    full, _ = await ask(d, "a")
    await ask(d, "b", "x")
    assert saved_files(tmp_path / "state", "a") == []
    computed, _ = await ask(d, "a")
    assert computed > 1000


async def test_globally_off_saves_nothing(start_daemon, tiny_models, tmp_path):
    d = await start_daemon(pair(tiny_models), prompt_cache={"enabled": False})
    await ask(d, "a")
    await ask(d, "b", "x")
    assert saved_files(tmp_path / "state", "a") == []


async def test_the_disk_budget_evicts_the_least_recently_used_model(start_daemon, tiny_models, tmp_path):
    d = await start_daemon(pair(tiny_models), prompt_cache={"max_mb": 1})  # one model's slot (0.8 MB) fits, not two
    await ask(d, "a")
    await ask(d, "b")  # a saved
    assert saved_files(tmp_path / "state", "a") == ["slot-0.bin"]
    await ask(d, "a")  # b saved: a (older) is evicted to stay within 1 MB
    assert saved_files(tmp_path / "state", "b") == ["slot-0.bin"]
    assert saved_files(tmp_path / "state", "a") == []


async def test_a_damaged_file_is_not_restored_and_the_model_serves(start_daemon, tiny_models, tmp_path):
    d = await start_daemon(pair(tiny_models))
    full, first_answer = await ask(d, "a")
    await ask(d, "b", "x")
    await d.daemon.children.prompt_cache.flush()  # its checksum is recorded (after the stop, off the swap's path)
    (saved,) = (tmp_path / "state" / "prompt-cache" / "a").glob("slot-*.bin")
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF
    saved.write_bytes(bytes(data))
    with structlog.testing.capture_logs() as logs:
        computed, answer = await ask(d, "a")
    assert computed > 1000 and answer == first_answer
    about_a = [e["event"] for e in logs if e["event"].startswith("prompt_cache") and e.get("model") == "a"]
    assert about_a == ["prompt_cache_file_damaged"]  # one clear line, and nothing restored


async def test_a_restore_llama_server_refuses_is_logged_once_and_saving_stops(start_daemon, tiny_models, tmp_path):
    import json
    import zlib

    d = await start_daemon(pair(tiny_models))
    await ask(d, "a")
    await ask(d, "b", "x")
    await d.daemon.children.prompt_cache.flush()
    folder = tmp_path / "state" / "prompt-cache" / "a"
    # An intact file (size and checksum as recorded) that llama-server cannot take, as a model it cannot restore.
    (folder / "slot-0.bin").write_bytes(b"not a slot file" * 100)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["slots"]["0"]
    entry["bytes"] = (folder / "slot-0.bin").stat().st_size
    entry["checksum"] = f"crc32:{zlib.crc32((folder / 'slot-0.bin').read_bytes()):08x}"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with structlog.testing.capture_logs() as logs:
        computed, _ = await ask(d, "a")
        await ask(d, "b", "x")  # a stops again: nothing is saved for it now
        await ask(d, "a")
    assert computed > 1000
    about_a = [e["event"] for e in logs if e["event"].startswith("prompt_cache") and e.get("model") == "a"]
    assert about_a == ["prompt_cache_unsupported"]
    assert saved_files(tmp_path / "state", "a") == []


async def test_a_full_disk_only_costs_the_cache(start_daemon, tiny_models, tmp_path):
    from test_request_faults import fill, small_tmpfs

    with small_tmpfs(tmp_path / "state", size="4m") as state:
        d = await start_daemon(pair(tiny_models), state_dir=str(state))
        await ask(d, "a")
        fill(state)
        with structlog.testing.capture_logs() as logs:
            await ask(d, "b", "x")  # a's save fails: the swap goes on
        assert any(e["event"] == "prompt_cache_save_failed" and e["model"] == "a" for e in logs)
        assert d.state("a") == "unloaded" and saved_files(state, "a") == []
        computed, _ = await ask(d, "a")
        assert computed > 1000
        await d.http.close()
        await d.daemon.stop()


async def test_a_model_removed_from_the_config_takes_its_saved_slots_with_it(start_daemon, tiny_models, tmp_path,
                                                                          llama_server_bin):
    config = tmp_path / "models.toml"
    head = (f'[daemon]\nllama_server = "{llama_server_bin}"\nstate_dir = "{tmp_path / "state"}"\nport_range = [19300, 19399]\n'
            f'[models.b]\nmodel = "{tiny_models[2]}"\nargs = {json_list(ARGS)}\n')
    config.write_text(head + f'[models.a]\nmodel = "{tiny_models[1]}"\nargs = {json_list(ARGS)}\n')
    d = await start_daemon({}, config_path=str(config))
    await ask(d, "a")
    await ask(d, "b", "x")
    assert saved_files(tmp_path / "state", "a") == ["slot-0.bin"]
    config.write_text(head)
    status, summary = await d.post_json("/reload")
    assert status == 200 and summary["removed"] == ["a"]
    assert not (tmp_path / "state" / "prompt-cache" / "a").exists()


def json_list(values: list[str]) -> str:
    import json

    return json.dumps(values)


async def test_a_restored_slot_nobody_used_is_saved_again_at_the_next_stop(start_daemon, tiny_models, tmp_path):
    d = await start_daemon(pair(tiny_models))
    full, _ = await ask(d, "a")
    await ask(d, "b", "x")
    status, _ = await d.post_json("/models/a/load")  # a comes back with its slot restored, asked nothing
    assert status == 200
    await ask(d, "b", "x")  # and goes again: its restored slot is saved again
    computed, _ = await ask(d, "a")
    assert computed < full * 0.05

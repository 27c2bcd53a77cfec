"""What an operator sees in a terminal: `status` (fits 80 columns, colours only a terminal, a failure's whole cause),
`load` (a progress bar on a terminal, plain lines in a pipe) and `status --watch` (what happens, one line each).
The CLI runs as a user runs it, a separate process, against the daemon with FakeChildren (no llama-server)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pathlib
import pty
import re
import signal
import struct
import sys
import termios

import pytest

from model_supervisor.process import LoadError

ANSI = re.compile(r"\x1b\[")
CAUSE = ("llama-server exited with code 1 while loading",
         "llama_model_load: error loading model: tensor 'blk.0.attn_q.weight' has wrong shape",
         "main: exiting due to model loading error")  # fmt: skip


def env(**extra: str) -> dict[str, str]:
    """The CLI's environment: no colour or width settings from the caller's, no admin token, no config."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "MODEL_SUPERVISOR_ADMIN_TOKEN",
                         "MODEL_SUPERVISOR_CONFIG", "MODEL_SUPERVISOR_URL", "TERM")}  # fmt: skip
    return {**base, "TERM": "xterm-256color", **extra}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "model_supervisor.cli", *args]


async def run_piped(*args: str, tmp_path, **extra: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(*command(*args), stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE, env=env(**extra), cwd=tmp_path)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


class Terminal:
    """A command on a pseudo-terminal (stdout and stderr), its output read as it comes."""

    def __init__(self) -> None:
        self.output = b""
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Future | None = None

    async def start(self, *args: str, tmp_path, columns: int = 120, **extra: str) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        self.master = master
        self.process = await asyncio.create_subprocess_exec(*command(*args), stdin=slave, stdout=slave, stderr=slave,
                                                            env=env(**extra), cwd=tmp_path, start_new_session=True)
        os.close(slave)
        self._reader = asyncio.ensure_future(asyncio.to_thread(self._read))

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: every holder of the other end has closed it
                break
            if not chunk:
                break
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    async def wait_for(self, needle: str, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while needle not in self.text:
                await asyncio.sleep(0.05)

    async def finish(self, timeout: float = 60) -> int:
        assert self.process is not None and self._reader is not None
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(self._reader, 10)
        os.close(self.master)
        return code


async def a_failed_and_b_ready(start_fake_daemon, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    d = await start_fake_daemon({"a": {"model": str(model), "vram_mb": 1},
                                 "b-with-a-longer-name": {"model": str(model), "vram_mb": 1, "ttl_s": 600}},
                                {"main": {"swap": False}})  # fmt: skip
    d.daemon.children.failures["a"] = LoadError("\n".join(CAUSE))
    status, body = await d.post_json("/models/a/load")
    assert status == 503, body
    assert (await d.post_json("/models/b-with-a-longer-name/load"))[0] == 200
    status, lease = await d.post_json("/leases", {"owner": "tts", "vram_mb": 300, "ttl_s": 600})
    assert status == 201
    return d, lease["id"]


def visible(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


async def test_status_in_a_pipe_has_no_colour_whole_lines_and_the_whole_cause(start_fake_daemon, tmp_path):
    d, lease = await a_failed_and_b_ready(start_fake_daemon, tmp_path)
    for extra in ({}, {"COLUMNS": "80"}, {"NO_COLOR": "1"}, {"FORCE_COLOR": "1", "COLUMNS": "80"}):
        code, out, err = await run_piped("status", "--url", d.url, tmp_path=tmp_path, **extra)
        assert code == 0, err
        assert not ANSI.search(out), f"escape codes in a pipe with {extra}:\n{out!r}"
        # No terminal to fit: every column, and lines stay whole (for grep), whatever $COLUMNS says.
        header = out.splitlines()[0].split()
        assert header[:2] == ["MODEL", "STATE"] and {"TTFT", "PID", "PORT", "NOTE"} <= set(header)
        assert re.search(r"^a\s+failed\s", out, re.MULTILINE)
        assert re.search(r"^b-with-a-longer-name\s+ready\s", out, re.MULTILINE)
        assert "a failed:\n" + "".join(f"  {line}\n" for line in CAUSE) in out
        assert "models 1 MB, leases 300 MB, other programs 0 MB" in out and "gaming mode: off" in out
        assert re.search(rf"^{lease}\s+tts\s+300\s", out, re.MULTILINE)  # the lease table

    # --json is the document itself.
    code, out, err = await run_piped("status", "--url", d.url, "--json", tmp_path=tmp_path)
    document = json.loads(out)
    assert code == 0 and document["models"]["a"]["last_error"] == "\n".join(CAUSE)
    assert set(document) == set((await d.get_json("/status"))[1])


@pytest.mark.parametrize("how", ["an 80-column terminal", "COLUMNS=80 on a wider one"])
async def test_status_fits_80_columns_on_a_terminal_in_colour_unless_no_color(start_fake_daemon, tmp_path, how):
    d, lease = await a_failed_and_b_ready(start_fake_daemon, tmp_path)
    size = {"columns": 80} if how.startswith("an") else {"columns": 200, "COLUMNS": "80"}
    for no_color in (False, True):
        terminal = Terminal()
        await terminal.start("status", "--url", d.url, tmp_path=tmp_path, **size, **({"NO_COLOR": "1"} if no_color
                                                                                    else {}))  # fmt: skip
        assert await terminal.finish() == 0, terminal.text
        if no_color:
            assert not ANSI.search(terminal.text), terminal.text
        else:
            assert "\x1b[31m" in terminal.text or "\x1b[1;31m" in terminal.text, terminal.text  # failed, in red
        text = visible(terminal.text)
        too_long = [line for line in text.splitlines() if len(line) > 80]
        assert too_long == [], "\n".join(too_long)
        assert re.search(r"^a\s+failed\s", text, re.MULTILINE)
        assert re.search(r"^b-with-a-longer-name\s+ready\s", text, re.MULTILINE)
        unwrapped = " ".join(text.split())  # a cause line longer than 80 columns wraps; every word of it is there
        for line in CAUSE:
            assert " ".join(line.split()) in unwrapped, line
        assert "a failed:" in text and "memory: fixed test device" in text and "gaming mode: off" in text
        assert re.search(rf"^{lease}\s+tts\s+300\s", text, re.MULTILINE)


async def one_model(start_fake_daemon, tmp_path, **extra):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    return await start_fake_daemon({"a": {"model": str(model), "vram_mb": 1},
                                    "b": {"model": str(model), "vram_mb": 1}}, {"main": {"swap": True}},
                                   **extra)  # fmt: skip


async def read_lines_until(stream: asyncio.StreamReader, pattern: str, seen: list[str], timeout: float = 20) -> str:
    """Lines from `stream` (kept in `seen`) until one matches `pattern`; that one."""
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"the stream ended before a line matching {pattern!r}; lines: {seen}"
            seen.append(line.rstrip("\n"))
            if re.search(pattern, line):
                return line


async def test_load_says_how_it_goes_in_plain_lines_when_piped(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path)
    children = d.daemon.children
    gate = children.hold("a")
    process = await asyncio.create_subprocess_exec(*command("load", "a", "--url", d.url), env=env(), cwd=tmp_path,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []
    await read_lines_until(process.stderr, r"^a: loading \(never loaded before\)$", lines)
    await asyncio.sleep(1)  # a load that takes a while: the next one's progress goes by quarters
    gate.set()
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, lines + [err.decode()]
    assert re.fullmatch(r"a: ready \(loaded in \d+ ms\)\n", out.decode())
    assert not ANSI.search("\n".join(lines) + err.decode())

    # Loaded before: the progress has a basis, and goes by quarters. Asked for while b is loaded: it waits first.
    assert (await d.post_json("/models/b/load"))[0] == 200
    held = await d.runtime.acquire("b")  # b is busy: a waits for it to drain
    children.start_entered.clear()
    gate = children.hold("a")
    process = await asyncio.create_subprocess_exec(*command("load", "a", "--url", d.url), env=env(), cwd=tmp_path,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    lines = []
    await read_lines_until(process.stderr, r"^a: waiting: draining b$", lines)
    d.runtime.release(held)
    await children.start_entered.wait()
    await read_lines_until(process.stderr, r"^a: loading \(its last load took \d+ ms\)", lines)
    await read_lines_until(process.stderr, r"^a: loading (25|50|75)%$", lines)
    gate.set()
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0 and out.decode().startswith("a: ready"), lines + [err.decode()]

    # A load that fails: exit 1 with the reason.
    children.failures["b"] = LoadError("no such file: m.gguf")
    code, out, err = await run_piped("load", "b", "--url", d.url, tmp_path=tmp_path)
    assert code == 1 and "load b failed" in err and "no such file: m.gguf" in err and out == ""


async def test_load_shows_a_progress_bar_on_a_terminal(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path)
    gate = d.daemon.children.hold("a")
    terminal = Terminal()
    await terminal.start("load", "a", "--url", d.url, tmp_path=tmp_path, columns=100)
    await terminal.wait_for("a: loading (never loaded before)")
    gate.set()
    assert await terminal.finish() == 0, terminal.text
    assert ANSI.search(terminal.text) and "a: ready (loaded in" in terminal.text


async def test_status_watch_prints_what_happens_one_line_each(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path)
    process = await asyncio.create_subprocess_exec(*command("status", "--watch", "--url", d.url), env=env(),
                                                   cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)  # fmt: skip
    lines: list[str] = []
    try:
        await read_lines_until(process.stdout, r"watching .*no model loaded; gaming mode off; 0 leases", lines)
        assert (await d.post_json("/models/a/load"))[0] == 200
        await read_lines_until(process.stdout, r"^\d\d:\d\d:\d\d  loaded +a in \d+ ms \(admin\)$", lines)
        assert (await d.post_json("/models/b/load"))[0] == 200  # b swaps a out
        await read_lines_until(process.stdout, r"  unloaded +a \(swap; stopped in \d+ ms\)$", lines)
        await read_lines_until(process.stdout, r"  swapped +a -> b in \d+ ms \(admin; loading b took \d+ ms\)$", lines)
        assert (await d.post_json("/models/b/unload"))[0] == 200
        await read_lines_until(process.stdout, r"  unloaded +b \(\w+; stopped in \d+ ms\)$", lines)
        status, lease = await d.post_json("/leases", {"owner": "tts", "vram_mb": 300, "ttl_s": 600})
        assert status == 201
        await read_lines_until(process.stdout, rf"  lease +{lease['id']} granted: tts holds 300 MB", lines)
        assert (await d.post_json("/gaming-mode", {"enabled": True}))[0] == 200
        await read_lines_until(process.stdout, r"  gaming +gaming mode on$", lines)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    assert not any(ANSI.search(line) for line in lines)


@pytest.mark.parametrize("args", [["status"], ["status", "--watch"], ["load", "a"]])
async def test_an_unreachable_daemon_is_one_line_and_exit_1(tmp_path, args):
    code, out, err = await run_piped(*args, "--url", "http://127.0.0.1:9", tmp_path=tmp_path)
    assert code == 1 and "unreachable" in err and "Traceback" not in err


async def test_check_config_fits_80_columns_with_files_and_args_below(tmp_path):
    from model_supervisor.config import load_config

    reference = pathlib.Path(__file__).resolve().parent.parent / "models.toml"
    keys = {target.api_key_env: "set" for target in load_config(reference).cloud.values() if target.api_key_env}
    terminal = Terminal()
    await terminal.start("check-config", str(reference), "--no-files", tmp_path=tmp_path, columns=80, **keys)
    assert await terminal.finish() == 0, terminal.text
    text = visible(terminal.text)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    for name, model in load_config(reference).models.items():
        assert re.search(rf"^{re.escape(name)}\s", text, re.MULTILINE) and f"  file: {model.model}" in text

    code, out, err = await run_piped("check-config", str(reference), "--no-files", tmp_path=tmp_path)
    assert code == 0 and out.splitlines()[2].split() == ["MODEL", "GROUP", "TTL", "PRIO", "ALIASES", "FILE", "ARGS"]


async def test_status_watch_json_prints_each_document_on_one_line(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path)
    process = await asyncio.create_subprocess_exec(*command("status", "--watch", "--json", "--url", d.url), env=env(),
                                                   cwd=tmp_path, stdout=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        first = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
        assert first["models"]["a"]["state"] == "unloaded"
        assert (await d.post_json("/models/a/load"))[0] == 200
        async with asyncio.timeout(20):
            while json.loads(await process.stdout.readline())["models"]["a"]["state"] != "ready":
                pass
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0

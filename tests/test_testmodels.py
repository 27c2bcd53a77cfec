import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import gguf
import pytest

from model_supervisor.testmodels import MIB, main, write_test_model


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_metadata_reads_back(tmp_path):
    path = write_test_model(tmp_path / "m.gguf", seed=7, n_layers=3)
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == "llama"
    assert field(r, "general.name") == "test-model-7"
    assert field(r, "llama.block_count") == 3
    tokens = field(r, "tokenizer.ggml.tokens")
    assert field(r, "llama.vocab_size") == len(tokens) > 259
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3 + 0x41] == "<0x41>"
    assert field(r, "tokenizer.ggml.token_type")[3 + 0x41] == gguf.TokenType.BYTE
    assert "<|im_start|>" in field(r, "tokenizer.chat_template")
    # Exactly the tensors llama.cpp's llama loader creates: 3 global + 9 per layer.
    assert len(r.tensors) == 3 + 9 * 3


def test_seeds_give_different_files_and_names(tmp_path):
    a = write_test_model(tmp_path / "a.gguf", seed=1)
    b = write_test_model(tmp_path / "b.gguf", seed=2)
    again = write_test_model(tmp_path / "a2.gguf", seed=1)
    assert a.read_bytes() != b.read_bytes()
    assert a.read_bytes() == again.read_bytes()  # deterministic per seed
    assert field(gguf.GGUFReader(b), "general.name") == "test-model-2"
    named = write_test_model(tmp_path / "n.gguf", name="custom")
    assert field(gguf.GGUFReader(named), "general.name") == "custom"


def test_size_mb_pads_to_size(tmp_path):
    path = write_test_model(tmp_path / "big.gguf", size_mb=40)
    assert abs(path.stat().st_size - 40 * MIB) <= 0.05 * 40 * MIB
    assert len(gguf.GGUFReader(path).tensors) == 3 + 9 * 2  # padded inside real tensors, none added


def test_atomic_write_creates_parents_and_leaves_no_temp(tmp_path, capsys):
    out = tmp_path / "deep" / "er" / "m.gguf"
    main([str(out), "--seed", "3", "--layers", "1"])
    assert capsys.readouterr().out.strip() == str(out)
    assert os.listdir(out.parent) == ["m.gguf"]
    assert field(gguf.GGUFReader(out), "llama.block_count") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


@contextlib.contextmanager
def llama_server(binary: str, model, tmp_path, *flags: str):
    """Run llama-server on a free port until /health is 200; yields the base URL and always kills it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                                 "-c", "512", "--alias", "test", *flags], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, log_path.read_text(errors="replace")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=1) as resp:
                        if resp.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError):
                    pass  # not listening yet, or 503 while loading
                assert time.monotonic() < deadline, "llama-server did not become healthy"
                time.sleep(0.01)
            yield base
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.llama
def test_llama_server_loads_and_chats(tmp_path, llama_server_bin):
    model = write_test_model(tmp_path / "m.gguf", seed=5)
    with llama_server(llama_server_bin, model, tmp_path) as base:
        chat = post(base + "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
        assert chat["choices"][0]["message"]["content"].strip()
        # The model never samples an end-of-generation token, so it always runs to max_tokens.
        assert chat["usage"]["completion_tokens"] == 8

        completion = post(base + "/v1/completions", {"prompt": "the cat", "max_tokens": 5})
        assert completion["choices"][0]["text"].strip()


@pytest.mark.llama
def test_llama_server_embeddings(tmp_path, llama_server_bin):
    model = write_test_model(tmp_path / "m.gguf", seed=6)
    with llama_server(llama_server_bin, model, tmp_path, "--embeddings") as base:
        emb = post(base + "/v1/embeddings", {"input": ["hello world", "the cat"]})
        assert [len(d["embedding"]) for d in emb["data"]] == [64, 64]

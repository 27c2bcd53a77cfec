"""`model-supervisor import llama-swap`: llama-swap's config.yaml translated into a models.toml."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import tomllib
import urllib.request
from pathlib import Path

import pytest

from model_supervisor.config import ModelConfig, parse_config
from model_supervisor.llamaswap import LlamaSwapError, go_float, load_yaml, translate
from test_cli import free_port, wait_http

REPO = Path(__file__).resolve().parent.parent

REALISTIC = textwrap.dedent("""\
    # A llama-swap config as people write them: macros, groups, a TTS server beside llama-server.
    healthCheckTimeout: 300
    startPort: 10001
    logLevel: debug
    metricsMaxInMemory: 500
    macros:
      "server": >
        /opt/llama.cpp/bin/llama-server
        --host 127.0.0.1 --port ${PORT}
      "ctx": 8192
      "common": "-c ${ctx} -ngl 999 --jinja"
      "temp": 0.7
      "models": "${env.MODELS}"
    models:
      "qwen3-4b":
        name: "Qwen3 4B"
        cmd: |
          # the small default model; ${this_macro_is_in_a_comment}
          ${server}
          -m ${models}/qwen3-4b.gguf
          ${common} --temp ${temp}
          --slot-save-path /var/cache/slots/${MODEL_ID}
          --log-file /var/log/${MODEL_ID}.log
        aliases: ["fast", "gpt-4o-mini"]
        ttl: 600
      "Qwen/Qwen3-30B-A3B":
        macros:
          ctx: 32768
        cmd: ${server} --model "${models}/Qwen3 30B.gguf" ${common} -a qwen30b
        env: ["CUDA_VISIBLE_DEVICES=0"]
        aliases: ["big/one"]
        filters:
          stripParams: "temperature"
      "kokoro":
        cmd: |
          docker run --rm --name ${MODEL_ID}
          -p ${PORT}:8880 ghcr.io/remsky/kokoro-fastapi-gpu
        cmdStop: docker stop ${MODEL_ID}
        env: ["TTS_VOICE=af_bella"]
        checkEndpoint: /v1/audio/voices
        proxy: http://127.0.0.1:${PORT}
        unlisted: true
      "sd":
        cmd: /opt/sd/sd-server --listen-port 7860 -m ${models}/sd.gguf
        proxy: http://127.0.0.1:7860
        checkEndpoint: none
    groups:
      main:
        swap: true
        exclusive: true
        members: ["qwen3-4b", "Qwen/Qwen3-30B-A3B"]
      media:
        swap: false
        exclusive: false
        persistent: true
        members: ["kokoro", "sd"]
""")


def convert(text: str, environ: dict[str, str] | None = None):
    document = load_yaml(textwrap.dedent(text))
    result = translate(document.data, source="config.yaml", environ=environ or {}, locate=document.line)
    return result, tomllib.loads(result.toml)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "model_supervisor.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)  # fmt: skip


# ---------------------------------------------------------------- translation


def test_a_realistic_config_translates_key_by_key():
    result, toml = convert(REALISTIC, {"MODELS": "/srv/models"})
    assert toml["daemon"] == {"llama_server": "/opt/llama.cpp/bin/llama-server", "port_range": [10001, 10100],
                              "health_timeout_s": 300}  # fmt: skip
    assert toml["groups"] == {"main": {"swap": True, "exclusive": True, "persistent": False},
                              "media": {"swap": False, "exclusive": False, "persistent": True}}  # fmt: skip
    models = toml["models"]
    assert list(models) == ["qwen3-4b", "Qwen-Qwen3-30B-A3B", "kokoro", "sd"]
    # llama-server: the model file, the args without what the daemon sets (host, port, alias, slot-save-path),
    # macros expanded (nested, later ones using earlier ones, ${env.VAR}, ${MODEL_ID}; not in comment lines).
    assert models["qwen3-4b"] == {
        "model": "/srv/models/qwen3-4b.gguf",
        "aliases": ["fast", "gpt-4o-mini"],
        "args": ["-c", "8192", "-ngl", "999", "--jinja", "--temp", "0.7", "--log-file", "/var/log/qwen3-4b.log"],
        "group": "main",
        "ttl_s": 600,
    }
    # A model's own macros win over the global ones; env; a quoted path with a space stays one argument.
    assert models["Qwen-Qwen3-30B-A3B"] == {
        "model": "/srv/models/Qwen3 30B.gguf",
        "aliases": ["big-one"],
        "args": ["-c", "32768", "-ngl", "999", "--jinja"],
        "group": "main",
        "env": ["CUDA_VISIBLE_DEVICES=0"],
    }
    # Anything else is a cmd model: ${PORT} and ${MODEL_ID} left for the daemon; the default proxy is implied.
    assert models["kokoro"] == {
        "cmd": ["docker", "run", "--rm", "--name", "${MODEL_ID}", "-p", "${PORT}:8880",
                "ghcr.io/remsky/kokoro-fastapi-gpu"],
        "group": "media",
        "env": ["TTS_VOICE=af_bella"],
        "check_endpoint": "/v1/audio/voices",
    }  # fmt: skip
    assert models["sd"] == {
        "cmd": ["/opt/sd/sd-server", "--listen-port", "7860", "-m", "/srv/models/sd.gguf"],
        "group": "media",
        "check_endpoint": "none",
        "proxy": "http://127.0.0.1:7860",
    }
    assert "cmd" not in models["qwen3-4b"] and "model" not in models["kokoro"]
    # The renamed model says so next to its section, and what was dropped from the cmd.
    text = result.toml
    assert "[models.Qwen-Qwen3-30B-A3B]\n# llama-swap ID 'Qwen/Qwen3-30B-A3B' (not a valid name here" in text
    assert "dropped from llama-swap's cmd: --host 127.0.0.1 --port ${PORT} --slot-save-path" in text
    assert "[models.qwen3-4b]\n# Qwen3 4B\n" in text


def test_what_has_no_equivalent_is_listed_at_the_top_one_line_per_key_and_model():
    result, _ = convert(REALISTIC, {"MODELS": "/m"})
    lines = [str(w) for w in result.warnings]
    for key in ("logLevel", "metricsMaxInMemory", "models.kokoro.cmdStop", "models.kokoro.unlisted",
                'models."Qwen/Qwen3-30B-A3B".filters', "models.qwen3-4b.name"):  # fmt: skip
        assert sum(line.startswith(key + ":") for line in lines) == 1, (key, lines)
    assert any(line.startswith('models."Qwen/Qwen3-30B-A3B": ') and "renamed 'Qwen-Qwen3-30B-A3B'" in line
               for line in lines)  # fmt: skip
    header = result.toml.split("\n[", 1)[0]
    for line in lines:
        assert f"#   {line}" in header
    # In the file's order.
    assert lines.index(next(x for x in lines if x.startswith("logLevel"))) < lines.index(
        next(x for x in lines if x.startswith("models.kokoro.cmdStop")))


def test_the_cli_prints_toml_on_stdout_and_warnings_with_lines_on_stderr(tmp_path):
    source = tmp_path / "config.yaml"
    source.write_text(REALISTIC)
    result = cli("import", "llama-swap", str(source), env={"MODELS": "/srv/models"})
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["models"]["sd"]["proxy"] == "http://127.0.0.1:7860"
    line = REALISTIC.splitlines().index("    cmdStop: docker stop ${MODEL_ID}") + 1
    assert f"{source}:{line}: models.kokoro.cmdStop: no equivalent" in result.stderr
    assert f"{source}:4: logLevel:" in result.stderr
    assert "Traceback" not in result.stderr


def test_native_models_pass_our_own_validation():
    _, toml = convert("""\
        models:
          a:
            cmd: llama-server --port ${PORT} -m /m/a.gguf -c 512 --alias=a
            aliases: [one]
          b:
            cmd: /usr/bin/llama-server -m /m/b.gguf --model=/m/b2.gguf --slot-save-path=/tmp -ngl 99
            ttl: 60
        groups:
          g: {swap: false, members: [a, b]}
        """)
    config = parse_config(toml)
    assert config.models["b"].model == Path("/m/b2.gguf") and config.models["b"].args == ["-ngl", "99"]
    assert config.models["a"].args == ["-c", "512"] and config.resolve("one") == "a"
    assert config.group_of("a").swap is False and config.group_of("a").exclusive is True


def test_several_llama_server_binaries_pick_the_most_common_and_name_the_others():
    result, toml = convert("""\
        models:
          a: {cmd: /opt/cuda/llama-server -m /m/a.gguf}
          b: {cmd: /opt/cuda/llama-server -m /m/b.gguf}
          c: {cmd: /opt/vulkan/llama-server -m /m/c.gguf}
        """)
    assert toml["daemon"]["llama_server"] == "/opt/cuda/llama-server"
    assert "# llama-swap also ran /opt/vulkan/llama-server for c; they run /opt/cuda/llama-server here" in result.toml
    assert any(str(w).startswith("models.c.cmd: ran /opt/vulkan/llama-server") for w in result.warnings)


def test_names_aliases_and_groups_that_are_not_valid_here_are_mapped():
    result, toml = convert("""\
        models:
          "org/model a": {cmd: llama-server -m /m/a.gguf, aliases: ["x/y", "org-model-a", "ok"]}
          "org-model-a": {cmd: llama-server -m /m/b.gguf, aliases: ["ok"]}
          "free": {cmd: llama-server -m /m/c.gguf}
        groups:
          "my group": {members: ["org/model a", "nope"]}
          "default": {swap: false, members: ["org-model-a"]}
        """)
    models = toml["models"]
    # A valid ID keeps its name; the invalid one is mapped around it.
    assert list(models) == ["org-model-a-2", "org-model-a", "free"]
    assert models["org-model-a-2"]["aliases"] == ["x-y", "ok"]
    assert "aliases" not in models["org-model-a"]  # "ok" is taken
    assert models["org-model-a-2"]["group"] == "my-group"
    # Models outside any group are in our `default` group: llama-swap's group of that name is renamed.
    assert models["org-model-a"]["group"] == "default-2" and "group" not in models["free"]
    assert toml["groups"]["default-2"]["swap"] is False
    warnings = "\n".join(map(str, result.warnings))
    assert "'nope' is not a model ID" in warnings and "'ok' is already a model's name or alias" in warnings
    parse_config(toml)


def test_ttl_global_ttl_timeouts_priorities_and_preload():
    result, toml = convert("""\
        globalTTL: 120
        unloadTimeout: 20
        healthCheckTimeout: 5
        startPort: 65500
        models:
          a: {cmd: llama-server -m /m/a.gguf, ttl: 30}
          b: {cmd: llama-server -m /m/b.gguf}
          c: {cmd: llama-server -m /m/c.gguf, ttl: 0, aliases: [see]}
        hooks:
          on_startup:
            preload: [see]
        routing:
          scheduler:
            settings:
              fifo:
                priority: {a: 10, nobody: 1}
        """)
    models = toml["models"]
    assert models["a"]["ttl_s"] == 30 and models["b"]["ttl_s"] == 120 and "ttl_s" not in models["c"]
    assert models["a"]["priority"] == 10
    assert toml["daemon"]["port_range"] == [65500, 65535]
    assert toml["daemon"]["health_timeout_s"] == 15  # llama-swap's minimum
    assert toml["daemon"]["stop_timeout_s"] == 20
    if "preload" in ModelConfig.model_fields:
        assert models["c"]["preload"] is True
    else:
        assert any(str(w).startswith("hooks.on_startup.preload:") for w in result.warnings)


def test_llama_server_without_a_model_file_and_versioned_binaries_stay_cmd_models():
    result, toml = convert("""\
        models:
          hf: {cmd: "llama-server -hf ggml-org/gemma-3-1b-it-GGUF --port ${PORT}"}
          ver: {cmd: "/opt/llama-server-b5000 -m /m/a.gguf --port ${PORT}"}
        """)
    assert toml["models"]["hf"]["cmd"] == ["llama-server", "-hf", "ggml-org/gemma-3-1b-it-GGUF", "--port", "${PORT}"]
    assert toml["models"]["ver"]["cmd"][0] == "/opt/llama-server-b5000"
    assert "daemon" not in toml
    warnings = "\n".join(map(str, result.warnings))
    assert "models.hf.cmd: llama-server without -m/--model" in warnings
    assert "models.ver.cmd: runs 'llama-server-b5000', not 'llama-server'" in warnings


def test_yaml_merge_keys_model_id_macros_and_alias_bombs():
    bomb = "".join(f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    _, toml = convert("x-defaults: &defaults\n  ttl: 300\n  env: [A=1]\na: &a [lol, lol, lol]\n" + bomb + """\
models:
  one:
    <<: *defaults
    cmd: llama-server -m /m/${MODEL_ID}.gguf
  two:
    <<: *defaults
    ttl: 5
    cmd: "tts --name ${MODEL_ID} --port ${PORT}"
    checkEndpoint: "/ready/${MODEL_ID}"
    proxy: "http://localhost:${PORT}/"
""")
    assert toml["models"]["one"] == {"model": "/m/one.gguf", "ttl_s": 300, "env": ["A=1"]}
    assert toml["models"]["two"] == {"cmd": ["tts", "--name", "${MODEL_ID}", "--port", "${PORT}"], "ttl_s": 5,
                                     "env": ["A=1"], "check_endpoint": "/ready/two"}  # fmt: skip


def test_macro_values_are_written_as_llama_swap_writes_them():
    assert [go_float(x) for x in (0.7, 1.0, 123456.0, 1e6, 1.5e-5, 0.0001, -2.5)] == [
        "0.7", "1", "123456", "1e+06", "1.5e-05", "0.0001", "-2.5"]  # fmt: skip
    _, toml = convert("""\
        macros: {yes_word: yes, flag: true, big: 1000000.0}
        models:
          a: {cmd: "llama-server -m /m/a.gguf --x ${yes_word} --y ${flag} --z ${big}"}
        """)
    # YAML 1.2 as llama-swap reads it: `yes` is a string, not a boolean.
    assert toml["models"]["a"]["args"] == ["--x", "yes", "--y", "true", "--z", "1e+06"]


def test_strings_that_need_escaping_survive_the_round_trip():
    _, toml = convert("""\
        models:
          "q:7b": {cmd: "tts --say 'a \\"quoted\\" \\\\ back\\tslash' --ünï ${PORT}", aliases: ["q.alias"]}
        """)
    assert toml["models"]["q:7b"]["cmd"] == ["tts", "--say", 'a "quoted" \\ back\tslash', "--ünï", "${PORT}"]


@pytest.mark.parametrize("text, message", [
    ("models: [a, b]\n", "models: must be a mapping"),
    ("- just\n- a list\n", "not a llama-swap config: the file is a list"),
    ("", "the file is empty"),
    ("models:\n  a:\n    aliases: [x]\n", "models.a: no cmd"),
    ("macros: {PORT: 1}\nmodels: {}\n", "macros.PORT: PORT is reserved"),
    ("models:\n  a: {cmd: 'x ${undefined}'}\n", "models.a.cmd: macro ${undefined} cannot be resolved"),
    ("models:\n  a: {cmd: 'llama-server -m ${env.NOT_SET_ANYWHERE}'}\n", "NOT_SET_ANYWHERE is not set"),
])  # fmt: skip
def test_bad_input_raises_with_the_key(text, message):
    with pytest.raises(LlamaSwapError, match=message.replace("$", r"\$").replace("{", r"\{").replace("[", r"\[")):
        convert(text)


def test_bad_yaml_exits_2_naming_the_file_and_line(tmp_path):
    broken = tmp_path / "config.yaml"
    broken.write_text('models:\n  a:\n    cmd: llama-server -m a.gguf\n  b: {cmd: "x"\n  c: 1\n')
    result = cli("import", "llama-swap", str(broken))
    assert result.returncode == 2 and result.stdout == ""
    assert f"{broken}:5: not valid YAML" in result.stderr and "begun on line 4" in result.stderr
    assert "Traceback" not in result.stderr

    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- a\n- b\n")
    result = cli("import", "llama-swap", str(not_a_mapping))
    assert result.returncode == 2 and f"{not_a_mapping}:1: not a llama-swap config" in result.stderr

    # An unresolved macro inside a block: the line of the macro itself, not of `cmd: |`.
    macro = tmp_path / "macro.yaml"
    macro.write_text("macros:\n  ctx: 512\nmodels:\n  a:\n    cmd: |\n      llama-server\n      -m /m.gguf\n"
                     "      -c ${ctx} ${nope}\n")  # fmt: skip
    result = cli("import", "llama-swap", str(macro))
    assert result.returncode == 2 and f"{macro}:8: models.a.cmd: macro ${{nope}} cannot be resolved" in result.stderr

    twice = tmp_path / "twice.yaml"
    twice.write_text("models:\n  a: {cmd: x}\n  a: {cmd: y}\n")
    result = cli("import", "llama-swap", str(twice))
    assert result.returncode == 2 and f"{twice}:3: models.a: defined twice (first on line 2)" in result.stderr

    result = cli("import", "llama-swap", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "cannot read it" in result.stderr


# ---------------------------------------------------------------- end to end


@pytest.mark.llama
def test_an_imported_config_checks_and_serves(tmp_path, tiny_models, llama_server_bin):
    source = tmp_path / "config.yaml"
    source.write_text(textwrap.dedent(f"""\
        healthCheckTimeout: 60
        startPort: 19600
        logLevel: debug
        macros:
          server: "{llama_server_bin} --host 127.0.0.1 --port ${{PORT}}"
          small: "-c 512"
        models:
          "tiny/chat":
            cmd: |
              ${{server}}
              --model {tiny_models[1]}
              ${{small}} --alias ${{MODEL_ID}}
            aliases: ["fast"]
            ttl: 300
          "second":
            cmd: {llama_server_bin} -m {tiny_models[2]} ${{small}} --port ${{PORT}}
        groups:
          pair:
            swap: true
            exclusive: true
            members: ["tiny/chat", "second"]
        """))
    imported = cli("import", "llama-swap", str(source))
    assert imported.returncode == 0, imported.stderr
    assert "logLevel: no config key" in imported.stderr
    config = tmp_path / "models.toml"
    config.write_text(imported.stdout)
    checked = cli("check-config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "tiny-chat" in checked.stdout and "pair[swap,exclusive]" in checked.stdout

    port = free_port()
    env = {**os.environ, "MODEL_SUPERVISOR_DAEMON__LISTEN": f"127.0.0.1:{port}",
           "MODEL_SUPERVISOR_DAEMON__STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    daemon = subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", daemon)
        for name in ("tiny-chat", "fast", "second"):
            body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.status == 200
                answer = json.loads(response.read())
            assert answer["choices"][0]["message"]["role"] == "assistant", answer
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

"""The command line on an installed host: finding the config, unreadable configs, --version, key warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from model_supervisor import cli


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_supervisor.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=60)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("model-supervisor ")


def test_check_config_takes_config_like_the_other_commands_and_warns_of_an_unset_key(tmp_path):
    config = tmp_path / "models.toml"
    config.write_text('[cloud.frontier]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "big"\n'
                      'api_key_env = "SURELY_UNSET_KEY_VARIABLE"\n')
    for args in (["check-config", "--config", str(config)], ["check-config", str(config)]):
        result = run(*args, "--no-files")
        assert result.returncode == 0, result.stderr
        assert "cloud.frontier.api_key_env: $SURELY_UNSET_KEY_VARIABLE is not set" in result.stderr
    result = run("check-config", "--no-files", cwd=tmp_path)  # ./models.toml
    assert result.returncode == 0 and f"{'models.toml'}: valid" in result.stdout


def test_an_unreadable_config_is_one_line_not_a_traceback(tmp_path):
    folder = tmp_path / "models.toml"
    folder.mkdir()  # not a file it can read
    result = run("check-config", str(folder))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot read the config" in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    result = run("status", "--config", str(folder), "--url", "http://127.0.0.1:9")
    assert "Traceback" not in result.stderr


def test_the_installed_config_is_found_after_the_local_one(tmp_path, monkeypatch):
    installed = tmp_path / "etc" / "models.toml"
    installed.parent.mkdir()
    installed.write_text("")
    monkeypatch.setattr(cli, "INSTALLED_CONFIG", installed)
    monkeypatch.delenv("MODEL_SUPERVISOR_CONFIG", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.config_path(None) == installed
    (work / "models.toml").write_text("")
    assert cli.config_path(None) == Path("models.toml")
    monkeypatch.setenv("MODEL_SUPERVISOR_CONFIG", "/x/y.toml")
    assert cli.config_path(None) == Path("/x/y.toml")
    assert cli.config_path("given.toml") == Path("given.toml")


def test_a_config_in_a_folder_we_may_not_enter_counts_as_absent(monkeypatch):
    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "is_file", refuse)
    assert cli._exists(Path("/etc/model-supervisor/models.toml")) is False

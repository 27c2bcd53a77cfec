import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    """Path of the real llama-server: $LLAMA_SERVER, else the cached build (built on first use, minutes)."""
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    proc = subprocess.run([str(REPO / "scripts" / "build-llama-server.sh")], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        pytest.fail(f"scripts/build-llama-server.sh failed:\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]

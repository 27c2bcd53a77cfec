#!/usr/bin/env bash
# Sets up this checkout on a fresh machine, idempotently, and finds llama-server:
#   1. creates .venv in the repo root if it is missing (Python >= 3.11; env PYTHON picks the interpreter),
#   2. pip install -e '.[test]' into it, skipped while pyproject.toml is unchanged since the last install,
#   3. builds llama-server with scripts/build-llama-server.sh (~6 min on 2 cores the first time, cached after),
#   4. installs Debian's chromium for the dashboard test when /usr/bin/chromium is missing and we are root with
#      apt-get (~15 s, ~410 MB; MODEL_SUPERVISOR_NO_CHROMIUM=1 skips it; without it that test is skipped).
#
#   scripts/bootstrap.sh             # prints the llama-server path on stdout; progress goes to stderr
#   source scripts/bootstrap.sh      # the same, and exports LLAMA_SERVER, MODEL_SUPERVISOR_REPO, MODEL_SUPERVISOR_VENV
#
# When sourced it leaves the caller's shell options alone and returns (never exits) on failure.
# Needs: python3 with venv (Debian: apt-get install python3-venv), a C/C++ toolchain (build-essential) and
# network access to PyPI for the first run. cmake is taken from PyPI when the system has none.

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # Sourced: run the work in a child bash (so `set -e` applies there and the caller's options stay as they
    # are), then export what the caller needs. `return`, never `exit`.
    if _ms_llama_server="$(bash "${BASH_SOURCE[0]}")"; then
        export LLAMA_SERVER="$_ms_llama_server"
        MODEL_SUPERVISOR_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
        MODEL_SUPERVISOR_VENV="$MODEL_SUPERVISOR_REPO/.venv"
        export MODEL_SUPERVISOR_REPO MODEL_SUPERVISOR_VENV
        unset _ms_llama_server
        return 0
    fi
    unset _ms_llama_server
    return 1
fi

main() {
    set -euo pipefail
    log() { echo "bootstrap: $*" >&2; }

    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$repo/.venv"
    cache_root="${MODEL_SUPERVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/model-supervisor}"
    mkdir -p "$cache_root"

    # One bootstrap at a time per user: demo.sh and test.sh started together must not race on the venv/build.
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$cache_root/bootstrap.lock"
        flock 9
    fi

    # ---- 1. the virtual environment
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
        python="${PYTHON:-}"
        if [ -z "$python" ]; then
            for candidate in python3 python3.13 python3.12 python3.11; do
                if command -v "$candidate" >/dev/null 2>&1 &&
                    "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
                    python="$candidate"
                    break
                fi
            done
        fi
        if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            log "no Python >= 3.11 found${python:+ (PYTHON=$python)}: set PYTHON=/path/to/python3.11 or install python3"
            exit 1
        fi
        log "creating $venv with $("$python" --version 2>&1)"
        rm -rf "$venv"
        if ! "$python" -m venv "$venv" >&2; then
            log "could not create the venv; on Debian: apt-get install python3-venv"
            rm -rf "$venv"
            exit 1
        fi
    fi

    # ---- 2. the package, editable, with the test extras
    stamp="$venv/.model-supervisor-installed"
    want="$(cd "$repo" && "$venv/bin/python" - <<'EOF'
import hashlib, sys
print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), sys.version.split()[0])
EOF
)"
    have="$(cat "$stamp" 2>/dev/null || true)"
    if [ "$want" != "$have" ] || [ ! -x "$venv/bin/model-supervisor" ] ||
        ! (cd / && "$venv/bin/python" -c 'import model_supervisor, pytest' >/dev/null 2>&1); then
        log "installing model-supervisor and its test dependencies into .venv (pip, quiet)"
        pip=("$venv/bin/python" -m pip --disable-pip-version-check)
        # Build-backend warnings are noise here; the whole output is shown when the install fails.
        if ! output="$(cd "$repo" && "${pip[@]}" install --quiet -e '.[test]' 2>&1)"; then
            printf '%s\n' "$output" >&2
            log "pip install -e '.[test]' failed"
            exit 1
        fi
        echo "$want" >"$stamp"
    fi

    # ---- 3. llama-server
    # The build script runs `python3 -m pip download` and cmake: the venv's python3 always has pip, and a
    # machine without cmake gets it (and ninja) from PyPI into the venv.
    export PATH="$venv/bin:$PATH"
    if ! command -v cmake >/dev/null 2>&1; then
        log "no cmake on this machine: installing cmake and ninja from PyPI into .venv"
        "$venv/bin/python" -m pip --disable-pip-version-check install --quiet cmake ninja >&2
    fi
    if ! binary="$(bash "$repo/scripts/build-llama-server.sh")"; then
        log "building llama-server failed (a C/C++ compiler is needed: on Debian apt-get install build-essential)"
        exit 1
    fi
    binary="$(printf '%s\n' "$binary" | tail -n1)"
    if [ ! -x "$binary" ]; then
        log "scripts/build-llama-server.sh printed no usable binary path (got '$binary')"
        exit 1
    fi

    # ---- 4. Chromium, for tests/test_dashboard.py (headless; the test skips, saying why, when there is none)
    if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM:-}" ] && [ "${MODEL_SUPERVISOR_NO_CHROMIUM:-}" != 1 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            log "installing Debian's chromium for the dashboard test (apt-get, quiet; about 15 s and 410 MB)"
            if ! output="$({ apt-get update -qq &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } 2>&1)"; then
                printf '%s\n' "$output" | tail -n 20 >&2
                log "could not install chromium: the dashboard test will be skipped"
            fi
        else
            log "no /usr/bin/chromium (and not root with apt-get): the dashboard test will be skipped;" \
                "install Debian's chromium or set CHROMIUM=/path/to/chromium to run it"
        fi
    fi

    echo "$binary"
}

main "$@"

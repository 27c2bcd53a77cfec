#!/usr/bin/env bash
# Installs model-supervisor on this host as a systemd service, idempotently (run it again to upgrade):
#   1. the system user and group model-supervisor (home /var/lib/model-supervisor, no login shell), also in the
#      video and render groups that own the GPU device nodes (created when missing: the unit names them),
#   2. /opt/model-supervisor/src (a copy of this checkout) and /opt/model-supervisor/.venv with the package
#      installed from it, and /usr/local/bin/model-supervisor linked to the venv's command,
#   3. /etc/model-supervisor/models.toml (this repo's models.toml, only if absent: an edited config is never
#      overwritten) and /etc/model-supervisor/env for secrets (mode 0600, only if absent),
#   4. units/model-supervisor.service into /etc/systemd/system, then systemctl daemon-reload,
#   5. prints what to edit and how to start. It never starts or restarts the service itself.
#
#   sudo scripts/install.sh             # install or upgrade
#   scripts/install.sh --dry-run        # print what it would do and change nothing (no root needed)
#
# Needs Python >= 3.11 with venv (PYTHON=/path/to/python3 picks one) and access to PyPI for the dependencies
# (pip's own settings apply: PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX for an offline wheelhouse).
# It does not build llama-server: point [daemon] llama_server at a build for the GPU (docs/operations.md).
set -euo pipefail

NAME=model-supervisor
PREFIX=/opt/model-supervisor
ETC=/etc/model-supervisor
STATE=/var/lib/model-supervisor
UNIT_DIR=/etc/systemd/system
BIN_LINK=/usr/local/bin/model-supervisor
GPU_GROUPS=(video render)

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run=0

usage() { sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

for arg in "$@"; do
    case "$arg" in
        --dry-run | -n) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install: unknown argument '$arg' (try --help)" >&2; exit 64 ;;
    esac
done

say() { echo "install: $*" >&2; }
die() { say "$*"; exit 1; }
# Every change goes through run: printed always, carried out unless --dry-run.
run() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [ "$dry_run" -eq 0 ]; then "$@"; fi
}
# write MODE OWNER:GROUP PATH: stdin into PATH, created with that mode and owner (never world-readable in between).
write() {
    local mode="$1" owner="$2" path="$3" content
    content="$(cat)"
    printf '+ write %s (mode %s, %s)\n' "$path" "$mode" "$owner"
    if [ "$dry_run" -eq 0 ]; then
        install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" /dev/null "$path"
        printf '%s\n' "$content" >"$path"
    fi
}

if [ "$(id -u)" -ne 0 ] && [ "$dry_run" -eq 0 ]; then
    die "must run as root (it creates a system user and writes /opt, /etc and $UNIT_DIR): sudo $0  (or --dry-run)"
fi
if [ ! -f "$repo/pyproject.toml" ] || [ ! -f "$repo/units/$NAME.service" ]; then
    die "$repo is not a model-supervisor checkout"
fi
[ "$dry_run" -eq 1 ] && say "dry run: nothing is changed; these are the steps"

# ---- Python
# The system interpreter first: the venv links to its interpreter, and ProtectHome=yes hides one under /home or
# /root (pyenv, a user's conda) from the service.
python="${PYTHON:-}"
if [ -z "$python" ]; then
    for candidate in /usr/bin/python3 /usr/local/bin/python3 python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            python="$candidate"
            break
        fi
    done
fi
# ensurepip too: Debian's python3 without python3-venv has the venv module but cannot make a venv with pip.
if [ -z "$python" ] ||
    ! "$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    die "no Python >= 3.11 with venv found${python:+ (PYTHON=$python)}; on Debian: apt-get install python3 python3-venv"
fi
python="$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')"  # past pyenv shims
case "$python" in
    /home/* | /root/*)
        die "$python is under /home or /root, which the service cannot see (ProtectHome=yes);" \
            "set PYTHON to a system Python >= 3.11" ;;
esac

# ---- 1. user and groups
for group in "${GPU_GROUPS[@]}"; do
    # The unit's SupplementaryGroups= fails the start when a group does not exist; udev uses these names.
    getent group "$group" >/dev/null || run groupadd --system "$group"
done
if ! getent passwd "$NAME" >/dev/null; then
    nologin="$(command -v nologin || echo /usr/sbin/nologin)"
    # No home is created here: StateDirectory= makes it, owned by the user, when the service starts.
    run useradd --system --user-group --home-dir "$STATE" --no-create-home --shell "$nologin" \
        --comment "model-supervisor daemon" "$NAME"
fi
for group in "${GPU_GROUPS[@]}"; do
    id -nG "$NAME" 2>/dev/null | tr ' ' '\n' | grep -qx "$group" || run usermod --append --groups "$group" "$NAME"
done

# ---- 2. code and venv
run install -d -m 0755 "$PREFIX"
# A fresh copy each time (no stale modules from an older version); the working state (.venv, caches) stays out.
run rm -rf "$PREFIX/src.new"
run install -d -m 0755 "$PREFIX/src.new"
printf '+ copy %s -> %s\n' "$repo" "$PREFIX/src.new"
if [ "$dry_run" -eq 0 ]; then
    tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=./.pytest_cache --exclude=./.hypothesis --exclude=./.state \
        --exclude='*.gguf' --no-same-owner -cf - . | tar -C "$PREFIX/src.new" --no-same-owner -xf -
fi
run rm -rf "$PREFIX/src"
run mv "$PREFIX/src.new" "$PREFIX/src"
if [ ! -x "$PREFIX/.venv/bin/python" ] || ! "$PREFIX/.venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    run rm -rf "$PREFIX/.venv"
    run "$python" -m venv "$PREFIX/.venv"
fi
# A local directory is always rebuilt and reinstalled, so a rerun installs the checkout's current code.
run "$PREFIX/.venv/bin/python" -m pip install --disable-pip-version-check --quiet --upgrade "$PREFIX/src"
run ln -sfn "$PREFIX/.venv/bin/model-supervisor" "$BIN_LINK"

# ---- 3. configuration (never overwritten)
# root owns it, the service reads it: a compromised daemon cannot rewrite its own config.
run install -d -m 0750 -o root -g "$NAME" "$ETC"
if [ -e "$ETC/models.toml" ]; then
    say "$ETC/models.toml exists: left as it is (the reference config is $PREFIX/src/models.toml)"
else
    run install -m 0640 -o root -g "$NAME" "$repo/models.toml" "$ETC/models.toml"
fi
if [ ! -e "$ETC/env" ]; then
    # Read by systemd (as root) through EnvironmentFile=, so it can stay root-only.
    write 0600 root:root "$ETC/env" <<'EOF'
# Environment of model-supervisor.service (EnvironmentFile=): secrets and overrides, one NAME=value a line.
# MODEL_SUPERVISOR_ADMIN_TOKEN=...
# LLAMA_SERVER=/opt/llama.cpp/bin/llama-server
# MODEL_SUPERVISOR_DAEMON__LISTEN=127.0.0.1:8080
EOF
fi

# ---- 4. the unit
run install -m 0644 "$repo/units/$NAME.service" "$UNIT_DIR/$NAME.service"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    run systemctl daemon-reload
    systemd_up=1
else
    say "systemd is not running here: skipped systemctl daemon-reload"
    systemd_up=0
fi

# ---- 5. what next
active=0
if [ "$systemd_up" -eq 1 ] && systemctl is-active --quiet "$NAME"; then active=1; fi
cat <<EOF

model-supervisor is installed$([ "$dry_run" -eq 1 ] && echo " (dry run: it is not)").
Next:
  1. Edit $ETC/models.toml: [daemon] llama_server (a llama-server built for this GPU, readable by the
     $NAME user and not under /home), the models (GGUF files under /models or /srv, not /home).
  2. Secrets (MODEL_SUPERVISOR_ADMIN_TOKEN, cloud API keys) go in $ETC/env (mode 0600).
  3. Check it as the service user:
       sudo -u $NAME $BIN_LINK check-config $ETC/models.toml
  4. Start it and follow its log:
       systemctl enable --now $NAME
       systemctl status $NAME         # Status: says which models are loaded
       journalctl -u $NAME -f
EOF
if [ "$active" -eq 1 ]; then
    echo "  It is running an older version now: systemctl restart $NAME"
fi
echo "See $PREFIX/src/docs/operations.md."

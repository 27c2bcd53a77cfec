#!/usr/bin/env bash
# The demo: two tiny generated models behind model-supervisor, on 127.0.0.1:8080 (env DEMO_PORT changes it).
#
#   scripts/demo.sh              # first run builds llama-server (~6 min on 2 cores); later runs start in seconds
#   DEMO_PORT=18480 scripts/demo.sh
#
# Everything lives in ~/.cache/model-supervisor/demo/ (models, config, state). The models are generated once
# (random weights: they answer gibberish, quickly). The daemon runs in the foreground; Ctrl-C or SIGTERM stops it
# and every llama-server it started.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/bootstrap.sh
source "$repo/scripts/bootstrap.sh"   # exports LLAMA_SERVER (the built binary)

port="${DEMO_PORT:-8080}"
case "$port" in
    '' | *[!0-9]*) echo "demo: DEMO_PORT must be a port number (got '$port')" >&2; exit 2 ;;
esac
cache_root="${MODEL_SUPERVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/model-supervisor}"
demo="$cache_root/demo"
mkdir -p "$demo/state"

python="$repo/.venv/bin/python"
for spec in demo-a:1 demo-b:2; do
    name="${spec%%:*}" seed="${spec##*:}"
    if [ ! -s "$demo/$name.gguf" ]; then
        echo "demo: generating $demo/$name.gguf (seed $seed)" >&2
        "$python" -m model_supervisor.testmodels "$demo/$name.gguf" --seed "$seed" --name "$name" >/dev/null  # atomic
    fi
done

# Rewritten on every start, so DEMO_PORT and a rebuilt llama-server always apply.
config="$demo/models.toml"
cat >"$config" <<EOF
# Written by scripts/demo.sh; edits are overwritten on its next start. Paths are relative to this file.
[daemon]
listen = "127.0.0.1:$port"
llama_server = "$LLAMA_SERVER"
state_dir = "state"

[groups.main]
swap = true         # one member loaded at a time: asking for the other one swaps
exclusive = true

[models.demo-a]
model = "demo-a.gguf"
aliases = ["fast"]
ttl_s = 300         # unloaded after 5 idle minutes
args = ["-c", "2048"]
group = "main"

[models.demo-b]
model = "demo-b.gguf"
args = ["-c", "2048"]
group = "main"
EOF

url="http://127.0.0.1:$port"
cat <<EOF

model-supervisor demo: $url   (config: $config)
Try, from another terminal:

  curl -s $url/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "demo-a", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'
  curl -s $url/status
  open $url/ in a browser for the dashboard

  $repo/.venv/bin/model-supervisor status --url $url
  (model "demo-b" swaps demo-a out; "fast" is demo-a's alias)

Stop with Ctrl-C.

EOF
exec "$repo/.venv/bin/model-supervisor" run --config "$config"

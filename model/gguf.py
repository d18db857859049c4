"""GGUF checkpoints: llama.cpp's single-file format -> ModelConfig, HF-named tensors, Tokenizer.

`load_gguf(path)` reads the metadata into a `ModelConfig`, dequantizes every tensor to float32
under its Hugging Face name and shape (undoing what llama.cpp's `convert_hf_to_gguf.py` did:
GGUF's reversed dimension order, the q/k row permutation of Llama, GPT-2's Conv1D transpose),
and rebuilds a `tokenizers` backend from the `tokenizer.ggml.*` metadata.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from model.config import ModelConfig, RopeScaling

if TYPE_CHECKING:
    import tokenizers

    from model.tokenizer import Tokenizer

# Tensor types dequantized at load (everything else is refused by name).
SUPPORTED_TYPES = frozenset(
    {
        QType.F32, QType.F16, QType.BF16,
        QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
        QType.Q4_K, QType.Q5_K, QType.Q6_K,
    }
)

# general.architecture -> ModelConfig.model_type
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}

# general.file_type (llama_ftype) -> the dtype the tensors were stored in, when unquantized
_FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}

_TOP_NAMES = {
    "llama": {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
    },
    "gpt2": {
        "token_embd": "transformer.wte",
        "position_embd": "transformer.wpe",
        "output_norm": "transformer.ln_f",
        "output": "lm_head",
    },
}
_BLOCK_NAMES = {
    "llama": {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    "gpt2": {
        "attn_norm": "ln_1",
        "attn_qkv": "attn.c_attn",
        "attn_output": "attn.c_proj",
        "ffn_norm": "ln_2",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
    },
}
_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")
_SKIPPED_TENSORS = frozenset({"rope_freqs.weight"})  # folded into ModelConfig.rope_scaling

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4


class GGUFCheckpoint(NamedTuple):
    """What a GGUF file holds, in the shapes the rest of workmem expects."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # HF names, float32, HF shapes
    tokenizer: "Tokenizer"


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    from model.tokenizer import Tokenizer  # imported here: model/tokenizer.py needs no gguf

    reader = _FastReader(str(path))
    config = read_gguf_config(reader)
    tensors = read_gguf_tensors(reader, config)
    meta = _Meta(reader)
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
    ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos")}
    tokenizer = Tokenizer(
        build_tokenizer_backend(reader),
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=tokens[ids["bos"]] if ids["bos"] is not None else None,
        eos_token=tokens[ids["eos"]] if ids["eos"] is not None else None,
        add_bos_token=_add_bos_token(meta),
        eos_token_ids=config.eos_token_ids,
    )
    return GGUFCheckpoint(config, tensors, tokenizer)


class _FastReader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map: the reader slices the file once
    per metadata value (~250k slices for a 49k-token vocabulary), and each memmap slice pays
    numpy's memmap bookkeeping; a plain view of the same memory parses ~3.5x faster."""

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)  # keeps the memmap alive through .base


class _Meta:
    """Read-only view of a GGUFReader's key/value metadata."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self.reader = reader

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return value

    def real(self, key: str, default: float) -> float:
        # float32 in the file; shortest round-trip decimal (1e-05, not 9.99999974e-06)
        value = self.get(key)
        return default if value is None else float(str(np.float32(value)))


# ---------------------------------------------------------------------------------- config


def read_gguf_config(reader: gguf.GGUFReader) -> ModelConfig:
    """ModelConfig from `general.architecture` and the `{arch}.*` / `tokenizer.ggml.*` keys."""
    meta = _Meta(reader)
    arch = meta.require("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {sorted(GGUF_ARCHITECTURES)}"
        )
    model_type = GGUF_ARCHITECTURES[arch]
    hidden = int(meta.require(f"{arch}.embedding_length"))
    heads = _scalar(meta.require(f"{arch}.attention.head_count"), f"{arch}.attention.head_count")
    kv_heads = _scalar(meta.get(f"{arch}.attention.head_count_kv", heads), "head_count_kv")
    gpt2 = model_type == "gpt2"
    eps_key = "layer_norm_epsilon" if gpt2 else "layer_norm_rms_epsilon"
    theta = meta.real(f"{arch}.rope.freq_base", 10000.0)
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    return ModelConfig(
        model_type=model_type,
        vocab_size=_vocab_size(reader, meta, arch),
        hidden_size=hidden,
        intermediate_size=int(meta.get(f"{arch}.feed_forward_length", 4 * hidden)),
        num_layers=int(meta.require(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        norm_eps=meta.real(f"{arch}.attention.{eps_key}", 1e-5),
        rope_theta=theta,
        rope_scaling=RopeScaling() if gpt2 else _rope_scaling(reader, meta, arch, theta, head_dim),
        tie_word_embeddings=_tied(reader),
        attention_bias=gpt2 or _tensor(reader, "blk.0.attn_q.bias") is not None,
        qk_norm=_tensor(reader, "blk.0.attn_q_norm.weight") is not None,
        hidden_act="gelu_new" if gpt2 else "silu",
        torch_dtype=_FILE_TYPES.get(meta.get("general.file_type")),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_token_ids(meta),
    )


def _scalar(value: Any, key: str) -> int:
    if isinstance(value, list):  # per-layer counts (OpenELM-style)
        raise ValueError(f"GGUF metadata {key} varies per layer; not supported")
    return int(value)


def _vocab_size(reader: gguf.GGUFReader, meta: _Meta, arch: str) -> int:
    size = meta.get(f"{arch}.vocab_size")
    if size is not None:
        return int(size)
    embed = _tensor(reader, "token_embd.weight")
    if embed is None:
        raise ValueError("GGUF file has no token_embd.weight")
    return int(embed.shape[-1])  # GGML order: [hidden, vocab]


def _eos_token_ids(meta: _Meta) -> tuple[int, ...]:
    """eos first, then end-of-turn / end-of-message ids llama.cpp also stops on."""
    ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return tuple(ids)


def _tensor(reader: gguf.GGUFReader, name: str) -> Any:
    return next((t for t in reader.tensors if t.name == name), None)


def _tied(reader: gguf.GGUFReader) -> bool:
    """No `output.weight`, or one that is a byte-identical copy of the embeddings."""
    output = _tensor(reader, "output.weight")
    if output is None:
        return True
    embed = _tensor(reader, "token_embd.weight")
    return (
        embed is not None
        and output.tensor_type == embed.tensor_type
        and output.data.shape == embed.data.shape
        and np.array_equal(output.data, embed.data)
    )


def _rope_scaling(
    reader: gguf.GGUFReader, meta: _Meta, arch: str, theta: float, head_dim: int
) -> RopeScaling:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.real(f"{arch}.rope.scaling.factor", 1.0)
    if kind == "none" and meta.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", meta.real(f"{arch}.rope.scale_linear", 1.0)  # older files
    freqs = _tensor(reader, "rope_freqs.weight")
    if freqs is not None:
        if kind not in ("none", "linear") or factor != 1.0:
            raise ValueError(f"rope_freqs.weight together with rope scaling {kind!r} is not supported")
        original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
        factors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        return _llama3_scaling(np.asarray(factors, dtype=np.float64), theta, head_dim, original)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=factor)
    raise ValueError(f"unsupported GGUF rope scaling type {kind!r} (supported: none, linear)")


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, original: int) -> RopeScaling:
    """Llama 3.x writes its rope scaling as per-frequency factors (`rope_freqs.weight`).

    Recover the parameters by recomputing the factors the converter would have written with
    Llama 3's low/high frequency factors (1, 4); refuse anything else.
    """
    scaling = RopeScaling(
        kind="llama3", factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=original,
    )
    low_wavelen = original / scaling.low_freq_factor
    high_wavelen = original / scaling.high_freq_factor
    wavelens = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (original / wavelens - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    expected = np.where(
        wavelens < high_wavelen,
        1.0,
        np.where(wavelens > low_wavelen, scaling.factor, 1 / ((1 - smooth) / scaling.factor + smooth)),
    )
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise ValueError("rope_freqs.weight does not match Llama 3 rope scaling; not supported")
    return scaling


# --------------------------------------------------------------------------------- tensors


def read_gguf_tensors(reader: gguf.GGUFReader, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32, under its HF name and in HF layout."""
    family = config.family
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name in _SKIPPED_TENSORS:
            continue
        hf_name, block_key = _hf_name(tensor.name, family)
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = _dequantize(tensor)  # [*reversed(ggml shape)]
        if config.model_type == "llama" and block_key in ("attn_q", "attn_k"):  # qwen: not permuted
            heads = config.num_heads if block_key == "attn_q" else config.num_kv_heads
            weight = unpermute_qk(weight, heads)
        if family == "gpt2" and block_key in _GPT2_CONV1D and hf_name.endswith(".weight"):
            weight = weight.t().contiguous()  # nn.Linear [out, in] -> Conv1D [in, out]
        tensors[hf_name] = weight
    return tensors


def _hf_name(name: str, family: str) -> tuple[str, str | None]:
    """(HF name, GGUF block tensor key or None) for a GGUF tensor name."""
    block = _BLOCK_RE.fullmatch(name)
    if block:
        layer, key, kind = block.groups()
        hf = _BLOCK_NAMES[family].get(key)
        prefix = "transformer.h" if family == "gpt2" else "model.layers"
        if hf is not None:
            return f"{prefix}.{layer}.{hf}.{kind}", key
    top = _TOP_RE.fullmatch(name)
    if top and top.group(1) in _TOP_NAMES[family]:
        return f"{_TOP_NAMES[family][top.group(1)]}.{top.group(2)}", None
    raise ValueError(f"GGUF tensor {name!r} has no {family} counterpart; not supported")


def _dequantize(tensor: Any) -> torch.Tensor:
    qtype = tensor.tensor_type
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has type {qtype.name}, which is not supported "
            f"(supported: {supported})"
        )
    values = gguf.quants.dequantize(tensor.data, qtype)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGML lists the fastest dim first
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    if not values.flags.writeable:  # a view of the read-only memory map
        values = values.copy()
    return torch.from_numpy(values)


def unpermute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's rotary permutation of Llama q/k rows (weight or bias).

    The converter turns HF's half-split rotary layout into interleaved pairs:
    `w.reshape(h, 2, d // h // 2, ...).swapaxes(1, 2)`; this is its inverse.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
        .contiguous()
    )


# ------------------------------------------------------------------------------- tokenizer

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (llama-vocab.cpp)
_PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), "gpt2"),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), "llama3"
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), "qwen2"),
}


def build_tokenizer_backend(reader: gguf.GGUFReader) -> "tokenizers.Tokenizer":
    """A `tokenizers.Tokenizer` equivalent to the one the file's `tokenizer.ggml.*` describes."""
    meta = _Meta(reader)
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if model == "gpt2":
        backend = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], meta)
    elif model == "llama":
        backend = _sentencepiece_bpe(tokens, types, meta)
    else:
        raise ValueError(
            f"unsupported GGUF tokenizer model {model!r} (supported: gpt2 byte-level BPE, llama)"
        )
    _add_special_tokens(backend, tokens, types, meta, byte_level=model == "gpt2")
    if _add_bos_token(meta) and meta.get("tokenizer.ggml.bos_token_id") is not None:
        _prepend_bos(backend, tokens[meta.get("tokenizer.ggml.bos_token_id")], meta)
    return backend


def _byte_level_bpe(tokens: list[str], merges: list[str], meta: _Meta) -> "tokenizers.Tokenizer":
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:  # stored as raw text, not in the byte alphabet
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, continuing_subword_prefix="",
                   end_of_word_suffix="", dropout=None)
    )
    pre = meta.get("tokenizer.ggml.pre", "default")
    style = _PRE_TOKENIZERS.get(pre, "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style in ("gpt2", "digits"))
    if style == "gpt2":
        backend.pre_tokenizer = byte_level
    elif style == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        split = _LLAMA3_SPLIT if style == "llama3" else _QWEN2_SPLIT
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
        if style == "qwen2":
            backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta: _Meta) -> "tokenizers.Tokenizer":
    """SentencePiece BPE (`tokenizer.ggml.model == "llama"`) as HF's LlamaTokenizer builds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in reversed(list(enumerate(tokens)))}
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
        pairs = _merges_from_scores(tokens, scores, vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None,
                   unk_token=tokens[unk_id] if unk_id is not None else None)
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    tokens: list[str], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: a token is made by merging two vocab pieces,
    higher-scored tokens first (what sentencepiece's BPE does)."""
    found: list[tuple[float, str, str]] = []
    for token, score in zip(tokens, scores):
        cuts = [(token[:i], token[i:]) for i in range(1, len(token))]
        cuts = [(a, b) for a, b in cuts if a in vocab and b in vocab]
        found.extend((score, a, b) for a, b in sorted(cuts, key=lambda c: (vocab[c[0]], vocab[c[1]])))
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable, as HF's
    return [(left, right) for _, left, right in found]


def _add_special_tokens(
    backend: "tokenizers.Tokenizer", tokens: list[str], types: list[int], meta: _Meta,
    *, byte_level: bool,
) -> None:
    """CONTROL tokens and bos/eos/unk/pad become special added tokens (matched whole, skipped
    by decode(skip_special_tokens=True)); USER_DEFINED ones become plain added tokens."""
    from tokenizers import AddedToken

    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    special_ids = {
        int(v) for key in ("bos", "eos", "unknown", "padding", "eot", "eom")
        if (v := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None and int(v) < len(tokens)
    }
    special, plain = [], []
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind == _CONTROL or index in special_ids:
            if alphabet is None or set(token) <= alphabet:  # else a mislabelled raw-text token
                special.append(AddedToken(token, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(special)
    backend.add_tokens(plain)


def _add_bos_token(meta: _Meta) -> bool:
    default = meta.get("tokenizer.ggml.model") == "llama"  # llama.cpp's default for SPM vocabs
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))


def _prepend_bos(backend: "tokenizers.Tokenizer", bos: str, meta: _Meta) -> None:
    """encode(add_special_tokens=True) prepends BOS, as HF tokenizer.json files for such models do."""
    from tokenizers import processors

    bos_id = int(meta.require("tokenizer.ggml.bos_token_id"))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}

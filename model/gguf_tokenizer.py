"""GGUF tokenizers: `tokenizer.ggml.*` metadata -> an equivalent `tokenizers.Tokenizer`.

Byte-level BPE ("gpt2", with the pre-tokenizer split llama.cpp uses for the file's
`tokenizer.ggml.pre`) and SentencePiece-style BPE ("llama"); control tokens become special
added tokens; BOS is prepended when the file says `add_bos_token`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

if TYPE_CHECKING:
    import tokenizers

_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of control / user-defined tokens


class GGUFMeta:
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
    meta = GGUFMeta(reader)
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
    if add_bos_token(meta) and meta.get("tokenizer.ggml.bos_token_id") is not None:
        _prepend_bos(backend, tokens[meta.get("tokenizer.ggml.bos_token_id")], meta)
    return backend


def _byte_level_bpe(tokens: list[str], merges: list[str], meta: GGUFMeta) -> "tokenizers.Tokenizer":
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


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta: GGUFMeta) -> "tokenizers.Tokenizer":
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
    backend: "tokenizers.Tokenizer", tokens: list[str], types: list[int], meta: GGUFMeta,
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


def add_bos_token(meta: GGUFMeta) -> bool:
    default = meta.get("tokenizer.ggml.model") == "llama"  # llama.cpp's default for SPM vocabs
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))


def _prepend_bos(backend: "tokenizers.Tokenizer", bos: str, meta: GGUFMeta) -> None:
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

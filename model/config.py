"""ModelConfig: the architecture facts the model code needs, built once from a checkpoint.

`ModelConfig.from_hf(dir)` reads a Hugging Face `config.json` (transformers 4 layout with
`rope_theta`/`rope_scaling`, or transformers 5 with `rope_parameters`). GGUF files build the
same object in `model/gguf.py`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# model_type -> family implemented in model/<family>.py
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
    "bart": "bart",
    "t5": "t5",
}
ENCODER_DECODER_TYPES = ("bart", "t5")
T5_DEFAULT_MAX_LEN = 512  # T5's relative positions have no table size: the served length unless n_positions says


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling: `kind` is "default", "linear" or "llama3"."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class EncoderSpec:
    """The encoder half of an encoder-decoder checkpoint (BART, T5) and what joins the halves;
    the decoder half is the rest of ModelConfig (its layers, heads and positions size the KV pool)."""

    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int  # longest encoder input
    decoder_start_token_id: int  # the decoder's first token: every output starts after it
    pad_token_id: int
    scale_embedding: bool  # token embeddings times sqrt(hidden)
    relative_attention_buckets: int = 0  # T5: relative-position buckets (0: learned absolute positions)
    relative_attention_max_distance: int = 0  # T5: distances beyond share the last bucket
    gated_ffn: bool = False  # T5 v1.1: wo(act(wi_0 x) * wi_1 x); else wo(act(wi x))
    scale_decoder_outputs: bool = False  # T5 v1.0: hidden * hidden_size**-0.5 before the head


@dataclass(frozen=True)
class ModelConfig:
    """Frozen description of a decoder Transformer checkpoint (`encoder` set: an
    encoder-decoder one, whose other fields describe the decoder)."""

    model_type: str  # llama | mistral | qwen2 | qwen3 | gpt2 | bart
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    hidden_act: str = "silu"
    torch_dtype: str | None = None  # dtype the checkpoint was saved in
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    encoder: EncoderSpec | None = None  # encoder-decoder checkpoints only

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder is not None

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        with open(path / "config.json") as f:
            raw = json.load(f)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type", "")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}"
            )
        if model_type == "gpt2":
            return _gpt2_from_dict(raw)
        if model_type == "bart":
            return _bart_from_dict(raw)
        if model_type == "t5":
            return _t5_from_dict(raw)
        if model_type == "mistral" and raw.get("sliding_window") not in (None, 0) and raw.get(
            "use_sliding_window", True
        ) and raw["sliding_window"] < raw.get("max_position_embeddings", 0):
            # Attending to the full context differs from the checkpoint beyond the window;
            # cap the served length so the two agree.
            raw = {**raw, "max_position_embeddings": raw["sliding_window"]}
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        rope_theta, scaling = _rope(raw)
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", model_type == "qwen2"),
            qk_norm=model_type == "qwen3",
            hidden_act=raw.get("hidden_act", "silu"),
            torch_dtype=_dtype_name(raw),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_int_tuple(raw.get("eos_token_id")),
        )


def _gpt2_from_dict(raw: dict[str, Any]) -> ModelConfig:
    hidden = raw["n_embd"]
    heads = raw["n_head"]
    return ModelConfig(
        model_type="gpt2",
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw.get("n_inner") or 4 * hidden,
        num_layers=raw["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=raw.get("n_positions", 1024),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        attention_bias=True,
        hidden_act=raw.get("activation_function", "gelu_new"),
        torch_dtype=_dtype_name(raw),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_int_tuple(raw.get("eos_token_id")),
    )


def _bart_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """BART (post-LayerNorm, learned positions offset by 2); mBART-style pre-LN variants differ."""
    if raw.get("normalize_before") or raw.get("add_final_layer_norm"):
        raise ValueError("pre-LayerNorm BART variants (mBART) are not supported; supported: bart")
    hidden, heads = raw["d_model"], raw["decoder_attention_heads"]
    eos = raw.get("eos_token_id", 2)
    start = raw.get("decoder_start_token_id")
    return ModelConfig(
        model_type="bart",
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["decoder_ffn_dim"],
        num_layers=raw["decoder_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 1024),
        norm_eps=1e-5,  # nn.LayerNorm's default, which BART uses throughout
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        attention_bias=True,
        hidden_act=raw.get("activation_function", "gelu"),
        torch_dtype=_dtype_name(raw),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_int_tuple(eos),
        encoder=EncoderSpec(
            num_layers=raw["encoder_layers"],
            num_heads=raw["encoder_attention_heads"],
            intermediate_size=raw["encoder_ffn_dim"],
            max_position_embeddings=raw.get("max_position_embeddings", 1024),
            decoder_start_token_id=int(start if start is not None else _int_tuple(eos)[0]),
            pad_token_id=raw.get("pad_token_id") if raw.get("pad_token_id") is not None else 1,
            scale_embedding=bool(raw.get("scale_embedding", False)),
        ),
    )


def _t5_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """T5 v1.0 (ReLU, head tied and scaled) and v1.1 / Flan-T5 (gated GELU): pre-RMSNorm blocks,
    relative-position buckets, unscaled attention. transformers 4 saves v1.1 untied (with
    `lm_head.weight`); transformers 5 ties it and writes `scale_decoder_outputs`."""
    proj = raw.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.removeprefix("gated-")
    act = "gelu_new" if proj == "gated-gelu" else act  # transformers' historical alias
    tied = raw.get("tie_word_embeddings", True)
    heads, hidden = raw["num_heads"], raw["d_model"]
    max_len = raw.get("n_positions") or T5_DEFAULT_MAX_LEN
    pad = raw.get("pad_token_id") if raw.get("pad_token_id") is not None else 0
    start = raw.get("decoder_start_token_id")
    return ModelConfig(
        model_type="t5",
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["d_ff"],
        num_layers=raw.get("num_decoder_layers") or raw["num_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=raw["d_kv"],
        max_position_embeddings=max_len,
        norm_eps=raw.get("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=tied,
        hidden_act=act,
        torch_dtype=_dtype_name(raw),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_int_tuple(raw.get("eos_token_id", 1)),
        encoder=EncoderSpec(
            num_layers=raw["num_layers"], num_heads=heads, intermediate_size=raw["d_ff"],
            max_position_embeddings=max_len, decoder_start_token_id=int(start if start is not None else pad),
            pad_token_id=pad, scale_embedding=False,
            relative_attention_buckets=raw.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=raw.get("relative_attention_max_distance", 128),
            gated_ffn=gated, scale_decoder_outputs=bool(raw.get("scale_decoder_outputs", tied is not False)),
        ),
    )


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = raw.get("rope_parameters") or {}
    legacy = raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    spec = {**legacy, **params}
    kind = spec.get("rope_type", spec.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")
    if kind == "default":
        return float(theta), RopeScaling()
    return float(theta), RopeScaling(
        kind=kind,
        factor=float(spec.get("factor", 1.0)),
        low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
        high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(spec.get("original_max_position_embeddings", 8192)),
    )


def _dtype_name(raw: dict[str, Any]) -> str | None:
    value = raw.get("dtype", raw.get("torch_dtype"))
    return str(value) if value else None


def _int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)

"""Hidden states -> one embedding per input: the sentence-transformers pooling a checkpoint asks for.

A sentence-transformers directory lists its modules in `modules.json`: the Transformer, then
`Pooling` (its `1_Pooling/config.json` picks cls, mean, max, mean_sqrt_len or lasttoken) and
optionally `Normalize` (unit L2 length). `sentence_bert_config.json`'s `max_seq_length` caps
the input length. A checkpoint without `modules.json` (a plain transformers BertModel) gets
mean pooling and normalization — what sentence-transformers itself builds for such a model,
plus the unit length OpenAI's embeddings have. `--pooling` and `--normalize` override both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "last")
# 1_Pooling/config.json key -> mode
ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "last",
}
ST_MODULES = {  # modules.json types this server runs; any other (Dense, ...) is refused
    "sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}
DEFAULT_MODE = "mean"


@dataclass(frozen=True)
class PoolingConfig:
    """How hidden states become an embedding: `mode` in POOLING_MODES, unit length if `normalize`;
    `max_seq_length` (sentence_bert_config.json) caps input tokens, None: the model's own limit."""

    mode: str = DEFAULT_MODE
    normalize: bool = True
    max_seq_length: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling {self.mode!r} is not one of {list(POOLING_MODES)}")

    @classmethod
    def from_dir(cls, path: str | Path, mode: str = "auto", normalize: bool | None = None) -> "PoolingConfig":
        """The directory's sentence-transformers pooling; `mode` ("auto": the checkpoint's) and
        `normalize` (None: the checkpoint's) override it."""
        path = Path(path)
        found_mode, found_norm = DEFAULT_MODE, True
        modules_file = path / "modules.json"
        if modules_file.is_file():
            modules = json.loads(modules_file.read_text())
            unknown = [m.get("type") for m in modules if m.get("type") not in ST_MODULES]
            if unknown:
                raise ValueError(f"sentence-transformers module(s) {unknown} are not supported "
                                 f"(only {sorted(ST_MODULES)})")
            found_norm = any(m["type"].endswith(".Normalize") for m in modules)
            pooling = [m for m in modules if m["type"].endswith(".Pooling")]
            if pooling:
                found_mode = _st_pooling_mode(path / pooling[0].get("path", "") / "config.json")
        st_config = path / "sentence_bert_config.json"
        max_len = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
        return cls(mode=found_mode if mode == "auto" else mode,
                   normalize=found_norm if normalize is None else normalize, max_seq_length=max_len)


def _st_pooling_mode(config_file: Path) -> str:
    raw = json.loads(config_file.read_text()) if config_file.is_file() else {}
    modes = [mode for key, mode in ST_POOLING_KEYS.items() if raw.get(key)]
    if len(modes) != 1:
        raise ValueError(f"{config_file}: exactly one pooling mode must be set, found {modes or 'none'} "
                         "(concatenated poolings are not supported)")
    return modes[0]


def pool(hidden: torch.Tensor, mask: torch.Tensor, config: PoolingConfig) -> torch.Tensor:
    """hidden [batch, seq, dim], mask [batch, seq] (1 = token; right padding) -> [batch, dim] float32."""
    hidden, m = hidden.float(), mask.to(torch.float32)[..., None]  # m: [batch, seq, 1]
    lengths = m.sum(1)  # [batch, 1]
    if config.mode == "cls":
        out = hidden[:, 0]
    elif config.mode == "last":
        out = hidden[torch.arange(hidden.shape[0]), mask.sum(1).long() - 1]
    elif config.mode == "max":
        out = hidden.masked_fill(m == 0, float("-inf")).amax(1)
    else:
        out = (hidden * m).sum(1) / lengths.clamp(min=1e-9)
        if config.mode == "mean_sqrt_len":
            out = out * lengths / lengths.sqrt()
    return F.normalize(out, p=2, dim=-1) if config.normalize else out


def truncate_dimensions(embeddings: torch.Tensor, dimensions: int, normalize: bool) -> torch.Tensor:
    """Matryoshka truncation: the first `dimensions` values, renormalized when the model normalizes."""
    out = embeddings[:, :dimensions]
    return F.normalize(out, p=2, dim=-1) if normalize else out

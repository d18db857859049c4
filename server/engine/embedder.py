"""Embedder: the engine of task "embed". Token ids in, pooled vectors out.

An encoder checkpoint (model/bert.py) always embeds; a decoder one does with `--task embed`
(server/engine/embed_decoder.py: its final hidden states; pooling "last" unless the
checkpoint or `--pooling` says otherwise).

There is no KV cache and nothing to schedule across steps: each step takes every waiting
input (of any number of requests), sorts them by length, and runs them through the encoder
in padded batches of at most `max_batch_tokens` (batch x longest input), then pools each row
(model/pooling.py). Synchronous and importable without fastapi, like LLMEngine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from model.bert import is_encoder_checkpoint, load_encoder, matryoshka_dimensions
from model.pooling import DEFAULT_MODE, PoolingConfig, pool
from model.tokenizer import Tokenizer
from server.engine.config import resolve_device, resolve_dtype
from server.engine.embed_decoder import DecoderHidden

DECODER_DEFAULT_MODE = "last"  # a causal model's last position is the only one that saw every token
DEFAULT_MAX_BATCH_TOKENS = 8192  # padded tokens (batch x longest input) in one encoder forward


@dataclass(frozen=True)
class EmbedderConfig:
    """What `Embedder` needs: the checkpoint, where it runs, its pooling overrides and batch size."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    pooling: str = "auto"  # model/pooling.py POOLING_MODES, or auto: the checkpoint's
    normalize: bool | None = None  # None: the checkpoint's
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_model_len: int | None = None  # None: the model's (and sentence_bert_config's) limit
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}")


class Embedder:
    """A checkpoint loaded for embeddings. `embed` is the only door; `max_model_len` is the
    longest input it takes, `dimensions` the embedding size, `matryoshka_dimensions` the
    smaller sizes it may be cut to (None: none)."""

    task = "embed"

    def __init__(self, config: EmbedderConfig) -> None:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        raw = json.loads((Path(config.model) / "config.json").read_text())
        if is_encoder_checkpoint(config.model):
            self.model, encoder = load_encoder(config.model, self.dtype, self.device)
            self.tokenizer = Tokenizer.from_dir(config.model)
            self.pad_id, self.vocab_size, self.dimensions = encoder.pad_token_id, encoder.vocab_size, encoder.hidden_size
            model_limit, default_mode = encoder.max_input_len, DEFAULT_MODE
            self.matryoshka_dimensions = encoder.matryoshka_dimensions
        else:
            self.model = DecoderHidden(config.model, self.dtype, self.device)
            decoder, self.tokenizer = self.model.config, self.model.tokenizer
            self.pad_id, self.vocab_size, self.dimensions = 0, decoder.vocab_size, decoder.hidden_size
            model_limit, default_mode = decoder.max_position_embeddings, DECODER_DEFAULT_MODE
            self.matryoshka_dimensions = matryoshka_dimensions(raw, decoder.hidden_size)
        mode = default_mode if config.pooling == "auto" and not (Path(config.model) / "modules.json").is_file() \
            else config.pooling
        self.pooling = PoolingConfig.from_dir(config.model, mode, config.normalize)
        limits = [model_limit, self.pooling.max_seq_length, config.max_model_len]
        self.max_model_len: int = min(x for x in limits if x is not None)

    @torch.inference_mode()
    def embed(self, inputs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token id lists (each 1..max_model_len ids, valid in the vocabulary) -> [len(inputs), dim] float32."""
        out = torch.empty(len(inputs), self.dimensions)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        for batch in self._batches(order, inputs):
            out[batch] = self._forward([inputs[i] for i in batch]).cpu()
        return out

    def _batches(self, order: list[int], inputs: Sequence[Sequence[int]]) -> list[list[int]]:
        """Length-sorted indices cut so that batch size x longest input <= max_batch_tokens."""
        batches: list[list[int]] = []
        for i in order:
            if batches and (len(batches[-1]) + 1) * len(inputs[i]) <= self.config.max_batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def _forward(self, batch: list[Sequence[int]]) -> torch.Tensor:
        longest = max(map(len, batch))
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, tokens in enumerate(batch):
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(ids, mask)  # [batch, longest, hidden]
        return pool(hidden, mask, self.pooling)

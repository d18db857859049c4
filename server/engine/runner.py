"""Runner: a scheduled step -> tensors -> model -> sampler -> token ids.

Owns the KV cache tensor `[num_layers, 2, num_blocks, block_size, num_kv_heads, row]` (row =
head_dim, or head_dim + 2 bytes for an int8 pool: model/kv_quant.py) and the sampler. The flat token batch concatenates each scheduled sequence's chunk
(`token_ids[num_computed : num_computed + n]`) in schedule order. Logits are computed for
the last row of each sampled sequence and, for sequences asking for prompt logprobs, for
the prompt rows they score (server/engine/prompt_logprobs.py), after those.
An encoder-decoder model first encodes the step's newly admitted prompts in one padded
batch (writing their cross blocks, model/encdec.py); every scheduled sequence's
cross-attention then reads its cross blocks through `AttentionMetadata.cross`.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence as Seq

import torch
from torch import nn

from model.attention import SeqAttention, build_attention_metadata
from model.config import ModelConfig
from model.encdec import EncoderBatch
from model.kv_quant import row_width
from model.sampling import Sampler, SamplerOutput, SamplingRow, TokenMask
from server.engine.grammar import BitmaskFiller
from server.engine.prompt_logprobs import PromptLogprob, ScoreSpan, score, score_spans, span_rows
from server.engine.scheduler import SchedulerOutput
from server.engine.sequence import Sequence


class TokenSlice(Seq[int]):
    """A read-only window of a token list, made in O(1) (the sampler reads it only when a
    request uses penalties)."""

    def __init__(self, tokens: list[int], start: int, stop: int) -> None:
        self.tokens, self.start, self.stop = tokens, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.tokens[self.start : self.stop][i]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.tokens[self.start + (i % len(self))]

    def __iter__(self) -> Iterator[int]:
        return (self.tokens[i] for i in range(self.start, self.stop))


class StepInputs(NamedTuple):
    """What the model needs for one step, on the CPU (tensor-parallel rank 0 broadcasts it)."""

    copies: list[tuple[int, int]]  # (src, dst) KV blocks to copy first
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    seq_attn: list[SeqAttention]
    rows: torch.Tensor  # [S + R] int64: flat-batch rows whose logits are sampled, then scored
    encoder: EncoderBatch | None = None  # encoder-decoder: prompts to encode before the decoder runs
    cross_attn: list[SeqAttention] | None = None  # encoder-decoder: each sequence's cross blocks


class StepResult(NamedTuple):
    """What one step computed: the sampler's output per sample (token ids, logprobs) and
    the prompt scores of the sequences that asked for them."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    prompt_logprobs: dict[Sequence, list[PromptLogprob]]


class Runner:
    """Runs the model on the scheduler's batches; see module doc."""

    def __init__(
        self, model: nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
        device: torch.device, dtype: torch.dtype, seed: int | None = None, kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.encoder = config.encoder  # EncoderSpec of an encoder-decoder model, else None
        self.block_size = block_size
        self.device = device
        kv_dtype = kv_dtype or dtype
        self.kv_cache = torch.zeros(
            config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, row_width(config.head_dim, kv_dtype),
            dtype=kv_dtype, device=device,
        )
        # per layer (k_cache, v_cache) views, made once: what the model indexes each step
        self.kv_layers = [(layer[0], layer[1]) for layer in self.kv_cache]
        self.sampler = Sampler(seed=seed)
        self.fill_bitmasks = BitmaskFiller()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        sources = list(dict.fromkeys(src for src, _ in out.samples))
        spans = score_spans(out.scheduled)
        logits = self.forward(self.prepare(out, sources, spans))  # [S + R, vocab] float32, or None
        scored = {}
        if spans:
            scored = score(logits[len(sources):], spans)
            logits = logits[: len(sources)]
        if not sources:
            return StepResult([], [], scored)
        sampled = self._sample(out, sources, logits)
        return StepResult(sampled.token_ids, sampled.logprobs, scored)

    def _sample(self, out: SchedulerOutput, sources: list[Sequence], logits: torch.Tensor) -> SamplerOutput:
        source_index = {s: i for i, s in enumerate(sources)}
        expand = [source_index[src] for src, _ in out.samples]
        if expand != list(range(len(sources))):
            logits = logits[torch.tensor(expand, device=self.device)]
        dsts = [dst for _, dst in out.samples]
        mask = self._token_mask(dsts, logits.shape[1])
        return self.sampler(logits, [_sampling_row(dst) for dst in dsts], mask)

    def prepare(self, out: SchedulerOutput, sources: list[Sequence], spans: Seq[ScoreSpan] = ()) -> StepInputs:
        """The step's model inputs (on the CPU); `sources` are the sequences sampled from,
        `spans` the prompt positions scored."""
        input_ids, positions, slot_mapping, seq_attn = self._prepare(out.scheduled)
        last_row, end = {}, 0  # row of each sampled sequence's last token in the flat batch
        for seq, num in out.scheduled.items():
            end += num
            last_row[seq] = end - 1
        rows = torch.tensor([last_row[s] for s in sources], dtype=torch.int64)
        if spans:
            rows = torch.cat([rows, span_rows(spans)])
        encoder, cross_attn = self._prepare_cross(out) if self.encoder is not None else (None, None)
        return StepInputs(list(out.copies), input_ids, positions, slot_mapping, seq_attn, rows, encoder, cross_attn)

    def _prepare_cross(self, out: SchedulerOutput) -> tuple[EncoderBatch | None, list[SeqAttention]]:
        """The prompts to encode this step, and every scheduled sequence's view of its cross blocks."""
        encoder = None
        if out.encode:
            encoder = EncoderBatch.build([s.encoder_prompt for s in out.encode], [s.cross_blocks for s in out.encode],
                                         self.block_size, self.encoder.pad_token_id)
        cross = [SeqAttention(num, len(seq.encoder_prompt), torch.tensor(seq.cross_blocks, dtype=torch.int64))
                 for seq, num in out.scheduled.items()]
        return encoder, cross

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor | None:
        """Block copies, the model, and logits [S, vocab] (float32) of `step.rows` (None if none)."""
        for src, dst in step.copies:
            self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])
        to = dict(device=self.device, dtype=torch.int64)
        slot_mapping = step.slot_mapping.to(**to)
        meta = build_attention_metadata(step.seq_attn, slot_mapping, self.block_size, self.device)
        if step.encoder is not None:
            self.model.encode(step.encoder.to(self.device), self.kv_layers)
        if step.cross_attn is not None:
            meta.cross = build_attention_metadata(step.cross_attn, slot_mapping[:0], self.block_size, self.device,
                                                  causal=False)
        hidden = self.model(step.input_ids.to(**to), step.positions.to(**to), self.kv_layers, meta)  # [T, hidden]
        if not len(step.rows):
            return None
        return self.model.compute_logits(hidden.index_select(0, step.rows.to(**to)))

    def _token_mask(self, dsts: list[Sequence], vocab_size: int) -> TokenMask | None:
        """The allowed next tokens of the rows whose output follows a grammar, computed together."""
        rows = [i for i, seq in enumerate(dsts) if seq.grammar is not None]
        if not rows:
            return None
        states = []
        for i in rows:
            dsts[i].grammar.sync(dsts[i].token_ids, dsts[i].prompt_len)
            states.append(dsts[i].grammar)
        return TokenMask(rows, self.fill_bitmasks(states, vocab_size))

    def _prepare(self, scheduled: dict[Sequence, int]):
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        seq_attn: list[SeqAttention] = []
        slots: list[torch.Tensor] = []
        for seq, num in scheduled.items():
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + num])
            pos = torch.arange(start, start + num)
            positions.append(pos)
            table = torch.tensor(seq.block_table, dtype=torch.int64)  # built once per step, shared
            slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            seq_attn.append(SeqAttention(num, start + num, table))
        return (
            torch.tensor(ids, dtype=torch.int64),
            torch.cat(positions),
            torch.cat(slots),
            seq_attn,
        )


def _sampling_row(seq: Sequence) -> SamplingRow:
    return SamplingRow(
        params=seq.params,
        prompt_token_ids=TokenSlice(seq.token_ids, 0, seq.prompt_len),
        output_token_ids=TokenSlice(seq.token_ids, seq.prompt_len, seq.num_tokens),
        generator=seq.generator,
        eos_token_ids=seq.eos_token_ids,
    )

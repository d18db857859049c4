"""Runner: a scheduled step -> tensors -> model -> sampler -> token ids.

Owns the KV cache tensor `[num_layers, 2, num_blocks, block_size, num_kv_heads, row]` (row =
head_dim, or head_dim + 2 bytes for an int8 pool: model/kv_quant.py) and the sampler. The flat token batch concatenates each scheduled sequence's chunk
(`token_ids[num_computed : num_computed + n]`) in schedule order. Logits are computed for
the last row of each sampled sequence and, for sequences asking for prompt logprobs, for
the prompt rows they score (server/engine/prompt_logprobs.py), after those.
An encoder-decoder model first encodes the step's newly admitted prompts in one padded
batch (writing their cross blocks, model/encdec.py); every scheduled sequence's
cross-attention then reads its cross blocks through `AttentionMetadata.cross`.
A decode verifying a draft (server/engine/speculate.py) appends its K draft tokens to its
chunk; each of its 1 + K positions attends as a decode of its own (same block table,
context lengths growing by one: the decode kernel, causal), and all 1 + K rows' logits go
to `verify` instead of the sampler.
A step of decodes only (drafts included), on the CPU, runs as one native call where the model
has a decode plan (model/decode_plan.py: the same kernels as its forward, bit for bit); every
other step runs the model's forward. An int8 pool's K centres are calibrated once at start-up
(`calibrate_int8_keys`, model/kv_quant.py).
"""
from __future__ import annotations

import itertools
import math
import mmap
import os
from typing import Iterator, NamedTuple, Sequence as Seq

import torch
from torch import nn

from model.attention import SeqAttention, TorchPagedAttention, build_attention_metadata
from model.config import ModelConfig
from model.decode_plan import DecodePlan
from model.encdec import EncoderBatch
from model.kv_quant import row_width
from model.sampling import Sampler, SamplerOutput, SamplingRow, TokenMask
from server.engine.grammar import BitmaskFiller
from server.engine.prompt_logprobs import PromptLogprob, ScoreSpan, score, score_spans, span_rows
from server.engine.scheduler import SchedulerOutput
from server.engine.sequence import Sequence
from server.engine.speculate import verify


DECODE_PLAN_ENV = "WORKMEM_DECODE_PLAN"  # "0": every step through the model's Python forward


def zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(shape), except that on the CPU its pages are committed as they are first
    written: an anonymous mapping, which the OS hands out zero-filled page by page (on huge
    pages where the kernel allows). The pool is sized for the whole KV budget; resident memory
    grows with the blocks actually used (the prefix cache keeps filling fresh blocks before it
    evicts, so a long-running server reaches the whole budget)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        pages.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor keeps `pages` alive


class TokenSlice(Seq[int]):
    """A read-only window of a token list, then `extra` tokens (a draft's prefix), made in
    O(len(extra)) (the sampler reads it only when a request uses penalties)."""

    def __init__(self, tokens: list[int], start: int, stop: int, extra: Seq[int] = ()) -> None:
        self.tokens, self.start, self.stop, self.extra = tokens, start, stop, list(extra)

    def __len__(self) -> int:
        return self.stop - self.start + len(self.extra)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return (self.tokens[self.start : self.stop] + self.extra)[i]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        base = self.stop - self.start
        return self.tokens[self.start + i] if i < base else self.extra[i - base]

    def __iter__(self) -> Iterator[int]:
        return itertools.chain((self.tokens[i] for i in range(self.start, self.stop)), self.extra)


class StepInputs(NamedTuple):
    """What the model needs for one step, on the CPU (tensor-parallel rank 0 broadcasts it)."""

    copies: list[tuple[int, int]]  # (src, dst) KV blocks to copy first
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    seq_attn: list[SeqAttention]
    rows: torch.Tensor  # [S + R] int64: flat-batch rows whose logits are sampled (1 + K per draft), then scored
    encoder: EncoderBatch | None = None  # encoder-decoder: prompts to encode before the decoder runs
    cross_attn: list[SeqAttention] | None = None  # encoder-decoder: each sequence's cross blocks


class StepResult(NamedTuple):
    """What one step computed: per sample its new tokens (one, or a verified draft's
    accepted tokens then one) and logprobs (of its one token), and the prompt scores of the
    sequences that asked for them."""

    token_ids: list[list[int]]
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
        self.dtype = dtype
        kv_dtype = kv_dtype or dtype
        self.kv_cache = zeroed_pool(
            (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, row_width(config.head_dim, kv_dtype)),
            kv_dtype, device,
        )
        # per layer (k_cache, v_cache) views, made once: what the model indexes each step
        self.kv_layers = [(layer[0], layer[1]) for layer in self.kv_cache]
        self.sampler = Sampler(seed=seed)
        self.fill_bitmasks = BitmaskFiller()
        # whole-batch decode steps in one native call (model/decode_plan.py): built at the
        # first such step (after calibrate_int8_keys), None where the model has no plan
        self.use_decode_plan = device.type == "cpu" and os.environ.get(DECODE_PLAN_ENV, "1") != "0"
        self._decode_plan: DecodePlan | None | bool = False  # False: not built yet

    @torch.inference_mode()
    def calibrate_int8_keys(self, token_ids: list[int]) -> None:
        """Centre each layer's int8 K rows (model/kv_quant.py, row format 2) on its mean K over
        `token_ids`: one prefill into a scratch pool of the model's dtype (the real pool is not
        touched), its K rows averaged per kv head. Run once, before the first request."""
        layers = [m.attn for m in self.model.modules() if isinstance(getattr(m, "attn", None), TorchPagedAttention)]
        num_layers, _, _, bs, kv_heads, _ = self.kv_cache.shape
        assert len(layers) == num_layers, (len(layers), num_layers)
        n = len(token_ids)
        blocks = -(-n // bs)
        scratch = torch.zeros(num_layers, 2, blocks, bs, kv_heads, layers[0].head_dim, dtype=self.dtype,
                              device=self.device)
        table = torch.arange(blocks, dtype=torch.int64)
        slots = torch.arange(n, dtype=torch.int64, device=self.device)  # scratch blocks 0.. in order: slot == position
        meta = build_attention_metadata([SeqAttention(n, n, table)], slots, bs, self.device)
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        self.model(ids, slots, [(layer[0], layer[1]) for layer in scratch], meta)
        keys = scratch[:, 0].reshape(num_layers, blocks * bs, kv_heads, -1)[:, :n].float()  # [L, n, kvH, d]
        for attn, center in zip(layers, keys.mean(1)):
            attn.k_center = center.contiguous()  # [kvH, d] float32
        self._decode_plan = False  # a plan holds the centres' addresses: rebuild it

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        sources = list(dict.fromkeys(src for src, _ in out.samples))
        spans = score_spans(out.scheduled)
        logits = self.forward(self.prepare(out, sources, spans))  # [S + R, vocab] float32, or None
        num_sampled = len(sources) + sum(len(out.drafts[s]) for s in sources if s in out.drafts)
        scored = {}
        if spans:
            scored = score(logits[num_sampled:], spans)
            logits = logits[:num_sampled]
        if not sources:
            return StepResult([], [], scored)
        if not out.drafts:
            sampled = self._sample(out, sources, logits)
            return StepResult([[t] for t in sampled.token_ids], sampled.logprobs, scored)
        return self._sample_and_verify(out, sources, logits, scored)

    def _sample(self, out: SchedulerOutput, sources: list[Sequence], logits: torch.Tensor,
                samples: list[tuple[Sequence, Sequence]] | None = None) -> SamplerOutput:
        """Sample `samples` (default: all of `out`'s) from `logits`, one row per source."""
        samples = out.samples if samples is None else samples
        source_index = {s: i for i, s in enumerate(sources)}
        expand = [source_index[src] for src, _ in samples]
        if expand != list(range(len(logits))):
            logits = logits[torch.tensor(expand, device=self.device)]
        dsts = [dst for _, dst in samples]
        mask = self._token_mask(dsts, logits.shape[1])
        return self.sampler(logits, [_sampling_row(dst) for dst in dsts], mask)

    def _sample_and_verify(self, out: SchedulerOutput, sources: list[Sequence], logits: torch.Tensor,
                           scored: dict) -> StepResult:
        """A step with drafts: the others are sampled as usual, the drafts verified."""
        first, row = {}, 0  # each source's first logits row
        for src in sources:
            first[src] = row
            row += 1 + len(out.drafts.get(src, ()))
        plain = [i for i, (src, _) in enumerate(out.samples) if src not in out.drafts]
        drafted = [src for src in sources if src in out.drafts]  # samples (src, src): decodes fork nothing
        tokens: list[list[int]] = [[] for _ in out.samples]
        logprobs: list[dict[int, float] | None] = [None] * len(out.samples)
        if plain:
            plain_sources = [s for s in sources if s not in out.drafts]
            index = torch.tensor([first[s] for s in plain_sources], device=self.device)
            sampled = self._sample(out, plain_sources, logits.index_select(0, index),
                                   [out.samples[i] for i in plain])
            for i, t, lp in zip(plain, sampled.token_ids, sampled.logprobs):
                tokens[i], logprobs[i] = [t], lp
        index = torch.tensor([first[s] + j for s in drafted for j in range(1 + len(out.drafts[s]))],
                             device=self.device)
        rows = [_sampling_row(s, out.drafts[s][:j]) for s in drafted for j in range(1 + len(out.drafts[s]))]
        verified = dict(zip(drafted, verify(self.sampler, logits.index_select(0, index), rows,
                                            [out.drafts[s] for s in drafted])))
        for i, (src, _) in enumerate(out.samples):
            if src in verified:
                tokens[i] = verified[src]
        return StepResult(tokens, logprobs, scored)

    def prepare(self, out: SchedulerOutput, sources: list[Sequence], spans: Seq[ScoreSpan] = ()) -> StepInputs:
        """The step's model inputs (on the CPU); `sources` are the sequences sampled from,
        `spans` the prompt positions scored."""
        input_ids, positions, slot_mapping, seq_attn = self._prepare(out.scheduled, out.drafts)
        end_row, end = {}, 0  # row after each sampled sequence's last token in the flat batch
        for seq, num in out.scheduled.items():
            end += num
            end_row[seq] = end
        rows = torch.tensor([r for s in sources for r in range(end_row[s] - 1 - len(out.drafts.get(s, ())),
                                                                end_row[s])], dtype=torch.int64)
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
        plan = self._plan_for(meta) if step.encoder is None else None
        if plan is not None:
            group = meta.groups[0]
            hidden = plan.run(step.input_ids, step.positions, slot_mapping, group.block_tables, group.context_lens)
        else:
            hidden = self.model(step.input_ids.to(**to), step.positions.to(**to), self.kv_layers, meta)  # [T, hidden]
        if not len(step.rows):
            return None
        return self.model.compute_logits(hidden.index_select(0, step.rows.to(**to)))

    def _plan_for(self, meta) -> DecodePlan | None:
        """The decode plan, where this step is one whole-batch decode group it can take."""
        if not (self.use_decode_plan and meta.cross is None and len(meta.groups) == 1 and meta.groups[0].whole_batch):
            return None
        if self._decode_plan is False:
            self._decode_plan = DecodePlan.build(self.model, self.kv_layers)
        plan = self._decode_plan
        return plan if plan is not None and meta.num_tokens <= plan.max_batch else None

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

    def _prepare(self, scheduled: dict[Sequence, int], drafts: dict[Sequence, list[int]]):
        """ids, positions and KV slots [T] of the step's tokens, in Python ints and one tensor each
        (per-sequence tensor ops measured ~40 us a sequence: 0.66 against 0.22 ms a step at 16
        decode rows), and each sequence's SeqAttention."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_attn: list[SeqAttention] = []
        for seq, num in scheduled.items():
            start = seq.num_computed_tokens
            draft = drafts.get(seq)
            ids.extend(seq.token_ids[start : start + num] if draft is None else seq.token_ids[start:] + draft)
            blocks = seq.block_table
            positions.extend(range(start, start + num))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + num))
            table = torch.tensor(blocks, dtype=torch.int64)  # built once per step, shared
            if draft is None:
                seq_attn.append(SeqAttention(num, start + num, table))
            else:  # each position a decode of its own: sees its predecessors, not its successors
                seq_attn.extend(SeqAttention(1, start + i + 1, table) for i in range(num))
        ids_t, positions_t, slots_t = (torch.tensor(v, dtype=torch.int64) for v in (ids, positions, slots))
        return ids_t, positions_t, slots_t, seq_attn


def _sampling_row(seq: Sequence, draft_prefix: list[int] = ()) -> SamplingRow:
    """The sampler's view of `seq` (followed by `draft_prefix`, for a draft's later positions)."""
    return SamplingRow(
        params=seq.params,
        prompt_token_ids=TokenSlice(seq.token_ids, 0, seq.prompt_len),
        output_token_ids=TokenSlice(seq.token_ids, seq.prompt_len, seq.num_tokens, draft_prefix),
        generator=seq.generator,
        eos_token_ids=seq.eos_token_ids,
    )

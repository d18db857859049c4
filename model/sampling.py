"""SamplingParams and the batched Sampler: logits -> token ids (+ logprobs), one host sync.

Per row, in order (vLLM semantics):
  logprobs = log_softmax(raw logits) in float32, before everything below
  logit_bias -> min_tokens mask (eos + stop_token_ids) -> repetition/presence/frequency
  -> token mask (structured output: tokens the row's grammar forbids become -inf)
  greedy rows: argmax (first index on ties)
  random rows: / temperature -> top-k -> top-p -> min-p -> softmax -> exponential race
A row whose request has a seed draws its noise only from its own generator, so its tokens
do not depend on what else is in the batch.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

MAX_LOGPROBS = 20            # most alternatives a request may ask for per token
LOGIT_BIAS_LIMIT = 100.0     # |logit_bias value| bound (OpenAI)
PENALTY_LIMIT = 2.0          # |presence_penalty|, |frequency_penalty| bound (OpenAI)
GREEDY_TEMPERATURE = 1e-5    # temperatures below this are greedy (as vLLM): x / T overflows
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
_PACK_DTYPE = torch.float64  # holds token ids and float32 logprobs exactly for the one transfer


GRAMMAR_KINDS = ("json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GrammarSpec:
    """What a structured-output request constrains its output to (hashable: the engine's
    compiled-grammar cache key). `kind` is one of GRAMMAR_KINDS; `source` is a JSON schema as
    JSON text, a regex, a JSON list of strings (choice) or a Lark/GBNF grammar. The sampler
    never sees it: the engine turns it into a per-step token mask (server/engine/grammar.py)."""

    kind: str
    source: str

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            _fail("structured.kind", f"one of {GRAMMAR_KINDS}", self.kind)
        if not isinstance(self.source, str):
            _fail("structured.source", "a string", self.source)


def _fail(name: str, allowed: str, value: object) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    """How one request turns logits into tokens. `__post_init__` validates every field
    (ValueError naming the field and its allowed range) and normalises types: ints/floats
    become Python ints/floats, `stop` given as one string becomes a list, string keys of
    `logit_bias` become ints. Vocabulary bounds are checked later by `check_vocab`."""

    n: int = 1
    max_tokens: int | None = 16        # None: until the model's max length (engine decides); 0: score only
    temperature: float = 1.0           # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                     # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0    # over prompt + output; logit > 0 divided, else multiplied
    presence_penalty: float = 0.0      # over output tokens only
    frequency_penalty: float = 0.0     # over output tokens only, times the count
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # matched by the engine's text layer
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None        # None: none; 0: sampled token's; k: top-k + sampled
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's, with its top-k (engine)
    skip_special_tokens: bool = True
    structured: GrammarSpec | None = None  # output constrained to a grammar (the engine masks)

    def __post_init__(self) -> None:
        self._check_int("n", 1)
        self._check_int("max_tokens", 0, optional=True)
        self._check_int("top_k", -1)
        self._check_int("min_tokens", 0, self.max_tokens)
        self._check_int("logprobs", 0, MAX_LOGPROBS, optional=True)
        self._check_int("prompt_logprobs", 0, MAX_LOGPROBS, optional=True)
        self._check_int("seed", *SEED_RANGE, optional=True)
        self._check_real("temperature", 0.0, None)
        self._check_real("top_p", 0.0, 1.0, lo_open=True)
        self._check_real("min_p", 0.0, 1.0)
        self._check_real("repetition_penalty", 0.0, None, lo_open=True)
        self._check_real("presence_penalty", -PENALTY_LIMIT, PENALTY_LIMIT)
        self._check_real("frequency_penalty", -PENALTY_LIMIT, PENALTY_LIMIT)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "a bool", getattr(self, name))
        self._check_stop()
        self._check_logit_bias()
        if self.structured is not None and not isinstance(self.structured, GrammarSpec):
            _fail("structured", "a GrammarSpec or None", self.structured)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a token id named by the request is outside the vocabulary
        (call at admission; the sampler silently skips such ids rather than fail a batch)."""
        for name, ids in (("logit_bias", self.logit_bias or {}), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                _fail(f"{name} token ids", f"< vocab size {vocab_size}", bad)

    def _check_int(self, name: str, lo: int, hi: int | None = None, *, optional: bool = False) -> None:
        v = getattr(self, name)
        if v is None and optional:
            return
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        if not (_is_int(v) and lo <= v and (hi is None or v <= hi)):
            _fail(name, allowed + (" or None" if optional else ""), v)
        setattr(self, name, int(v))

    def _check_real(self, name: str, lo: float, hi: float | None, *, lo_open: bool = False) -> None:
        v = getattr(self, name)
        above = _is_real(v) and (v > lo if lo_open else v >= lo)
        if not (above and (hi is None or v <= hi)):
            left = f"({lo}" if lo_open else f"[{lo}"
            _fail(name, f"a finite number in {left}, {'inf)' if hi is None else f'{hi}]'}", v)
        setattr(self, name, float(v))

    def _check_stop(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not (isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop)):
            _fail("stop", "a non-empty string or a list of non-empty strings", self.stop)
        self.stop = list(self.stop)
        ids = self.stop_token_ids
        if not (isinstance(ids, (list, tuple)) and all(_is_int(t) and t >= 0 for t in ids)):
            _fail("stop_token_ids", "a list of integers >= 0", ids)
        self.stop_token_ids = [int(t) for t in ids]

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            _fail("logit_bias", "a dict {token_id: bias} or None", self.logit_bias)
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            tok = int(key) if isinstance(key, str) and key.strip().lstrip("+-").isdigit() else key
            if not (_is_int(tok) and tok >= 0):
                _fail("logit_bias keys", "token ids (integers >= 0, or such strings)", key)
            if not (_is_real(value) and -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT):
                _fail(f"logit_bias[{key!r}]", f"a number in [{-LOGIT_BIAS_LIMIT}, {LOGIT_BIAS_LIMIT}]", value)
            bias[int(tok)] = float(value)
        self.logit_bias = bias


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request generator for a seeded request; create it on the logits' device."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class SamplingRow:
    """One row of the logits batch and what the sampler needs to process it."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None  # set iff params.seed is not None; sole randomness
    eos_token_ids: Sequence[int] = ()         # masked with stop_token_ids while output < min_tokens


class TokenMask(NamedTuple):
    """Allowed tokens of some rows of the batch: bit `t % 32` of `bitmask[j, t // 32]` is set
    iff token t may follow in row `rows[j]` (llguidance's layout). Host tensor."""

    rows: list[int]
    bitmask: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32


class SamplerOutput(NamedTuple):
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: None, or {token: logprob} top-k + sampled


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without waiting on the device (pinned, non-blocking copy)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=dtype), device)


def _token_counts(seqs: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), vocab] float32 occurrence counts of each row's token ids (scatter_add:
    unlike bincount it needs no host sync on CUDA)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
    toks = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    flat = _to_device(rows * vocab + toks, device)
    counts = torch.zeros(len(seqs) * vocab, dtype=torch.float32, device=device)
    counts.scatter_add_(0, flat, torch.ones(flat.shape, dtype=torch.float32, device=device))
    return counts.view(len(seqs), vocab)


def _apply_logit_bias(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = x.shape[1]
    flat, vals = [], []
    for i, row in enumerate(rows):
        for tok, bias in (row.params.logit_bias or {}).items():
            if tok < vocab:
                flat.append(i * vocab + tok)
                vals.append(bias)
    if flat:
        x.view(-1).index_add_(0, _tensor(flat, torch.long, x.device), _tensor(vals, torch.float32, x.device))


def _apply_min_tokens(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Forbid stop tokens (and eos unless ignore_eos, as vLLM) until min_tokens are out."""
    vocab = x.shape[1]
    flat = []
    for i, row in enumerate(rows):
        p = row.params
        if len(row.output_token_ids) < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(row.eos_token_ids))
            flat += [i * vocab + t for t in banned if 0 <= t < vocab]
    if flat:
        x.view(-1).index_fill_(0, _tensor(flat, torch.long, x.device), float("-inf"))


def _apply_penalties(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition (prompt + output), presence and frequency (output only), only on the
    rows that ask for them."""
    idx = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not idx:
        return
    prows = [rows[i].params for i in idx]
    vocab, device = x.shape[1], x.device
    idx_t = _tensor(idx, torch.long, device)
    xs = x.index_select(0, idx_t)                                             # [P, V]
    counts = _token_counts([rows[i].output_token_ids for i in idx], vocab, device)  # [P, V]
    if any(p.repetition_penalty != 1.0 for p in prows):
        prompts = [rows[i].prompt_token_ids if rows[i].params.repetition_penalty != 1.0 else ()
                   for i in idx]
        seen = (counts > 0) | (_token_counts(prompts, vocab, device) > 0)
        rep = _tensor([p.repetition_penalty for p in prows], torch.float32, device)[:, None]
        factor = torch.where(seen, rep, 1.0)
        xs = torch.where(xs > 0, xs / factor, xs * factor)
    freq = _tensor([p.frequency_penalty for p in prows], torch.float32, device)[:, None]
    pres = _tensor([p.presence_penalty for p in prows], torch.float32, device)[:, None]
    xs = xs - freq * counts - pres * (counts > 0)
    x.index_copy_(0, idx_t, xs)


def _top_k_top_p(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask to -inf what top-k (ties with the k-th largest kept, as HF/vLLM) and then top-p
    (keep the smallest head whose probability reaches top_p) remove. x: [R, V]."""
    vocab, device = x.shape[1], x.device
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    ps = [r.params.top_p if r.params.top_p < 1.0 else math.inf for r in rows]
    use_k, use_p = min(ks) < vocab, min(ps) < math.inf
    if not (use_k or use_p):
        return x
    k_t = _tensor(ks, torch.long, device)[:, None]                           # [R, 1]
    if not use_p:
        kmax = max(k for k in ks if k < vocab)
        top = x.topk(kmax, dim=-1).values                                     # [R, kmax]
        kth = top.gather(1, k_t.clamp(max=kmax) - 1)
        kth = torch.where(k_t < vocab, kth, float("-inf"))
        return x.masked_fill(x < kth, float("-inf"))
    sorted_x, order = x.sort(dim=-1, descending=True)                         # [R, V]
    drop = sorted_x < sorted_x.gather(1, k_t - 1)
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                                # exclusive cumsum
    drop |= mass_before >= _tensor(ps, torch.float32, device)[:, None]
    mask = torch.empty_like(drop).scatter_(1, order, drop)
    return x.masked_fill(mask, float("-inf"))


def _min_p(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Zero tokens whose probability is below min_p times the row's largest. probs: [R, V]."""
    if not any(r.params.min_p > 0.0 for r in rows):
        return probs
    min_p = _tensor([r.params.min_p for r in rows], torch.float32, probs.device)[:, None]
    return probs.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * min_p, 0.0)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[G, W] int32 bitmask (host) -> [G, vocab] bool, True where allowed (one numpy call)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")  # [G, 32W]
    allowed = torch.from_numpy(bits).view(torch.bool)[:, :vocab]
    if allowed.shape[1] < vocab:  # a mask narrower than the logits forbids the rest
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    return allowed


def _apply_token_mask(x: torch.Tensor, mask: TokenMask | None) -> torch.Tensor:
    """Forbidden tokens of the masked rows -> -inf; other rows are not touched. (One
    `where` pass: on the CPU it beats masked_fill with the negated mask.)"""
    if mask is None or not mask.rows:
        return x
    allowed = _to_device(unpack_bitmask(mask.bitmask, x.shape[1]), x.device)  # [G, V]
    ninf = torch.tensor(float("-inf"), device=x.device)
    if mask.rows == list(range(x.shape[0])):
        return torch.where(allowed, x, ninf)
    idx = _tensor(mask.rows, torch.long, x.device)
    return x.index_copy_(0, idx, torch.where(allowed, x.index_select(0, idx), ninf))


def process_logits(logits: torch.Tensor, rows: list[SamplingRow], mask: TokenMask | None = None) -> torch.Tensor:
    """[B, V] float32 copy of `logits` after logit_bias, min_tokens, the penalties and the
    token mask (the steps every row goes through before greedy/random choice); `logits` is
    left untouched."""
    x = logits.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    _apply_logit_bias(x, rows)
    _apply_min_tokens(x, rows)
    _apply_penalties(x, rows)
    return _apply_token_mask(x, mask)


def sampling_probs(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Random rows: processed logits [R, V] -> the (unnormalized after min-p) distribution
    they are sampled from: temperature, top-k, top-p, softmax, min-p."""
    temps = _tensor([r.params.temperature for r in rows], torch.float32, x.device)
    x = _top_k_top_p(x / temps[:, None], rows)
    return _min_p(x.softmax(dim=-1), rows)


class Sampler:
    """Batched sampler: `sampler(logits [B, V], rows)` -> SamplerOutput with one host sync.
    Greedy, top-k, top-p and min-p are vectorised over rows; penalties, logit bias,
    min_tokens and a structured-output `TokenMask` cost only the rows that use them.
    Unseeded rows share this sampler's generator (one per device, seeded with `seed`, or
    randomly when None)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], mask: TokenMask | None = None,
    ) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows) or not logits.is_floating_point():
            raise ValueError(f"logits must be a float [len(rows)={len(rows)}, vocab] tensor, "
                             f"got {tuple(logits.shape)} {logits.dtype}")
        if not rows:
            return SamplerOutput([], [])
        tokens = self._choose(process_logits(logits, rows, mask), rows)       # [B] int64
        return self._finish(logits, tokens, rows)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            g = torch.Generator(device=device)
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(self.seed)
            self._generators[device] = g
        return self._generators[device]

    def _choose(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        ridx = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not ridx:
            return x.argmax(dim=-1)
        if len(ridx) == len(rows):
            return self._sample(x, rows)
        ridx_t = _tensor(ridx, torch.long, x.device)
        sampled = self._sample(x.index_select(0, ridx_t), [rows[i] for i in ridx])
        return x.argmax(dim=-1).index_copy_(0, ridx_t, sampled)

    def _sample(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Random rows only. x: [R, V] processed logits -> [R] token ids."""
        probs = sampling_probs(x, rows)
        # exponential race: argmax(p / E), E ~ Exp(1) iid, picks i with probability p_i / sum(p)
        return probs.div_(self.noise(probs, rows)).argmax(dim=-1)

    def noise(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """[R, V] Exp(1) draws for the exponential race, each seeded row's from its own generator."""
        q = torch.empty_like(probs)                                           # [R, V]
        if any(r.generator is None for r in rows):
            q.exponential_(generator=self._generator(probs.device))
        for j, row in enumerate(rows):
            g = row.generator
            if g is not None:   # drawn alone, so independent of the rest of the batch
                q[j] = torch.empty(probs.shape[1], device=g.device).exponential_(generator=g)
        # exponential_ may return 0 on some backends; 0/0 would be NaN and win argmax
        return q.clamp_min_(torch.finfo(torch.float32).tiny)

    def uniform(self, num: int, device: torch.device, rows: list[SamplingRow]) -> torch.Tensor:
        """[num] U[0, 1) draws, one per row, each seeded row's from its own generator."""
        u = torch.empty(num, device=device)
        if any(r.generator is None for r in rows):
            u.uniform_(generator=self._generator(device))
        for j, row in enumerate(rows):
            if row.generator is not None:
                u[j] = torch.empty(1, device=device).uniform_(generator=row.generator)[0]
        return u

    def _finish(self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Gather logprobs of the raw logits, then move everything to the host at once."""
        batch, vocab = logits.shape
        lp_idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        parts, k = [tokens], 0
        if lp_idx:
            if len(lp_idx) == batch:
                raw, chosen = logits, tokens
            else:
                idx_t = _tensor(lp_idx, torch.long, logits.device)
                raw, chosen = logits.index_select(0, idx_t), tokens.index_select(0, idx_t)
            lp = raw.float().log_softmax(dim=-1)                              # [L, V]
            parts.append(lp.gather(1, chosen[:, None]).squeeze(1))
            k = min(max(rows[i].params.logprobs for i in lp_idx), vocab)
            if k > 0:
                top_lp, top_ids = lp.topk(k, dim=-1)                          # [L, k]
                parts += [top_ids.flatten(), top_lp.flatten()]
        flat = torch.cat([p.to(_PACK_DTYPE) for p in parts]).tolist()        # the one sync
        return _unpack(flat, rows, lp_idx, k)


def _unpack(flat: list[float], rows: list[SamplingRow], lp_idx: list[int], k: int) -> SamplerOutput:
    batch, n_lp = len(rows), len(lp_idx)
    token_ids = [int(t) for t in flat[:batch]]
    chosen_lp = flat[batch:batch + n_lp]
    top_ids = flat[batch + n_lp:batch + n_lp + n_lp * k]
    top_lp = flat[batch + n_lp + n_lp * k:]
    logprobs: list[dict[int, float] | None] = [None] * batch
    for j, i in enumerate(lp_idx):
        want = min(rows[i].params.logprobs, k)
        entry = {int(top_ids[j * k + m]): top_lp[j * k + m] for m in range(want)}
        entry.setdefault(token_ids[i], chosen_lp[j])
        logprobs[i] = entry
    return SamplerOutput(token_ids, logprobs)

"""Grammar-constrained decoding with llguidance: GrammarSpec -> per-sequence matcher -> token mask.

    GrammarCompiler.compile(spec)     once per distinct spec (LRU): llguidance grammar + matcher;
                                      any thread (AsyncEngine compiles in a worker before admission)
    seq.grammar = GrammarState(...)   a fresh copy of that matcher for each sequence (n > 1 too)
    BitmaskFiller(states)             each step, the masks of all constrained rows together
    state.sync(seq)                   after a token is appended: consume what it has not seen

A state is derived from the sequence's output tokens alone (`sync` consumes the ones it has
not seen, rolls back ones that are gone), so preemption, recompute and prefix caching need
nothing from it. JSON schemas compile without free whitespace, with `", "` and `": "` as
separators (what `json.dumps` writes): a model cannot pad its output with endless blanks; a
schema's own `"x-guidance"` options override this.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence as Seq

import llguidance
import torch

from model.sampling import GrammarSpec
from model.tokenizer import Tokenizer

log = logging.getLogger("workmem.grammar")

DEFAULT_GRAMMAR_CACHE_SIZE = 128  # compiled grammars kept (LRU)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
LLGUIDANCE_LOG_LEVEL = 0  # matchers report errors through is_error()/get_error(), not stderr
PARALLEL_MASK_ROWS = 32  # constrained rows from which masks go through llguidance's thread pool


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for `spec`; ValueError when the source is unreadable."""
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        return llguidance.grammar_from("choice", choices)
    if spec.kind == "regex":
        return llguidance.grammar_from("regex", spec.source)
    return llguidance.grammar_from("grammar", spec.source)  # Lark, or GBNF converted to Lark


def check_grammar(spec: GrammarSpec) -> None:
    """ValueError naming the problem if `spec` does not compile (no tokenizer needed)."""
    error = llguidance.LLMatcher.validate_grammar(grammar_text(spec))
    if error:
        raise ValueError(error.strip())


class GrammarCompiler:
    """Compiles GrammarSpecs against the model's vocabulary; keeps the last `cache_size`
    compiled matchers (LRU) and hands out fresh copies. The llguidance tokenizer is built
    from the HF `tokenizers` JSON on first use (GGUF vocabularies are converted to one too)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Seq[int],
                 cache_size: int = DEFAULT_GRAMMAR_CACHE_SIZE) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.RLock()  # the cache and the tokenizer: compiled from worker threads too

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            if not self.eos_token_ids:
                raise ValueError("structured output needs an end-of-sequence token; this tokenizer has none")
            if self.tokenizer.vocab_size > self.vocab_size:
                raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than the "
                                 f"model's {self.vocab_size} logits: structured output cannot mask them")
            self._ll_tokenizer = llguidance.LLTokenizer(  # masks are as wide as the logits
                self.tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids)
        return self._ll_tokenizer

    def prepare(self) -> None:
        """Build the llguidance tokenizer now (any thread). Converting a 49k vocabulary takes
        ~0.9 s and holds the GIL throughout, so `workmem serve` does it at start-up rather
        than inside the first structured request (where every stream would stall for it)."""
        with self._lock:
            try:
                self.ll_tokenizer  # noqa: B018 - built and kept
            except ValueError:  # no structured output for this vocabulary: each request is told why
                pass

    def compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """The compiled grammar in its start state, shared (copy it before use: `matcher`);
        ValueError naming the problem for a bad grammar. Any thread: AsyncEngine compiles
        each request's grammar in a worker before the request reaches the engine thread."""
        with self._lock:
            proto = self._cache.get(spec)
            if proto is not None:
                self._cache.move_to_end(spec)
                return proto
            tokenizer = self.ll_tokenizer
        proto = _compile(tokenizer, spec)  # outside the lock: two threads may compile one spec, harmlessly
        with self._lock:
            self._cache[spec] = proto
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return proto

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher in its start state (see `compile`)."""
        return self.compile(spec).deep_copy()

    def __len__(self) -> int:
        return len(self._cache)

    def cached_specs(self) -> list[GrammarSpec]:
        """The specs whose compiled grammars are cached, least recently used first."""
        with self._lock:
            return list(self._cache)


def _compile(tokenizer: llguidance.LLTokenizer, spec: GrammarSpec) -> llguidance.LLMatcher:
    proto = llguidance.LLMatcher(tokenizer, grammar_text(spec), log_level=LLGUIDANCE_LOG_LEVEL)
    if proto.is_error():
        raise ValueError(f"structured: invalid {spec.kind.replace('_', ' ')}: {proto.get_error().strip()}")
    return proto


class GrammarState:
    """One sequence's matcher and how many of its output tokens it has consumed."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.num_consumed = 0

    def sync(self, token_ids: list[int], prompt_len: int) -> None:
        """Make the matcher have consumed exactly `token_ids[prompt_len:]` (O(new tokens))."""
        num_output = len(token_ids) - prompt_len
        if num_output < self.num_consumed:
            self.matcher.rollback(self.num_consumed - num_output)
            self.num_consumed = num_output
        for token in token_ids[prompt_len + self.num_consumed:]:
            self.matcher.consume_token(token)  # an error sticks: see `failed`
            self.num_consumed += 1

    @property
    def done(self) -> bool:
        """The grammar is complete (only EOS may follow) or broken: nothing more can be added."""
        return self.matcher.is_stopped()

    @property
    def failed(self) -> str | None:
        """Why the matcher broke (a token it did not allow was consumed), else None."""
        if not self.matcher.is_error():
            return None
        return self.matcher.get_error() or "error"


class BitmaskFiller:
    """Computes the next-token bitmasks of a step's constrained rows together into a reused
    host buffer, the GIL released: row by row on this thread, or, from `parallel_rows` rows
    on, in one call to llguidance's thread pool (on 2 cores, 16 rows of a JSON schema over a
    49k vocabulary took 0.21 ms on this thread and 0.33 ms through the pool, whose workers
    also compete with torch's for the cores)."""

    def __init__(self, parallel_rows: int = PARALLEL_MASK_ROWS) -> None:
        self.parallel_rows = parallel_rows
        self._executor: llguidance.LLExecutor | None = None
        self._buffer = torch.empty(0, 0, dtype=torch.int32)

    def __call__(self, states: list[GrammarState], vocab_size: int) -> torch.Tensor:
        """[len(states), ceil(vocab_size / 32)] int32 (a view of the buffer: use before the
        next call); `vocab_size` is the logits' width, which the matchers were built for."""
        words = (vocab_size + 31) // 32
        if self._buffer.shape[0] < len(states) or self._buffer.shape[1] != words:
            self._buffer = torch.empty(max(len(states), self._buffer.shape[0]), words, dtype=torch.int32)
        out = self._buffer[: len(states)]  # contiguous rows
        if len(states) < self.parallel_rows:
            for i, s in enumerate(states):
                s.matcher.unsafe_compute_mask_ptr(out[i].data_ptr(), words * 4)
            return out
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        self._executor.unsafe_compute_mask_ptr(
            [(s.matcher, i) for i, s in enumerate(states)], out.data_ptr(), words * 4, len(states))
        return out

"""LLMEngine: the only door into the engine. Synchronous, token ids in, step outputs out.

    engine.add_request(request_id, prompt_token_ids, params)
    while engine.has_unfinished():
        for out in engine.step(): ...      # StepOutput per sequence that advanced
    engine.abort(request_id)               # any time; frees everything the request held
"""
from __future__ import annotations

import itertools
import logging
import weakref
from typing import TYPE_CHECKING, Callable
from pathlib import Path

import torch

from model.kv_quant import INT8_ROW_FORMAT, kv_dtype_name
from model.loader import LoadedModel
from model.sampling import GrammarSpec, SamplingParams
from server.engine.build import build_rank
from server.engine.config import EngineConfig, resolve_device, resolve_dtype
from server.engine.encoder_requests import check_encoder_request, encoder_namespace
from server.engine.grammar import GrammarCompiler, GrammarState
from server.engine.limits import RequestLimits
from server.engine.memory_view import memory_view
from server.engine.memory import BlockPool, root_hash
from server.engine.output import StepOutput, TextStream
from server.engine.runner import Runner
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Sequence
from server.engine.sessions.offload import HostKVSwapper, KVSwap, KVSwapper
from server.engine.parallel.launch import TensorParallel
from server.engine.sessions.store import SessionStore
from server.engine.speculate import Speculator
from server.engine.stats import EngineStats
from server.engine.sessions import SessionTable, SessionTurn, TurnResult

if TYPE_CHECKING:
    import llguidance

log = logging.getLogger("workmem.engine")


def kv_namespace(model: str, dtype: torch.dtype, quantization: str, kv_dtype: torch.dtype | None = None) -> str:
    """What a KV block depends on besides its tokens: the weights (path, size and mtime of
    the file, or of a checkpoint directory's files), their dtype and quantization, and the
    KV pool's dtype where it differs from the weights' (int8: with its row format)."""
    path = Path(model)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    stamps = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    kv = "" if kv_dtype in (None, dtype) else f"|kv={kv_dtype}"
    if kv_dtype == torch.int8:
        kv += f"/rows{INT8_ROW_FORMAT}"
    return f"{path.resolve()}|{','.join(stamps)}|{dtype}|{quantization}{kv}"


class LLMEngine:
    """Owns the model, KV pool, scheduler and runner; see module doc for the protocol."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if loaded is not None and config.tensor_parallel_size > 1:
            raise ValueError("a preloaded model cannot be sharded: let the engine load it under tensor parallelism")
        self.tp = TensorParallel(config, self.device) if config.tensor_parallel_size > 1 else None  # rank 0 of N
        try:
            self._build(config, loaded)
        except BaseException as exc:  # the followers must not wait for a rank 0 that never serves
            if self.tp is not None:
                self.tp.abandon(f"rank 0 failed to start: {type(exc).__name__}: {exc}")
            raise
        if self.tp is not None:
            self.tp.started()
        log.info(
            "engine ready: %s on %s/%s, %d KV blocks x %d tokens (%.1f MiB, %s), max_model_len %d, "
            "kernels %s, quantization %s",
            config.model, self.device, self.dtype, self.plan.num_blocks, config.block_size,
            self.plan.num_blocks * self.plan.bytes_per_block / 2**20, self.plan.kv_dtype, self.max_model_len,
            self.kernel_backend if self.kernel_variant is None else f"native ({self.kernel_variant})",
            config.quantization,
        )

    def _build(self, config: EngineConfig, loaded: LoadedModel | None) -> None:
        parts = build_rank(config, self.device, self.dtype, loaded=loaded,
                           group=None if self.tp is None else self.tp.group,
                           runner_cls=Runner if self.tp is None else self.tp.runner)
        self.model, self.model_config, self.tokenizer = parts.model, parts.model_config, parts.tokenizer
        if self.tp is not None and self.model_config.is_encoder_decoder:
            raise ValueError("tensor parallelism does not support encoder-decoder models (use one rank)")
        self.plan, self.runner, self.kernel_backend = parts.plan, parts.runner, parts.kernel_backend
        self.kernel_variant = parts.kernel_variant
        self.max_model_len = self.plan.max_model_len
        self.limits = RequestLimits(self.max_model_len, self.model_config.vocab_size, self.tokenizer.vocab_size,
                                    self.tokenizer.max_token_chars, self.plan.max_encoder_len)
        self.eos_token_ids = tuple(
            dict.fromkeys((*self.tokenizer.eos_token_ids, *self.model_config.eos_token_ids))
        )
        self.pool = BlockPool(self.plan.num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_namespace = kv_namespace(config.model, self.dtype, config.quant.mode, self.plan.kv_dtype)
        self.sessions = SessionTable(
            self.pool, config.max_sessions, int(config.session_memory_fraction * self.plan.num_blocks),
            store=SessionStore(config.session_dir) if config.session_dir else None,
            swapper=self._offload_tier(),
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                            config.max_prompt_logprob_tokens),
            self.pool, reclaim=_weak_call(self._reclaim),
            speculator=self._speculator(config),
        )
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                                        config.grammar_cache_size)
        self.streams: dict[Sequence, TextStream] = {}
        self.fault_hook = None  # tests only: callable(seq) run as each sequence gets its token

    def _speculator(self, config: EngineConfig) -> Speculator | None:
        """The drafter, when asked for; an encoder-decoder decoder's context is not its input
        (the source text is the encoder's), so it does not draft."""
        if not config.speculative.enabled:
            return None
        if self.model_config.is_encoder_decoder:
            log.warning("speculative decoding is off for encoder-decoder models (nothing to copy from)")
            return None
        return Speculator(config.speculative)

    def _offload_tier(self) -> KVSwap | None:
        """Where idle sessions' KV goes when it leaves the pool: --session-dir, else host
        memory on CUDA, else nowhere (dropped and recomputed; on CPU the pool is host memory)."""
        if self.tp is not None:  # each rank would have to swap its own heads: recompute instead
            log.info("tensor parallelism: idle sessions' KV is not offloaded (their turns recompute it)")
            return None
        if self.config.session_dir:
            return KVSwapper(self.runner.kv_cache, self.config.block_size, self.config.session_dir)
        if self.device.type == "cuda":
            return HostKVSwapper(self.runner.kv_cache)
        return None

    def _reclaim(self) -> bool:
        """What the scheduler calls when blocks run short, before it waits or preempts: an idle
        session's pins (least recently used first), else those of a session whose turn is
        queued or preempted (the last queued first; see SessionTable.release_waiting)."""
        if self.sessions.reclaim():
            return True
        for seq in reversed(self.scheduler.waiting):
            if seq.session_turn is not None and self.sessions.release_waiting(seq.session_turn.session):
                seq.resume = None  # those blocks are no longer held for it: found by hash, or recomputed
                return True
        return False

    def close(self, between_steps: bool = True) -> None:
        """Stop the tensor-parallel followers (nothing to do otherwise). Between steps they are
        told to stop; otherwise (a step may still be running on another thread, whose
        collectives a STOP would interleave with) the spawned ones are killed and the group is
        marked broken."""
        if self.tp is not None:
            self.tp.stop(between_steps)

    @property
    def rank_lost(self) -> bool:
        """Whether a tensor-parallel rank was lost (the engine is then broken for good)."""
        return self.tp is not None and self.tp.lost is not None

    def on_rank_lost(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` once if a tensor-parallel rank is lost (never without TP)."""
        if self.tp is not None:
            self.tp.on_lost.append(callback)

    # -- requests ---------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        session_id: str | None = None, new_messages: list[dict] | None = None, cache_salt: str | None = None,
        grammar: "llguidance.LLMatcher | None" = None,
    ) -> None:
        """Queue a request. `grammar`: `params.structured` already compiled (`compile_grammar`,
        off this thread); without it the grammar is compiled here. RequestError (a ValueError; see `limits`) for an empty or too
        long prompt or ids outside the model's vocabulary; ValueError for a duplicate id or
        a `params.structured` grammar that does not compile (each of the n sequences
        follows its own copy of the grammar; one that completes it stops). With
        `session_id`, the request is that session's next turn (SessionError if unknown or
        busy): the prompt must be the session's transcript plus the new tokens; when it
        finishes, the transcript (prompt + output) and its KV blocks become the session's,
        and `new_messages` plus the reply are appended to its messages. An aborted turn
        changes nothing."""
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.limits.check_prompt(prompt_token_ids, decode=False)  # raw ids: the model's vocabulary
        self.limits.room(len(prompt_token_ids))
        encoder_prompt = None
        if self.model_config.is_encoder_decoder:  # the prompt is the encoder's; the decoder starts alone
            encoder_prompt = check_encoder_request(prompt_token_ids, params, session_id)
            prompt_token_ids = [self.model_config.encoder.decoder_start_token_id]
        params.check_vocab(self.limits.vocab_size)
        if params.n > self.config.max_num_seqs:  # all n run at once: it could never be admitted
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        seqs = [
            Sequence.new(request_id, list(prompt_token_ids), params, self.eos_token_ids, self.device, i)
            for i in range(params.n)
        ]
        namespace = self.kv_namespace if encoder_prompt is None else encoder_namespace(self.kv_namespace, encoder_prompt)
        for seq in seqs:  # prefix-cache hits only among requests of this model with the same salt
            seq.cache_root = root_hash(namespace, cache_salt)
            seq.encoder_prompt = encoder_prompt
        if params.structured is not None:
            proto = grammar if grammar is not None else self.grammars.compile(params.structured)
            for seq in seqs:
                seq.grammar = GrammarState(proto.deep_copy())
        session = None
        if session_id is not None:
            if params.max_tokens == 0:
                raise ValueError("max_tokens must be >= 1 in a session turn")
            if params.n != 1:
                raise ValueError("n must be 1 in a session turn")
            if not self.config.enable_prefix_caching:
                raise ValueError("sessions need prefix caching (drop --no-prefix-caching)")
            session = self.sessions.begin_turn(session_id)
        try:  # from here a failure must give the turn back: its session is busy and locked
            if session is not None:
                seqs[0].session_turn = SessionTurn(session, list(new_messages or []))
                kv = session.num_kv_tokens
                if 0 < kv < len(prompt_token_ids) and prompt_token_ids[:kv] == session.token_ids[:kv]:
                    seqs[0].resume = (list(session.block_table), kv)  # start from the resident KV
            for seq in seqs:
                self.streams[seq] = TextStream(self.tokenizer, seq)
            self.scheduler.add(seqs)
        except BaseException:
            for seq in seqs:
                self.streams.pop(seq, None)
            if session is not None:
                self.sessions.abort_turn(session)
            raise

    def compile_grammar(self, spec: GrammarSpec) -> "llguidance.LLMatcher":
        """`spec` compiled against the vocabulary, for add_request's `grammar` (any thread;
        ValueError for a bad grammar)."""
        return self.grammars.compile(spec)

    def prepare_structured_output(self) -> None:
        """Build the grammar engine's view of the vocabulary now (~1 s for 49k tokens, holding
        the GIL), not inside the first structured request (any thread, before serving)."""
        self.grammars.prepare()

    def abort(self, request_id: str) -> list[StepOutput]:
        """Stop a request wherever it is; returns its final outputs (reason "abort")."""
        aborted = self.scheduler.abort(request_id)
        for seq in aborted:
            if seq.session_turn is not None:  # the session stays as it was before the turn
                self.sessions.abort_turn(seq.session_turn.session)
        return [self._final(seq, []) for seq in aborted]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ---------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One scheduling round. A failure that belongs to one request (its detokenizing,
        stop checks or session bookkeeping, or whatever `fault_hook(seq)` raises in tests)
        fails that request alone: its final StepOutput carries `error`; the rest go on."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        sampled = self.runner.execute(out)
        for seq, scores in sampled.prompt_logprobs.items():
            seq.prompt_logprobs.extend(scores)
        self.scheduler.update(out, sampled.token_ids)
        outputs, failed = [], set()
        work = zip((dst for _, dst in out.samples), sampled.token_ids, sampled.logprobs)
        if out.scored_only:
            work = itertools.chain(work, ((seq, None, None) for seq in out.scored_only))
        for seq, tokens, lp in work:
            if seq.request_id in failed:
                continue
            try:
                if self.fault_hook is not None:
                    self.fault_hook(seq)
                outputs += [self._advance(seq, tokens, lp)] if tokens is not None else self._scored(seq)
            except Exception as exc:  # noqa: BLE001 - isolated to this request, logged
                log.exception("request %s failed; the others go on", seq.request_id)
                failed.add(seq.request_id)
                outputs += self._fail(seq.request_id, f"{type(exc).__name__}: {exc}")
        return outputs

    def _fail(self, request_id: str, error: str) -> list[StepOutput]:
        """Abort one request because it failed; its final outputs say why."""
        finals = [o for o in self.abort(request_id) if o.finished]
        for final in finals:
            final.error = error
        return finals

    def _advance(self, seq: Sequence, tokens: list[int], logprob: dict[int, float] | None) -> StepOutput:
        """Text and stop checks for a sequence that just received `tokens` (already appended;
        more than one after a verified draft: checked one by one, the rest dropped at a stop)."""
        text, reason, stopped = "", None, False
        for taken, token in enumerate(tokens, 1):
            delta, stopped = self.streams[seq].add([token])
            text += delta
            reason = "stop" if stopped else self._stop_reason(seq, token, len(tokens) - taken)
            if reason is not None:
                break
        if reason is None:
            return self._output(seq, tokens, logprob, text)
        if taken < len(tokens):
            self.scheduler.truncate(seq, seq.num_tokens - (len(tokens) - taken))
        tail = "" if stopped else self.streams[seq].flush()  # held back for a stop that never came
        text += tail
        if seq.session_turn is not None:
            self._commit_turn(seq, self.streams[seq].text + tail)
        self.scheduler.finish(seq, reason)
        return self._final(seq, tokens[:taken], logprob, text)

    def _stop_reason(self, seq: Sequence, token: int, ahead: int) -> str | None:
        """Why `seq` ends at `token` (None: it goes on); `ahead` tokens follow it in token_ids."""
        params = seq.params
        num_output, num_tokens = seq.num_output_tokens - ahead, seq.num_tokens - ahead
        if num_output >= params.min_tokens and (
            token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        ):
            return "stop"
        if seq.grammar is not None and self._grammar_done(seq):  # grammar rows never draft: ahead == 0
            return "stop"
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return "length"
        if num_tokens >= self.max_model_len:
            return "length"
        return None

    def _scored(self, seq: Sequence) -> list[StepOutput]:
        """A `max_tokens=0` request whose prompt is computed: it ends ("length") with its
        prompt scores, and its n > 1 siblings, never forked, with it."""
        seqs = [seq, *seq.fork_children]
        self.scheduler.finish(seq, "length")
        return [self._final(s, []) for s in seqs]

    def _grammar_done(self, seq: Sequence) -> bool:
        """Whether the sequence's grammar is complete (nothing but EOS may follow): it stops."""
        seq.grammar.sync(seq.token_ids, seq.prompt_len)
        if seq.grammar.failed:  # the sampler always masks, so this is a bug, not the request's fault
            log.warning("request %s: grammar rejected token %d: %s", seq.request_id, seq.token_ids[-1],
                        seq.grammar.failed)
        return seq.grammar.done

    def _commit_turn(self, seq: Sequence, reply: str) -> None:
        """Hand the finished turn's transcript and full KV blocks to its session."""
        turn = seq.session_turn
        messages = turn.session.messages + turn.new_messages + [{"role": "assistant", "content": reply}]
        self.sessions.commit_turn(turn.session, TurnResult(seq.token_ids, seq.block_table, seq.block_hashes,
                                                           seq.num_computed_tokens, messages))

    def _final(self, seq: Sequence, tokens: list[int], logprob=None, text: str = "") -> StepOutput:
        self.streams.pop(seq, None)
        return self._output(seq, tokens, logprob, text)

    def _output(self, seq: Sequence, tokens: list[int], logprob, text: str) -> StepOutput:
        return StepOutput(
            request_id=seq.request_id,
            index=seq.index,
            new_token_ids=tokens,
            new_logprobs=None if seq.params.logprobs is None else ([logprob] if tokens else []),
            prompt_logprobs=self._take_prompt_logprobs(seq),
            text=text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens or 0,
            queue_time=seq.queue_time,
        )

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list | None:
        """The prompt's scores once they are all there (handed out once; None otherwise)."""
        scores = seq.prompt_logprobs
        if scores is None or len(scores) < seq.prompt_len:
            return None
        seq.prompt_logprobs = None
        return scores

    def expire_sessions(self, now: float | None = None, sweep: bool = True) -> list[str]:
        """SessionTable.expire (`sweep` False: the store's sweep is left to `sweep_sessions`)."""
        return self.sessions.expire(now, sweep)

    def read_expired_sessions(self, now: float) -> list[str]:
        """The store's sessions expired by `now` (SessionTable.read_expired; any thread)."""
        return self.sessions.read_expired(now)

    def sweep_sessions(self, now: float, expired: list[str]) -> list[str]:
        """SessionTable.sweep of `expired` (read by `read_expired_sessions` off this thread)."""
        return self.sessions.sweep(now, expired)

    def read_session_files(self) -> list:
        """The session store's readable files (SessionTable.read_files; any thread)."""
        return self.sessions.read_files()

    def read_session_expiries(self, prefix: str) -> dict[str, float]:
        """When the store's sessions named `prefix...` expire (SessionTable.read_expiries; any thread)."""
        return self.sessions.read_expiries(prefix)

    def save_sessions(self) -> int:
        """At graceful shutdown: write resident sessions' KV to disk (see SessionTable.save_all)."""
        return self.sessions.save_all()

    # -- introspection ----------------------------------------------------------------
    def has_request(self, request_id: str) -> bool:
        """Whether the request has a sequence that has not finished."""
        return request_id in self.scheduler.requests

    def stats(self) -> EngineStats:
        """The engine's counters now (engine thread only)."""
        usage, sched, sessions = self.kv_usage(), self.scheduler, self.sessions
        return EngineStats(
            kv_blocks_total=usage["total"], kv_blocks_used=usage["used"], kv_blocks_cached=usage["cached"],
            kv_block_bytes=self.plan.bytes_per_block,
            num_running=len(sched.running), num_waiting=len(sched.waiting), num_preemptions=sched.num_preemptions,
            sessions_active=len(sessions), session_blocks_pinned=sessions.num_pinned_blocks,
            session_evictions=sessions.num_evictions, session_restores_recompute=sessions.num_recomputes,
            session_restores_disk=sessions.num_disk_restores, session_restores_memory=sessions.num_memory_restores,
            session_offloads=sessions.num_offloads,
            **self._speculation_stats(),
        )

    def _speculation_stats(self) -> dict[str, int]:
        spec = self.scheduler.speculator
        if spec is None:
            return {}
        return {"spec_draft_tokens": spec.stats.drafted, "spec_accepted_tokens": spec.stats.accepted,
                "spec_verifies": spec.stats.verifies}

    def memory_view(self, owner: str | None = None) -> dict:
        """Who holds which KV blocks now, for `owner` (engine thread; server/engine/memory_view.py)."""
        sched = self.scheduler
        view = memory_view(self.pool, self.sessions, len(sched.running), len(sched.waiting), owner)
        view["kv_cache"] = {"dtype": kv_dtype_name(self.plan.kv_dtype), "bytes_per_block": self.plan.bytes_per_block,
                            "bytes_total": self.plan.bytes_per_block * self.plan.num_blocks}
        return view

    def kv_usage(self) -> dict[str, int]:
        pool = self.pool
        return {
            "total": pool.num_total,
            "used": pool.num_used,
            "cached": pool.num_cached,
            "free": pool.num_free - pool.num_cached,
        }


def _weak_call(method) -> Callable[[], bool]:
    """`method` (a bound method) called through a weak reference: the scheduler holding
    `self._reclaim` itself made engine -> scheduler -> engine a cycle, so a dropped engine (its
    model and KV pool, GBs) waited for the cyclic collector instead of being freed at once; a
    test module that builds engines one after another grew from 5 to 18 GB."""
    ref = weakref.WeakMethod(method)
    return lambda: bool((ref() or (lambda: False))())

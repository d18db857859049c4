"""Rank 0 of a tensor-parallel engine: start or meet the followers, hand the engine its
group and runner class (server/engine/build.py builds the shard, KV plan and runner, as on
every rank), and watch the followers.

One machine: rank 0 hosts the store on 127.0.0.1 (a free port) and spawns ranks 1..N-1
(`torch.multiprocessing`, spawn). Several machines: with RANK=0 / WORLD_SIZE=N /
MASTER_ADDR / MASTER_PORT in the environment it hosts the store there and waits for
`workmem tp-worker` processes started with the same variables (server/engine/parallel/worker.py).

A follower is lost when its process exits (spawned ones), when it stops bumping its heartbeat
for `tp_heartbeat_timeout_s`, or when a collective fails (a closed connection, or no answer
within `tp_timeout_s`). Then the group is marked broken (every later collective raises
RankLostError at once), the spawned followers are killed, and `on_lost` callbacks run on
the monitor thread: they only signal (AsyncEngine posts the loss to its engine thread's
inbox, which stops serving; `workmem serve` drains and exits with status 3).

Start-up that fails on rank 0 after the group formed (`abandon`) publishes the reason in
the store, where every follower's heartbeat looks until rank 0 publishes START_OK: they exit
whatever step of their own start-up they are in, spawned or `workmem tp-worker`.
"""
from __future__ import annotations

import datetime
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from model.config import ModelConfig
from model.parallel import TPGroup, check_shardable, make_group
from server.engine.config import EngineConfig
from server.engine.runner import Runner, StepInputs
from server.engine.parallel.comm import (
    HEARTBEAT_INTERVAL_S, START_OK, START_SEEN_KEY, Rendezvous, backend_for, heartbeat_key, local_device, publish_config, publish_start,
    rendezvous_from_env, send_step, send_stop, set_rank_threads,
)
from server.engine.parallel.worker import spawned_follower

log = logging.getLogger("workmem.tp")
MONITOR_INTERVAL_S = 0.25  # how often rank 0 looks at its followers
STOP_JOIN_S = 10.0  # a stopped follower gets this long to exit before it is killed
ABANDON_WAIT_S = 4 * HEARTBEAT_INTERVAL_S  # after a failed start, how long followers get to read why


class TPRunner(Runner):
    """Rank 0's runner: broadcasts each step, runs its shard, gathers the vocab-parallel
    logits [S, vocab / N] of all ranks into [S, vocab] for the sampler."""

    def __init__(self, *args, group: TPGroup, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def forward(self, step: StepInputs) -> torch.Tensor | None:
        send_step(self.group, step, self.device)
        logits = super().forward(step)
        return None if logits is None else self.group.gather_last_dim(logits)


class TensorParallel:
    """Rank 0's handle on the group; see module doc. `start` blocks until all ranks joined."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.world = config.tensor_parallel_size
        self.timeout = datetime.timedelta(seconds=config.tp_timeout_s)
        self.procs: dict[int, mp.process.BaseProcess] = {}
        self.on_lost: list[Callable[[str], None]] = []
        self._stopping = threading.Event()
        set_rank_threads(config, device)
        if device.type == "cuda":
            local_device("cuda", 0)  # LOCAL_RANK's GPU, else the first
        if Path(config.model).is_dir():  # a GGUF's shapes are checked once loaded (shard_model)
            check_shardable(ModelConfig.from_hf(config.model), self.world)
        rdv = self._rendezvous()
        self.store = dist.TCPStore(rdv.addr, rdv.port, self.world, True, self.timeout, wait_for_workers=False)
        publish_config(self.store, config, device)
        try:
            if rdv.port == 0:  # one machine: the followers are ours
                if device.type == "cuda" and torch.cuda.device_count() < self.world:
                    raise ValueError(f"tensor_parallel_size {self.world} needs {self.world} GPUs on this machine "
                                     f"(NCCL runs one rank per GPU); {torch.cuda.device_count()} visible")
                self._spawn(self.store.port)
            self.group = self._join()
        except BaseException as exc:  # followers that came to the store leave it
            self._tell_failed_start(f"rank 0 failed to start: {type(exc).__name__}: {exc}")
            self._kill_followers()
            raise
        self._monitor = threading.Thread(target=self._watch, name="workmem-tp-monitor", daemon=True)
        self._monitor.start()
        log.info("tensor parallel: %d ranks over %s", self.world, backend_for(device))

    def _rendezvous(self) -> Rendezvous:
        rdv = rendezvous_from_env()
        if rdv is None:
            return Rendezvous(0, self.world, "127.0.0.1", 0)
        if rdv.rank != 0 or rdv.world != self.world:
            raise ValueError(f"workmem serve is rank 0 of tensor_parallel_size {self.world} ranks; the "
                             f"environment says RANK={rdv.rank} WORLD_SIZE={rdv.world}")
        return rdv

    def _spawn(self, port: int) -> None:
        ctx = mp.get_context("spawn")
        for rank in range(1, self.world):
            proc = ctx.Process(target=spawned_follower, name=f"workmem-tp-rank{rank}", daemon=True,
                               args=(rank, self.world, "127.0.0.1", port, logging.getLogger().level))
            proc.start()
            self.procs[rank] = proc

    def _join(self) -> TPGroup:
        """The process group, once every rank is in (fails early if a spawned one died)."""
        result: dict[str, object] = {}
        thread = threading.Thread(target=lambda: result.update(group=self._make_group()), daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(MONITOR_INTERVAL_S)
            dead = self._dead_follower()
            if dead:
                self._kill_followers()
                raise RuntimeError(f"tensor parallel start-up failed: {dead}")
        if "group" not in result:
            self._kill_followers()
            raise RuntimeError(f"tensor parallel start-up failed: ranks did not join within {self.timeout}")
        return result["group"]  # type: ignore[return-value]

    def _make_group(self) -> TPGroup:
        return make_group(self.store, 0, self.world, backend_for(self.device), self.timeout)

    # -- what the engine asks for -----------------------------------------------------
    def runner(self, model: nn.Module, local: ModelConfig, num_blocks: int, block_size: int,
               device: torch.device, dtype: torch.dtype, seed: int | None = None,
               kv_dtype: torch.dtype | None = None) -> TPRunner:
        """build_rank's runner class for rank 0 (`local`: this rank's share of the heads)."""
        return TPRunner(model, local, num_blocks, block_size, device, dtype, seed=seed, group=self.group,
                        kv_dtype=kv_dtype)

    def started(self) -> None:
        """Rank 0 is serving: the followers' heartbeats stop watching for a failed start."""
        publish_start(self.store, START_OK)

    def abandon(self, reason: str) -> None:
        """Rank 0 failed to start after the group did: whatever the followers are doing (loading,
        waiting in the KV plan's all-reduce or for their first step), they see `reason` in the
        store within a heartbeat and exit; the spawned ones are also killed here."""
        self._stopping.set()  # the monitor must not report the followers' exits as a lost rank
        self.group.lost = self.group.lost or reason
        self._tell_failed_start(reason)
        self._kill_followers()

    def _tell_failed_start(self, reason: str) -> None:
        """Publish a failed start and give the followers up to ABANDON_WAIT_S to read it (so
        each logs why it exits) before this store, which they heartbeat on, may go away."""
        try:
            publish_start(self.store, reason)
            deadline = time.monotonic() + ABANDON_WAIT_S
            while self.store.add(START_SEEN_KEY, 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(MONITOR_INTERVAL_S)
        except RuntimeError as exc:  # the store is ours: only a torn-down process gets here
            log.warning("tensor parallel: could not tell the followers to stop: %s", exc)

    # -- life and death ---------------------------------------------------------------
    @property
    def lost(self) -> str | None:
        return self.group.lost

    def stop(self, between_steps: bool = True) -> None:
        """Tell the followers to exit and reap the spawned ones. `between_steps` False: a step
        may still be running (its thread outlived a join), so no STOP is broadcast beside its
        collectives; the group is marked broken and the spawned followers are killed (a step
        still waiting on them fails with RankLostError)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if not between_steps:
            self.group.lost = self.group.lost or "stopped while a step was running"
        if self.group.lost is None:
            try:
                send_stop(self.group, self.device)
            except RuntimeError as exc:
                log.warning("tensor parallel stop: %s", exc)
            for rank, proc in self.procs.items():
                proc.join(STOP_JOIN_S)
                if proc.exitcode not in (0, None):  # told to stop, it should exit 0
                    log.warning("tensor parallel: rank %d exited with code %d after STOP", rank, proc.exitcode)
        self._kill_followers()
        if self._monitor is not threading.current_thread():
            # its TCPStore client must be gone before the interpreter exits: a store torn down
            # under a still-waiting monitor aborted serve at exit ("terminate called without an
            # active exception", seen under load in tests/test_tensor_parallel.py)
            self._monitor.join(STOP_JOIN_S)

    def _dead_follower(self) -> str | None:
        for rank, proc in self.procs.items():
            if proc.exitcode is not None:
                return f"rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
        return None

    def _kill_followers(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_JOIN_S)

    def _watch(self) -> None:
        """Monitor thread: process exits, heartbeats, and failed collectives."""
        client = dist.TCPStore(self.store.host, self.store.port, self.world, False, self.timeout)
        seen = {rank: (-1, time.monotonic()) for rank in range(1, self.world)}
        while not self._stopping.wait(MONITOR_INTERVAL_S):
            reason = self.group.lost or self._dead_follower() or self._silent(client, seen)
            if reason and not self._stopping.is_set():
                self._lose(reason)
                return

    def _silent(self, client: dist.Store, seen: dict[int, tuple[int, float]]) -> str | None:
        now = time.monotonic()
        for rank, (count, since) in seen.items():
            current = client.add(heartbeat_key(rank), 0)
            if current != count:
                seen[rank] = (current, now)
            elif now - since > self.config.tp_heartbeat_timeout_s:
                return f"rank {rank} sent no heartbeat for {now - since:.1f} s"
        return None

    def _lose(self, reason: str) -> None:
        self.group.lost = self.group.lost or reason
        log.error("tensor parallel: %s; the engine cannot go on", reason)
        self._kill_followers()  # any collective still waiting on them fails now
        for callback in self.on_lost:
            callback(reason)

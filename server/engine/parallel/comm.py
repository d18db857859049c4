"""What the ranks of a tensor-parallel engine share: the rendezvous store, heartbeats, the
per-rank model and KV plan, and the step broadcast.

Every step rank 0 broadcasts a header `[kind, T, num_seqs, num_copies, num_rows,
table_len, 0, 0]` (int64) and then one int64 payload

    input_ids[T] positions[T] slot_mapping[T] num_new[n] context_len[n] table_lens[n]
    block_tables[table_len] copies[2 * num_copies] rows[num_rows]

from which each follower rebuilds the `StepInputs` (and so the same attention metadata) and
runs its shard; `kind` STOP ends the followers' loop. Block ids are the same on every rank:
each rank's KV pool holds its kv heads of the same blocks.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import threading
from typing import NamedTuple

import torch
import torch.distributed as dist

from model.attention import SeqAttention
from model.config import ModelConfig
from model.parallel import TPGroup, local_config
from server.engine.config import EngineConfig, KVCachePlan, plan_kv_cache
from server.engine.runner import StepInputs

log = logging.getLogger("workmem.tp")

STOP, STEP = 0, 1
HEADER_LEN = 8
HEARTBEAT_INTERVAL_S = 0.5  # followers bump their counter in the store this often
FOLLOWER_IDLE_TIMEOUT = datetime.timedelta(days=365)  # a follower waits this long for the next step
CONFIG_KEY = "workmem/config"
DEVICE_KEY = "workmem/device"
START_KEY = "workmem/start"  # rank 0's start-up outcome: START_OK, or why it failed
START_OK = "ok"
START_SEEN_KEY = "workmem/start-seen"  # followers that read a failed start (and are exiting)


def set_rank_threads(config: EngineConfig, device: torch.device) -> None:
    """CPU ranks share the machine's cores: without --threads each takes cores / N torch
    threads (N ranks with all cores each oversubscribe them, ~10x slower steps here)."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    elif device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))


def heartbeat_key(rank: int) -> str:
    return f"workmem/heartbeat/{rank}"


class Rendezvous(NamedTuple):
    """Where the ranks meet: rank 0 hosts a TCPStore at addr:port."""

    rank: int
    world: int
    addr: str
    port: int


def rendezvous_from_env() -> Rendezvous | None:
    """torchrun-style RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, or None if unset."""
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not (torchrun-style rendezvous)")
    return Rendezvous(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                      os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device_type: str, rank: int) -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK, else rank modulo the GPUs), or the CPU."""
    if device_type != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("rank 0 runs on CUDA but this rank has no GPU")
    index = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class Heartbeat(NamedTuple):
    """A follower's running heartbeat; `stop` ends it before the follower exits (its store
    client then goes away on its own thread, not under a still-waiting call at exit)."""
    thread: threading.Thread
    stopping: threading.Event

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(HEARTBEAT_INTERVAL_S * 4)


def start_heartbeat(rdv: Rendezvous, timeout: datetime.timedelta) -> Heartbeat:
    """A daemon thread bumping this follower's counter; it ends the process when the store
    (hosted by rank 0) is gone, so a follower never outlives rank 0, and when rank 0
    publishes a failed start (the follower may be anywhere in its own start-up then).
    After `Heartbeat.stop` (the follower got STOP) a store that goes away is no failure."""
    store = dist.TCPStore(rdv.addr, rdv.port, rdv.world, False, timeout)
    stopping = threading.Event()

    def beat() -> None:
        started = False
        try:
            while not stopping.wait(HEARTBEAT_INTERVAL_S):
                store.add(heartbeat_key(rdv.rank), 1)
                if not started and store.check([START_KEY]):
                    outcome = store.get(START_KEY).decode()
                    if outcome != START_OK:
                        log.error("rank %d: %s; exiting", rdv.rank, outcome)
                        store.add(START_SEEN_KEY, 1)
                        os._exit(1)
                    started = True
        except Exception as exc:  # noqa: BLE001 - rank 0 is gone: nothing left to serve
            if stopping.is_set():
                return  # told to stop: rank 0 may close its store as soon as it has STOP sent
            log.error("rank %d: lost rank 0's store (%s); exiting", rdv.rank, exc)
            os._exit(1)

    thread = threading.Thread(target=beat, name=f"workmem-heartbeat-{rdv.rank}", daemon=True)
    thread.start()
    return Heartbeat(thread, stopping)


def publish_config(store: dist.Store, config: EngineConfig, device: torch.device) -> None:
    store.set(CONFIG_KEY, pickle.dumps(config))
    store.set(DEVICE_KEY, device.type)


def publish_start(store: dist.Store, outcome: str) -> None:
    store.set(START_KEY, outcome)


def read_config(store: dist.Store) -> tuple[EngineConfig, str]:
    """What rank 0 published (waits for it): the engine config and the device type."""
    return pickle.loads(store.get(CONFIG_KEY)), store.get(DEVICE_KEY).decode()


def plan_shard(config: EngineConfig, model: ModelConfig, group: TPGroup, dtype: torch.dtype,
               device: torch.device, auto_kv: torch.dtype | None = None) -> KVCachePlan:
    """The KV plan of one rank (its kv heads; memory limits are per rank), with the number
    of blocks agreed on by all ranks (the smallest), so block ids mean the same everywhere."""
    plan = plan_kv_cache(config, local_config(model, group.world), dtype, device, auto_kv)
    count = torch.tensor([plan.num_blocks], dtype=torch.int64, device=device)
    num_blocks = int(group.all_reduce(count, dist.ReduceOp.MIN).item())
    return plan._replace(num_blocks=num_blocks)


def send_step(group: TPGroup, step: StepInputs, device: torch.device) -> None:
    """Rank 0: broadcast `step` (see module doc)."""
    n = len(step.seq_attn)
    tables = [s.block_table for s in step.seq_attn]
    table_len = sum(len(t) for t in tables)
    header = torch.tensor([STEP, len(step.input_ids), n, len(step.copies), len(step.rows), table_len, 0, 0],
                          dtype=torch.int64)
    meta = torch.tensor([[s.num_new for s in step.seq_attn], [s.context_len for s in step.seq_attn],
                         [len(t) for t in tables]], dtype=torch.int64).flatten()
    copies = torch.tensor(step.copies, dtype=torch.int64).flatten()
    payload = torch.cat([step.input_ids, step.positions, step.slot_mapping, meta, *tables, copies, step.rows])
    group.broadcast(header.to(device))
    group.broadcast(payload.to(device))


def send_stop(group: TPGroup, device: torch.device) -> None:
    group.broadcast(torch.tensor([STOP] + [0] * (HEADER_LEN - 1), dtype=torch.int64, device=device))


def recv_step(group: TPGroup, device: torch.device) -> StepInputs | None:
    """Followers: the next step from rank 0, or None at STOP."""
    header = group.broadcast(torch.zeros(HEADER_LEN, dtype=torch.int64, device=device), FOLLOWER_IDLE_TIMEOUT)
    kind, t, n, num_copies, num_rows, table_len = header[:6].tolist()
    if kind == STOP:
        return None
    payload = torch.empty(3 * t + 3 * n + table_len + 2 * num_copies + num_rows, dtype=torch.int64, device=device)
    parts = group.broadcast(payload).cpu().split([t, t, t, n, n, n, table_len, 2 * num_copies, num_rows])
    ids, positions, slots, num_new, ctx, lens, tables, copies, rows = parts
    seq_attn = [SeqAttention(a, b, table) for a, b, table in
                zip(num_new.tolist(), ctx.tolist(), tables.split(lens.tolist()))]
    pairs = [tuple(p) for p in copies.view(-1, 2).tolist()]
    return StepInputs(pairs, ids, positions, slots, seq_attn, rows)

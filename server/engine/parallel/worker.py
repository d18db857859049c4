"""A tensor-parallel follower (ranks 1..N-1): join rank 0's store, read its engine config,
build this rank's model shard, KV pool and runner (server/engine/build.py, as rank 0 does),
then run each step rank 0 broadcasts until STOP.
No scheduler, sampler or HTTP here: the follower's logits go to rank 0, which samples.

Started by rank 0 itself on one machine (`run_follower` in a spawned process), or, across
machines, as `workmem tp-worker` (= `python -m server.engine.parallel.worker`) with torchrun-style
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (and LOCAL_RANK for its GPU) in the environment.
"""
from __future__ import annotations

import datetime
import logging
import sys

from model.parallel import make_group
from server.engine.build import build_rank
from server.engine.config import resolve_dtype
from server.engine.parallel.comm import (
    FOLLOWER_IDLE_TIMEOUT, Rendezvous, backend_for, local_device, read_config, recv_step, rendezvous_from_env,
    set_rank_threads, start_heartbeat,
)

log = logging.getLogger("workmem.tp")
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)  # a follower waits this long for rank 0's store


def run_follower(rdv: Rendezvous) -> None:
    """The whole life of follower `rdv.rank`; returns at STOP, raises if the group breaks."""
    import torch.distributed as dist

    store = dist.TCPStore(rdv.addr, rdv.port, rdv.world, False, RENDEZVOUS_TIMEOUT)
    config, device_type = read_config(store)
    if config.tensor_parallel_size != rdv.world:
        raise ValueError(f"WORLD_SIZE {rdv.world} but rank 0 runs tensor_parallel_size {config.tensor_parallel_size}")
    timeout = datetime.timedelta(seconds=config.tp_timeout_s)
    heartbeat = start_heartbeat(rdv, timeout)
    device = local_device(device_type, rdv.rank)
    set_rank_threads(config, device)
    group = make_group(store, rdv.rank, rdv.world, backend_for(device), timeout, FOLLOWER_IDLE_TIMEOUT)
    parts = build_rank(config, device, resolve_dtype(config.dtype, device), group=group)
    runner = parts.runner
    log.info("rank %d/%d ready: %d KV blocks on %s", rdv.rank, rdv.world, parts.plan.num_blocks, device)
    while (step := recv_step(group, device)) is not None:
        logits = runner.forward(step)
        if logits is not None:
            group.gather_last_dim(logits)
    # STOP: end the heartbeat before rank 0 closes its store (on a failure the heartbeat stays
    # on: it is what reports rank 0's failed start, and the process exits 1 anyway)
    heartbeat.stop()
    log.info("rank %d stopped", rdv.rank)


def spawned_follower(rank: int, world: int, addr: str, port: int, log_level: int) -> None:
    """Target of rank 0's spawned processes: exit status 0 at STOP, 1 on any failure."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s %(message)s")
    try:
        run_follower(Rendezvous(rank, world, addr, port))
    except BaseException:  # reported, then a non-zero exit rank 0 notices
        log.exception("tensor-parallel rank %d failed", rank)
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    """`workmem tp-worker`: one follower rank from the environment's rendezvous."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    rdv = rendezvous_from_env()
    if rdv is None or rdv.rank == 0:
        print("workmem tp-worker: set RANK (1..WORLD_SIZE-1), WORLD_SIZE, MASTER_ADDR and MASTER_PORT; "
              "rank 0 is `workmem serve --tensor-parallel-size WORLD_SIZE` with the same variables", file=sys.stderr)
        return 2
    try:
        run_follower(rdv)
    except Exception:  # reported; a non-zero exit
        log.exception("tensor-parallel rank %d failed", rdv.rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

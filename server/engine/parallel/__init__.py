"""Tensor parallelism of the engine (README "Tensor parallelism"): N ranks each hold 1/N
of the model (model/parallel.py shards it); rank 0 schedules and samples, the followers
run each step it broadcasts.

    launch.py   rank 0's side: TensorParallel starts or meets the followers, watches them
                (process exits, heartbeats, failed collectives), stops or abandons them;
                TPRunner broadcasts each step and gathers the logits
    comm.py     what the ranks share: rendezvous, heartbeats and the start-up outcome in the
                store, the per-rank KV plan, the step broadcast and STOP
    worker.py   a follower's whole life (`workmem tp-worker`, or spawned by rank 0)

Doors for the rest of the engine: `TensorParallel` (LLMEngine builds it when
tensor_parallel_size > 1 and uses its `group`, `runner`, `started`, `abandon`, `stop`,
`lost`, `on_lost`) and `plan_shard` (server/engine/build.py, for every rank's KV plan).
"""

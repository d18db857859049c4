"""KV offload for idle sessions: their blocks' contents leave the pool and come back into
freshly allocated blocks at the next turn, much faster than recomputing. `KVSwapper` keeps
them on disk (`--session-dir`); `HostKVSwapper` keeps them in host memory (CUDA only:
on CPU the pool already is host memory).

File `{session_id}.kv.pt`: a format version, the block size, the pool's dtype name, the
blocks' content hashes and their K/V `[num_layers, 2, n, block_size, num_kv_heads, row]`
(row = head_dim, or head_dim + 2 bytes for int8: model/kv_quant.py), with a SHA-256 of the
tensor bytes. Version 1 files (no dtype field) are refused, never guessed at. KV is a cache: a file that is missing, corrupt or from another model
shape just means the tokens are recomputed.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from model.kv_quant import kv_dtype_name

log = logging.getLogger("workmem.offload")
KV_FORMAT_VERSION = 3  # 3: int8 rows of format 2 (model/kv_quant.py); 2: "kv_dtype" recorded; older are refused
KV_SUFFIX = ".kv.pt"


@dataclass
class OffloadedKV:
    """Where an idle session's KV went (a file, or host memory when `path` is None)."""

    path: Path | None
    block_hashes: list[int]


class KVSwap(Protocol):
    """Where idle sessions' KV goes and comes back from; `KVSwapper` (disk) and
    `HostKVSwapper` (host memory) implement it, the session table uses only this."""

    def save(self, session_id: str, blocks: list[int], block_hashes: list[int]) -> OffloadedKV: ...

    def read(self, offloaded: OffloadedKV, session_id: str = "") -> "SavedKV | None": ...

    def discard(self, session_id: str) -> None: ...

    def find(self, session_id: str) -> OffloadedKV | None: ...


class KVSwapper:
    """Copies blocks of the engine's KV cache to files and back (a KVSwap)."""

    def __init__(self, kv_cache: torch.Tensor, block_size: int, directory: str | Path) -> None:
        self.kv_cache = kv_cache  # [num_layers, 2, num_blocks, block_size, kvH, d]
        self.block_size = block_size
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}{KV_SUFFIX}"

    def save(self, session_id: str, blocks: list[int], block_hashes: list[int]) -> OffloadedKV:
        index = torch.tensor(blocks, dtype=torch.int64, device=self.kv_cache.device)
        data = self.kv_cache.index_select(2, index).cpu().contiguous()
        record = {"format_version": KV_FORMAT_VERSION, "block_size": self.block_size,
                  "kv_dtype": kv_dtype_name(self.kv_cache.dtype),
                  "block_hashes": list(block_hashes), "kv": data, "sha256": _digest(data)}
        path = self.path(session_id)
        tmp = path.with_suffix(".tmp")
        torch.save(record, tmp)
        os.replace(tmp, path)
        return OffloadedKV(path, list(block_hashes))

    def read(self, offloaded: OffloadedKV, session_id: str = "") -> "SavedKV | None":
        """The saved blocks, validated against this engine; None if unusable (recompute)."""
        try:
            record = torch.load(offloaded.path, map_location="cpu", weights_only=True)
            data = record["kv"]
            ok = (record["format_version"] == KV_FORMAT_VERSION and record["block_size"] == self.block_size
                  and record["kv_dtype"] == kv_dtype_name(self.kv_cache.dtype)
                  and data.dtype == self.kv_cache.dtype and data.shape[:2] == self.kv_cache.shape[:2]
                  and data.shape[3:] == self.kv_cache.shape[3:]
                  and data.shape[2] == len(record["block_hashes"]) and record["sha256"] == _digest(data))
        except Exception as exc:  # a cache file: unusable means recompute
            log.warning("session KV file %s unusable (%s); recomputing", offloaded.path.name, exc)
            return None
        if not ok:
            log.warning("session KV file %s does not match this engine; recomputing", offloaded.path.name)
            return None
        return SavedKV([int(h) for h in record["block_hashes"]], data)

    def write_blocks(self, saved: "SavedKV", first: int, blocks: list[int]) -> None:
        _write_blocks(self.kv_cache, saved, first, blocks)

    def discard(self, session_id: str) -> None:
        self.path(session_id).unlink(missing_ok=True)

    def find(self, session_id: str) -> OffloadedKV | None:
        """An offload file left by an earlier run, if any (validated when read)."""
        path = self.path(session_id)
        return OffloadedKV(path, []) if path.exists() else None


@dataclass
class SavedKV:
    block_hashes: list[int]
    kv: torch.Tensor  # [num_layers, 2, n, block_size, kvH, d] on the CPU


class HostKVSwapper:
    """A KVSwap keeping offloaded blocks in (pinned) host memory."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache
        self.saved: dict[str, SavedKV] = {}

    def save(self, session_id: str, blocks: list[int], block_hashes: list[int]) -> OffloadedKV:
        index = torch.tensor(blocks, dtype=torch.int64, device=self.kv_cache.device)
        data = self.kv_cache.index_select(2, index).to("cpu")
        if data.device != self.kv_cache.device and torch.cuda.is_available():
            data = data.pin_memory()
        self.saved[session_id] = SavedKV(list(block_hashes), data)
        return OffloadedKV(None, list(block_hashes))

    def read(self, offloaded: OffloadedKV, session_id: str = "") -> SavedKV | None:
        return self.saved.get(session_id)

    def write_blocks(self, saved: SavedKV, first: int, blocks: list[int]) -> None:
        _write_blocks(self.kv_cache, saved, first, blocks)

    def discard(self, session_id: str) -> None:
        self.saved.pop(session_id, None)

    def find(self, session_id: str) -> OffloadedKV | None:
        return None  # host memory does not survive a restart


def _write_blocks(kv_cache: torch.Tensor, saved: SavedKV, first: int, blocks: list[int]) -> None:
    """Copy saved blocks `first : first + len(blocks)` into `kv_cache` at `blocks`."""
    if not blocks:
        return
    index = torch.tensor(blocks, dtype=torch.int64, device=kv_cache.device)
    kv_cache.index_copy_(2, index, saved.kv[:, :, first : first + len(blocks)].to(kv_cache.device))


def _digest(data: torch.Tensor) -> str:
    raw = data.view(torch.uint8) if data.dtype != torch.uint8 else data
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()

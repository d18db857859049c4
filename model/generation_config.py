"""A model's own sampling recommendations: `generation_config.json` beside a Hugging Face
checkpoint, or a GGUF file's `general.sampling.*` metadata (llama.cpp's keys).

Only the fields vLLM reads are taken (temperature, top_p, top_k, min_p,
repetition_penalty), and only those the file states: a value absent from the file is
absent from the result, so the caller's next source of defaults fills it.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
GGUF_SAMPLING_KEYS = {  # GGUF metadata key -> field
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def read_generation_config(model: str | Path) -> tuple[dict[str, float], str]:
    """(fields the model's files recommend, where they were read). `model` is a checkpoint
    directory (or a directory holding only a generation_config.json) or a .gguf file;
    ({}, "") when it states none. ValueError for a file that is not valid."""
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        found = _from_gguf(path)
        return found, str(path) if found else ""
    config = path / "generation_config.json"
    if not config.is_file():
        return {}, ""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config}: expected a JSON object")
    found = {k: _number(data[k], f"{config}: {k}") for k in SAMPLING_FIELDS if data.get(k) is not None}
    if found.get("top_k") == 0:  # Hugging Face's "no top-k"
        found["top_k"] = -1
    return found, str(config) if found else ""


def _from_gguf(path: Path) -> dict[str, float]:
    """The sampling keys of a GGUF's key/value header, read without parsing the rest (the
    gguf package's reader takes seconds on a 49k-token vocabulary; this walks it in ms)."""
    with open(path, "rb") as f:
        head = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if head[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        (num_kv,) = struct.unpack_from("<Q", head, 16)  # magic, u32 version, u64 tensors, u64 kvs
        offset, found = 24, {}
        for _ in range(num_kv):
            key, offset = _gguf_string(head, offset)
            (kind,) = struct.unpack_from("<I", head, offset)
            value, offset = _gguf_value(head, offset + 4, kind)
            if key in GGUF_SAMPLING_KEYS:
                found[GGUF_SAMPLING_KEYS[key]] = _number(value, f"{path}: {key}")
        return found
    except struct.error:
        raise ValueError(f"{path}: truncated GGUF metadata") from None
    finally:
        head.close()


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def _gguf_string(buf, offset: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, offset)
    return bytes(buf[offset + 8: offset + 8 + n]).decode("utf-8", "replace"), offset + 8 + n


def _gguf_value(buf, offset: int, kind: int):
    """(value, offset after it); arrays are skipped (None): no sampling key is one."""
    if kind in _GGUF_SCALARS:
        fmt = "<" + _GGUF_SCALARS[kind]
        return struct.unpack_from(fmt, buf, offset)[0], offset + struct.calcsize(fmt)
    if kind == GGUF_STRING:
        return _gguf_string(buf, offset)
    if kind != GGUF_ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    inner, count = struct.unpack_from("<IQ", buf, offset)
    offset += 12
    if inner in _GGUF_SCALARS:
        return None, offset + count * struct.calcsize("<" + _GGUF_SCALARS[inner])
    for _ in range(count):
        _, offset = _gguf_value(buf, offset, inner)
    return None, offset


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return int(value) if isinstance(value, int) else float(value)

"""Shared fixtures: tiny random checkpoints built offline with transformers."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.checkpoints import ARCHS, build_checkpoint  # noqa: E402
from tests.encdec_checkpoints import build_bart, build_t5  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_root):
    """tiny_checkpoint(arch) -> directory with config.json, model.safetensors, tokenizer.json."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_checkpoint(arch, checkpoint_root / arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def encdec_checkpoint(checkpoint_root):
    """encdec_checkpoint(kind) -> a tiny random encoder-decoder (tests/encdec_checkpoints.py):
    kind bart, t5-v1.0 or t5-v1.1."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            path = checkpoint_root / kind
            built[kind] = build_bart(path) if kind == "bart" else build_t5(path, kind.removeprefix("t5-"))
        return built[kind]

    return get


@pytest.fixture(scope="session")
def bart_checkpoint(encdec_checkpoint) -> Path:
    """The tiny random BART with its tokenizer."""
    return encdec_checkpoint("bart")


__all__ = ["ARCHS"]

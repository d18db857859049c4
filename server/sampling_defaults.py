"""The sampling values a request gets for the fields it leaves out.

Per field, the first that gives one wins:
  1. the server's flag (`--default-temperature` ...),
  2. with `--generation-config auto` (the default): the model's own files
     (generation_config.json, a GGUF's general.sampling.* metadata), then, for the embedded
     default model, its model card's values (server/default_model.py);
     with `--generation-config DIR`: DIR/generation_config.json;
     with `none` (or `vllm`, vLLM's name for it): nothing,
  3. OpenAI's defaults (temperature 1, top_p 1; no top-k, min-p or repetition penalty).
`/v1/models` reports the values in force and where each came from.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from model.generation_config import SAMPLING_FIELDS, read_generation_config
from model.sampling import SamplingParams

OPENAI_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
GENERATION_CONFIG_MODES = ("auto", "none", "vllm")  # or a directory holding a generation_config.json


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request's absent sampling fields become; `sources` names where each value
    not OpenAI's came from ("--default-temperature", a file path, "model card")."""

    temperature: float = OPENAI_SAMPLING["temperature"]
    top_p: float = OPENAI_SAMPLING["top_p"]
    top_k: int = int(OPENAI_SAMPLING["top_k"])
    min_p: float = OPENAI_SAMPLING["min_p"]
    repetition_penalty: float = OPENAI_SAMPLING["repetition_penalty"]
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def as_dict(self) -> dict:
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        return {**values, "sources": {name: self.sources.get(name, "openai") for name in SAMPLING_FIELDS}}

    def describe(self) -> str:
        """One line for the start-up log."""
        parts = [f"{n}={getattr(self, n):g} ({self.sources.get(n, 'openai')})" for n in SAMPLING_FIELDS]
        return "sampling defaults: " + ", ".join(parts)


OPENAI_DEFAULTS = SamplingDefaults()


def resolve_sampling_defaults(model: str, mode: str = "auto", overrides: dict[str, float] | None = None,
                              card: dict[str, float] | None = None) -> SamplingDefaults:
    """Defaults for serving `model` (see the module doc). `card`: the model card's values,
    given only for the embedded default model. ValueError for an unreadable file or a
    directory without a generation_config.json."""
    layers: list[tuple[dict[str, float], str]] = []  # highest priority first
    layers.append(({k: v for k, v in (overrides or {}).items() if v is not None}, "flag"))
    if mode == "auto":
        layers.append(read_generation_config(model))
        layers.append((dict(card or {}), "model card"))
    elif mode not in GENERATION_CONFIG_MODES:
        found, where = read_generation_config(mode)
        if not (Path(mode) / "generation_config.json").is_file():
            raise ValueError(f"--generation-config {mode!r}: give auto, none, vllm or a directory holding "
                             "a generation_config.json")
        layers.append((found, where))
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    for found, where in layers:
        for name, value in found.items():
            if name in SAMPLING_FIELDS and name not in values:
                values[name] = value
                sources[name] = f"--default-{name.replace('_', '-')}" if where == "flag" else where
    if "top_k" in values:
        values["top_k"] = int(values["top_k"])
    defaults = SamplingDefaults(**values, sources=sources)
    try:  # the same rules a request's values meet
        SamplingParams(**{name: getattr(defaults, name) for name in SAMPLING_FIELDS})
    except ValueError as exc:
        raise ValueError(f"sampling defaults: {exc}") from None
    return defaults


def add_sampling_default_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generation-config", default="auto", metavar="auto|none|vllm|DIR",
                        help="where a request's absent sampling fields come from: auto = the model's "
                             "generation_config.json or GGUF sampling metadata (the embedded default model: "
                             "its model card's values), none/vllm = OpenAI's defaults, DIR = "
                             "DIR/generation_config.json (default auto)")
    for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("min_p", float),
                       ("repetition_penalty", float)):
        parser.add_argument(f"--default-{name.replace('_', '-')}", type=kind, default=None,
                            help=f"{name} of requests that give none (wins over --generation-config)")


def sampling_defaults_from_args(args: argparse.Namespace, model: str, is_default_model: bool) -> SamplingDefaults:
    from server.default_model import DEFAULT_MODEL_SAMPLING

    overrides = {name: getattr(args, f"default_{name}") for name in SAMPLING_FIELDS}
    return resolve_sampling_defaults(model, args.generation_config, overrides,
                                     DEFAULT_MODEL_SAMPLING if is_default_model else None)

"""What an encoder-decoder request must satisfy, and what its decoder KV depends on.

The prompt is the encoder's input (its length is `RequestLimits`' business). The decoder
starts from the config's `decoder_start_token_id`, so features that work on a decoder prompt
do not apply: scoring the prompt (`prompt_logprobs`) and sessions (a transcript that grows turn
by turn) are refused. A decoder block's content depends on the encoder's input too, so the
prefix-cache root of its chain includes a digest of that input.
"""
from __future__ import annotations

import hashlib
import struct

from model.sampling import SamplingParams
from server.engine.limits import RequestError


def check_encoder_request(prompt: list[int], params: SamplingParams, session_id: str | None) -> list[int]:
    """The encoder's input (a copy of `prompt`); RequestError for what the model cannot do."""
    if params.prompt_logprobs is not None:
        raise RequestError("prompt_logprobs is not available for encoder-decoder models (the prompt is "
                           "the encoder's input, not predicted)", "prompt_logprobs")
    if session_id is not None:
        raise RequestError("sessions are not available for encoder-decoder models", "session_id")
    return list(prompt)


def encoder_namespace(namespace: str, prompt: list[int]) -> str:
    """The KV namespace of a decoder whose cross-attention reads `prompt`'s encoding."""
    digest = hashlib.sha256(struct.pack(f"<{len(prompt)}I", *prompt)).hexdigest()
    return f"{namespace}|encoder={digest}"

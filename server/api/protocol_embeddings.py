"""Request body of POST /v1/embeddings (OpenAI's shape, plus vLLM's truncate_prompt_tokens)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from server.api.protocol import _Body

MAX_EMBEDDING_INPUTS = 2048  # inputs in one request, as OpenAI's API


class EmbeddingRequest(_Body):
    """`input`: a string, a list of strings, one token id list or a list of them."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # longer inputs keep their first N tokens (the tokenizer's closing special token kept); -1: the model's limit
    truncate_prompt_tokens: int | None = Field(None, ge=-1)

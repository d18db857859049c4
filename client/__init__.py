"""Thin HTTP client for a workmem server (speaks HTTP only; no torch, no server imports).

    from client import Client
    with Client("http://127.0.0.1:8000") as c:
        print(c.chat("What is 2+2?", max_tokens=16).text)
        for item in c.stream_chat([{"role": "user", "content": "Hi"}]):
            print(item, end="", flush=True) if isinstance(item, str) else print("\\n", item)
        s = c.create_session(system="Be brief.")  # history kept server-side
        print(s.send("Hi", max_tokens=16).text, s.id)
"""
from client.async_client import AsyncClient
from client.client import Client
from client.core import Completion, SSEDecoder, StreamParser, Usage
from client.errors import (
    APIConnectionError, APITimeoutError, AuthenticationError, BadRequestError, ConflictError,
    NotFoundError, PayloadTooLargeError, RateLimitError, ServerError, ServiceUnavailableError,
    WorkmemError,
)
from client.sessions import AsyncSession, Session

__all__ = [
    "APIConnectionError", "APITimeoutError", "AsyncClient", "AsyncSession", "AuthenticationError",
    "BadRequestError", "Client", "Completion", "ConflictError", "NotFoundError", "PayloadTooLargeError",
    "RateLimitError", "SSEDecoder", "ServerError", "ServiceUnavailableError", "Session", "StreamParser",
    "Usage", "WorkmemError",
]

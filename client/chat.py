"""Interactive terminal chat (`workmem chat`): one user turn per input line, the reply
streamed to stdout as it arrives. History is kept client-side and resent every turn.

Commands: `/exit` (or EOF) quits, `/reset` clears the history (the system prompt stays).
With a TTY on stdin it prompts with `> `; with piped stdin it reads each line as one
turn, prints only the replies (one per line), and stops with status 1 at the first error.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from client.client import Client, Messages
from client.errors import WorkmemError

PROMPT = "> "
EXIT, RESET = "/exit", "/reset"
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def run_chat(
    base_url: str, api_key: str | None = None, model: str | None = None, system: str | None = None,
    temperature: float | None = None, max_tokens: int | None = None,
    stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
) -> int:
    """Chat until /exit or EOF; returns the process exit status."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = _isatty(stdin)
    params = {k: v for k, v in (("temperature", temperature), ("max_tokens", max_tokens)) if v is not None}
    base: Messages = [{"role": "system", "content": system}] if system else []
    history = list(base)
    with Client(base_url, api_key=api_key, model=model) as client:
        if interactive:
            stdout.write(f"workmem chat — {RESET} clears history, {EXIT} or Ctrl-D quits\n")
        while True:
            try:
                line = _read_line(stdin, stdout, interactive)
            except KeyboardInterrupt:
                stdout.write("\n")
                return EXIT_INTERRUPTED
            if line is None or line.strip() == EXIT:
                return 0
            if line.strip() == RESET:
                history = list(base)
                if interactive:
                    stdout.write("(history cleared)\n")
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            try:
                reply = _stream_reply(client, history, params, stdout)
            except (WorkmemError, KeyboardInterrupt) as exc:
                history.pop()  # a failed or interrupted turn is forgotten
                if isinstance(exc, WorkmemError):
                    stderr.write(f"error: {exc}\n")
                    stderr.flush()
                if not interactive:
                    return EXIT_ERROR if isinstance(exc, WorkmemError) else EXIT_INTERRUPTED
                continue
            history.append({"role": "assistant", "content": reply})


def _stream_reply(client: Client, history: Messages, params: dict[str, Any], stdout: TextIO) -> str:
    """Writes each delta as it arrives (flushed); returns the whole reply."""
    parts: list[str] = []
    stream = client.stream_chat(history, **params)
    try:
        for item in stream:
            if isinstance(item, str):
                stdout.write(item)
                stdout.flush()
                parts.append(item)
    except BaseException:
        if parts:  # end the partial reply's line
            stdout.write("\n")
        raise
    finally:
        stream.close()  # on Ctrl-C this closes the connection, so the server aborts
    stdout.write("\n")
    stdout.flush()
    return "".join(parts)


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    """One input line without its newline; None at EOF."""
    if interactive and stdin is sys.stdin and stdout is sys.stdout:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            return input(PROMPT)
        except EOFError:
            stdout.write("\n")
            return None
    if interactive:
        stdout.write(PROMPT)
        stdout.flush()
    line = stdin.readline()
    return line.rstrip("\r\n") if line else None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

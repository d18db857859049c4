"""Interactive terminal chat (`workmem chat`): one user turn per input line, the reply
streamed to stdout as it arrives.

The conversation lives in a server-side session: a new one (holding the system prompt)
unless `session_id` resumes an existing one. Its id is printed to stderr at the start,
so `workmem chat --session ID` can resume it later; each turn sends only its new line.
A server without sessions (404 on POST /v1/sessions) gets the whole history instead,
kept client-side and resent every turn.

Commands: `/exit` (or EOF) quits, `/reset` starts over: a fresh session with the system
prompt (or, client-side, clears the history but the system prompt). With a TTY on stdin
it prompts with `> `; with piped stdin it reads each line as one turn, prints only the
replies (one per line), and stops with status 1 at the first error.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator, Protocol, TextIO

from client.client import Client
from client.core import Messages, Usage
from client.errors import NotFoundError, WorkmemError
from client.sessions import Session

PROMPT = "> "
EXIT, RESET = "/exit", "/reset"
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


class Conversation(Protocol):
    def turn(self, text: str, params: dict[str, Any]) -> Iterator[str | Usage]: ...
    def commit(self, text: str, reply: str) -> None: ...
    def reset(self) -> None: ...


class ServerConversation:
    """History kept by the server: each turn sends only the new user message."""

    def __init__(self, client: Client, session: Session, system: str | None, stderr: TextIO) -> None:
        self.client, self.session, self.system, self.stderr = client, session, system, stderr

    def turn(self, text: str, params: dict[str, Any]) -> Iterator[str | Usage]:
        return self.session.send(text, stream=True, **params)

    def commit(self, text: str, reply: str) -> None:
        pass  # the server appended the turn; a failed or aborted turn leaves it unchanged

    def reset(self) -> None:
        self.session = self.client.create_session(system=self.system)
        announce(self.stderr, self.session.id)


class LocalConversation:
    """History kept here and resent whole every turn (a server without sessions)."""

    def __init__(self, client: Client, system: str | None) -> None:
        self.client = client
        self.base: Messages = [{"role": "system", "content": system}] if system else []
        self.history = list(self.base)

    def turn(self, text: str, params: dict[str, Any]) -> Iterator[str | Usage]:
        return self.client.stream_chat([*self.history, {"role": "user", "content": text}], **params)

    def commit(self, text: str, reply: str) -> None:
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.history = list(self.base)


def announce(stderr: TextIO, session_id: str, resumed: bool = False) -> None:
    what = "resuming session" if resumed else "session"
    stderr.write(f"workmem: {what} {session_id} (resume with: workmem chat --session {session_id})\n")
    stderr.flush()


def open_conversation(client: Client, system: str | None, session_id: str | None, stderr: TextIO) -> Conversation:
    """Resume `session_id` (checked to exist), else a new session, else client-side history."""
    if session_id:
        session = client.session(session_id)
        session.info()  # NotFoundError now rather than at the first turn
        announce(stderr, session.id, resumed=True)
        return ServerConversation(client, session, system, stderr)
    try:
        session = client.create_session(system=system)
    except NotFoundError as exc:
        if exc.code == "model_not_found":
            raise
        stderr.write("workmem: the server has no sessions; history is kept client-side\n")
        return LocalConversation(client, system)
    announce(stderr, session.id)
    return ServerConversation(client, session, system, stderr)


def run_chat(
    base_url: str, api_key: str | None = None, model: str | None = None, system: str | None = None,
    temperature: float | None = None, max_tokens: int | None = None,
    stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
    session_id: str | None = None,
) -> int:
    """Chat until /exit or EOF; returns the process exit status."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = _isatty(stdin)
    params = {k: v for k, v in (("temperature", temperature), ("max_tokens", max_tokens)) if v is not None}
    with Client(base_url, api_key=api_key, model=model) as client:
        try:
            conversation = open_conversation(client, system, session_id, stderr)
        except WorkmemError as exc:
            _report(stderr, exc)
            return EXIT_ERROR
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        if interactive:
            stdout.write(f"workmem chat — {RESET} clears history, {EXIT} or Ctrl-D quits\n")
        return _loop(conversation, params, stdin, stdout, stderr, interactive)


def _loop(conversation: Conversation, params: dict[str, Any], stdin: TextIO, stdout: TextIO,
          stderr: TextIO, interactive: bool) -> int:
    while True:
        try:
            line = _read_line(stdin, stdout, interactive)
        except KeyboardInterrupt:
            stdout.write("\n")
            return EXIT_INTERRUPTED
        if line is None or line.strip() == EXIT:
            return 0
        try:
            if line.strip() == RESET:
                conversation.reset()
                if interactive:
                    stdout.write("(history cleared)\n")
            elif line.strip():
                reply = _stream_reply(conversation.turn(line, params), stdout)
                conversation.commit(line, reply)  # a failed or interrupted turn is forgotten
        except (WorkmemError, KeyboardInterrupt) as exc:
            if isinstance(exc, WorkmemError):
                _report(stderr, exc)
            if not interactive:
                return EXIT_ERROR if isinstance(exc, WorkmemError) else EXIT_INTERRUPTED


def _report(stderr: TextIO, exc: WorkmemError) -> None:
    stderr.write(f"error: {exc}\n")
    stderr.flush()


def _stream_reply(stream: Iterator[str | Usage], stdout: TextIO) -> str:
    """Writes each delta as it arrives (flushed); returns the whole reply."""
    parts: list[str] = []
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
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # on Ctrl-C this closes the connection, so the server aborts
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

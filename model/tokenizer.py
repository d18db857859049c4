"""Tokenizer: `tokenizer.json` + chat template (sandboxed jinja2) + streaming text helpers.

`Tokenizer.from_dir(dir)` reads a Hugging Face checkpoint's tokenizer files and behaves like
transformers 5's fast tokenizer for encode / decode / apply_chat_template (token-identical).
`clean_up_tokenization_spaces` is not applied: transformers 5 defaults it to False and ignores
it for BPE models. One deliberate difference: transformers 5 ignores `add_bos_token` from
tokenizer_config.json when tokenizer.json exists; we honour it when tokenizer.json's
post-processor does not add BOS itself (legacy Llama exports, as transformers 4 did).
`IncrementalDetokenizer` turns streamed ids into text deltas and `StopStringChecker` cuts
streamed text at stop strings; both do bounded work per call.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context for the first output token
MAX_HELD_TOKENS = 8  # tokens held back for an unfinished character before a forced split


class TemplateError(ValueError):
    """A chat template failed to compile or render (includes its own `raise_exception`)."""


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` plus chat template and special-token facts.

    `eos_token_ids` are the stop ids: the id of `eos_token` first, then the extra ids given
    (from generation_config.json / config.json in `from_dir`), deduplicated in order. BOS is
    added by `encode` when `add_bos_token` is set and the backend's post-processor does not
    already add it. The chat template is compiled once, on first use.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 add_bos_token: bool = False, eos_token_ids: Iterable[int] = ()) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id: int | None = backend.token_to_id(eos_token) if eos_token else None
        first = [] if self.eos_token_id is None else [self.eos_token_id]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*first, *map(int, eos_token_ids)]))
        # ids that decode(skip_special_tokens=True) drops
        added = backend.get_added_tokens_decoder()
        self.skipped_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        ends = {self.bos_token_id, self.eos_token_id} - {None}
        self.special_token_ids: frozenset[int] = self.skipped_ids | ends
        probe = backend.encode("a", add_special_tokens=True).ids
        self._post_adds_bos = bool(probe) and probe[0] == self.bos_token_id
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"tokenizer file not found: {tokenizer_file} (only tokenizer.json is supported)")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        backend.no_padding()  # a tokenizer.json may pad or cut every encoding (all-MiniLM's pads to 128):
        backend.no_truncation()  # lengths are the engine's and the API's business here
        cfg = _read_json(path / "tokenizer_config.json")
        bos, eos = _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token"))
        template = _pick_template(cfg.get("chat_template"))
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        stop_ids = [*_as_ids(_read_json(path / "generation_config.json").get("eos_token_id")),
                    *_as_ids(_read_json(path / "config.json").get("eos_token_id"))]
        return cls(backend, chat_template=template, bos_token=bos, eos_token=eos,
                   add_bos_token=bool(cfg.get("add_bos_token", False)), eos_token_ids=stop_ids)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token's spelling in characters: no token covers more text than this."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None and not self._post_adds_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` like transformers: `tools`/`documents` default to None, special
        tokens that are set are visible as `bos_token`/`eos_token`, kwargs override them."""
        template = self._compiled_template()
        pairs = (("bos_token", self.bos_token), ("eos_token", self.eos_token))
        specials = {k: v for k, v in pairs if v is not None}  # unset tokens stay undefined, as in transformers
        context = {"tools": None, "documents": None, **specials, **kwargs}
        try:
            return template.render(context, messages=messages, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """The chat prompt's tokens (the template already wrote BOS if it wants one).
        Special-token text inside a message stays plain text; see `render_chat`."""
        return self.encode_rendered(self.render_chat(messages, add_generation_prompt, **kwargs))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> RenderedChat:
        """The template's text, and where in it lie message contents that spell special
        tokens (`<|im_end|>` typed by a user): those spans are tokenized as plain text, so
        only the template's own markup becomes control tokens. Found by rendering once more
        with such contents replaced by unique markers; a template that does more to them
        than insert or trim them is refused (TemplateError)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        marked = [i for i, m in enumerate(messages) if self._spells_special(m.get("content"))]
        if not marked:
            return RenderedChat(text, ())
        probes = [dict(m) for m in messages]
        for k, i in enumerate(marked):
            probes[i]["content"] = f"{_MARK_OPEN}{k}{_MARK_CLOSE}"
        pieces = self.apply_chat_template(probes, add_generation_prompt=add_generation_prompt, **kwargs)
        for fit in (lambda c: c, str.strip):
            spans = _place_contents(pieces, [fit(messages[i]["content"]) for i in marked], text)
            if spans is not None:
                return RenderedChat(text, spans)
        raise TemplateError("a message spells special-token text and the chat template transforms message "
                            "content, so it cannot be kept as plain text")

    def encode_rendered(self, chat: RenderedChat, start: int = 0) -> list[int]:
        """Tokens of `chat.text[start:]`: literal spans as plain text, the rest as usual."""
        ids, pos = [], start
        for lo, hi in chat.literal_spans:
            if hi <= pos:
                continue
            lo = max(lo, pos)
            ids += self.backend.encode(chat.text[pos:lo], add_special_tokens=False).ids
            ids += self._literal_backend.encode(chat.text[lo:hi], add_special_tokens=False).ids
            pos = hi
        return ids + self.backend.encode(chat.text[pos:], add_special_tokens=False).ids

    def _spells_special(self, content: Any) -> bool:
        return isinstance(content, str) and any(t in content for t in self._special_texts)

    @functools.cached_property
    def _special_texts(self) -> tuple[str, ...]:
        added = self.backend.get_added_tokens_decoder()
        texts = {t.content for i, t in added.items() if i in self.special_token_ids}
        return tuple(t for t in texts if t)

    @functools.cached_property
    def _literal_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that reads special-token text as ordinary text."""
        copy = tokenizers.Tokenizer.from_str(self.backend.to_str())
        copy.encode_special_tokens = True
        return copy

    def _compiled_template(self) -> jinja2.Template:
        if self._template is None:
            if not self.chat_template:
                raise ValueError("this tokenizer has no chat template (tokenizer_config.json chat_template "
                                 "or chat_template.jinja); send a prompt instead of messages")
            try:
                self._template = _template_env().from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise TemplateError(f"chat template does not compile: {e}") from e
        return self._template


_MARK_OPEN, _MARK_CLOSE = "\ue000wm", "\ue001"  # private-use code points: a content marker


class RenderedChat(NamedTuple):
    """Chat-template output and the (start, end) spans of it to tokenize as plain text."""

    text: str
    literal_spans: tuple[tuple[int, int], ...]


def _place_contents(marked_text: str, contents: list[str], text: str) -> tuple[tuple[int, int], ...] | None:
    """Put `contents` in place of the markers of `marked_text`; their spans if that gives
    exactly `text` (each marker once, in order), else None."""
    out, spans, pos, length = [], [], 0, 0
    for k, content in enumerate(contents):
        mark = f"{_MARK_OPEN}{k}{_MARK_CLOSE}"
        at = marked_text.find(mark, pos)
        if at < 0 or mark in marked_text[at + len(mark):]:
            return None
        out.append(marked_text[pos:at])
        length += at - pos
        spans.append((length, length + len(content)))
        out.append(content)
        length += len(content)
        pos = at + len(mark)
    out.append(marked_text[pos:])
    return tuple(spans) if "".join(out) == text else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token  # AddedToken dict or plain string


def _pick_template(value: str | list | None) -> str | None:
    if not isinstance(value, list):
        return value
    named = {t.get("name"): t["template"] for t in value}
    return named.get("default", value[0]["template"] if value else None)


def _as_ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same self-less signature trick as jinja's
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env


class IncrementalDetokenizer:
    """Turns streamed token ids into text deltas (prefix-offset / read-offset technique).

    The window `_ids` holds the tokens of the last emitted delta (left context, decoded but
    already emitted up to `_read`) and the tokens not yet emitted. While the window decodes to
    a trailing U+FFFD (an unfinished UTF-8 character) nothing is emitted; after
    MAX_HELD_TOKENS held tokens the window is split at a token boundary where decoding apart
    equals decoding together, so work per call stays bounded. Ids that skip_special_tokens
    drops never enter the window. Call `flush()` when generation ends.

    Guarantee, for byte-level BPE: the deltas (plus flush) concatenate to exactly
    `tokenizer.decode(output_ids, skip_special_tokens)`, and no delta but the flushed one ends
    in U+FFFD. For SentencePiece/Metaspace tokenizers the prompt context keeps the first
    token's leading space, which a standalone decode of the output ids would strip.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._dropped = tokenizer.skipped_ids if skip_special_tokens else frozenset()
        context = [i for i in prompt_token_ids[-PROMPT_CONTEXT_TOKENS:] if i not in self._dropped]
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT_CHAR):  # prompt ends mid-character: no context
            context, context_text = [], ""
        self._ids: list[int] = context
        self._read = len(context)  # _ids[:_read] are emitted (or prompt) tokens
        self._read_text_len = len(context_text)  # == len(decode(_ids[:_read]))
        self._deltas: list[str] = []

    @property
    def window_size(self) -> int:
        """Tokens in the window now (left context + not yet emitted): what the next call decodes."""
        return len(self._ids)

    @property
    def text(self) -> str:
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""

    def add(self, token_ids: Sequence[int]) -> str:
        held_before = len(self._ids) - self._read
        self._ids.extend(i for i in token_ids if i not in self._dropped)
        text = self._decode(self._ids)
        if not text.endswith(REPLACEMENT_CHAR):
            return self._emit(text, len(self._ids))
        if held_before < MAX_HELD_TOKENS:
            return ""
        return self._force_split(text)

    def flush(self) -> str:
        """Emit whatever is held back (may end in U+FFFD: the output ended mid-character)."""
        return self._emit(self._decode(self._ids), len(self._ids))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _emit(self, text: str, end: int) -> str:
        """Emit `text` (the decode of _ids[:end]) past the read text; _ids[read:end] become context."""
        delta = text[self._read_text_len:]
        del self._ids[:self._read]
        self._read = end - self._read
        self._read_text_len = len(self._decode(self._ids[:self._read]))
        if delta:
            self._deltas.append(delta)
        return delta

    def _force_split(self, text: str) -> str:
        # A boundary b is safe when decode(head) + decode(tail) == decode(window) and the tail
        # has text: its first byte then settles any character the head left open.
        for b in range(len(self._ids) - 1, max(self._read, len(self._ids) - 1 - MAX_HELD_TOKENS), -1):
            head, tail = self._decode(self._ids[:b]), self._decode(self._ids[b:])
            if tail and head + tail == text and len(head) >= self._read_text_len:
                delta = self._emit(head, b)
                del self._ids[:self._read]  # start a fresh window at b with no context
                self._read = self._read_text_len = 0
                return delta
        return self._emit(text, len(self._ids))  # no exact split (not byte-level): best effort


class StopStringChecker:
    """Finds stop strings across token boundaries in streamed text. Text that could be the
    beginning of a stop string is held back; the stop string that completes first (earliest
    end; then earliest start) and everything after it is never emitted. Empty stop strings are ignored. Per call the work is bounded by
    max(len(stop)) + len(delta): only the held tail plus the new delta is searched."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in dict.fromkeys(stops) if s)
        self._max_held = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, stopped)."""
        if self.stopped:
            return "", True
        buf = self._held + delta
        # (end, start) of each stop's first match: the one completed first stops generation,
        # as it would have token by token, so the result does not depend on the chunking
        hits = [(i + len(s), i) for s in self._stops if (i := buf.find(s)) >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buf[:min(hits)[1]], True
        keep = self._partial_stop_len(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """Held-back text, to emit when generation ends without a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for k in range(min(len(buf), self._max_held), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

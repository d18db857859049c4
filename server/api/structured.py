"""Structured output in the API: `response_format` and vLLM's `guided_*` fields -> GrammarSpec.

    response_format {"type": "json_object"}                      any JSON object
    response_format {"type": "json_schema", "json_schema": {...}} that schema (`strict` accepted)
    guided_json (schema, object or JSON text) | guided_regex | guided_choice (list of strings)
    guided_grammar: llguidance's Lark dialect, or GBNF (llama.cpp's EBNF), converted to Lark

At most one of them per request. A spec that does not compile is a ValueError whose message
starts with the field's name (the API answers 400 with it as `param`). Checks are cached.
"""
from __future__ import annotations

import functools
import json
from typing import Any

from model.sampling import GrammarSpec
from server.engine.grammar import DEFAULT_GRAMMAR_CACHE_SIZE, check_grammar

JSON_OBJECT_SCHEMA = '{"type": "object"}'


def grammar_spec(body: Any) -> GrammarSpec | None:
    """The grammar a request body asks for (None: free text); ValueError naming the field."""
    given = []
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type != "text":
        given.append(("response_format", _response_format_spec(rf)))
    if getattr(body, "guided_json", None) is not None:
        given.append(("guided_json", GrammarSpec("json_schema", _schema_text("guided_json", body.guided_json))))
    if getattr(body, "guided_regex", None) is not None:
        given.append(("guided_regex", GrammarSpec("regex", body.guided_regex)))
    if getattr(body, "guided_choice", None) is not None:
        given.append(("guided_choice", GrammarSpec("choice", json.dumps(body.guided_choice))))
    if getattr(body, "guided_grammar", None) is not None:
        given.append(("guided_grammar", GrammarSpec("grammar", body.guided_grammar)))
    if len(given) > 1:
        raise ValueError(f"{given[0][0]} and {given[1][0]} cannot be combined: give one output constraint")
    if not given:
        return None
    return checked(given[0][1], given[0][0])


def checked(spec: GrammarSpec, field: str) -> GrammarSpec:
    """`spec`, or ValueError "<field> is invalid: <why>" when it does not compile."""
    error = _check(spec)
    if error:
        raise ValueError(f"{field} is invalid: {error}")
    return spec


def _response_format_spec(rf: Any) -> GrammarSpec:
    if rf.type == "json_object":
        return GrammarSpec("json_schema", JSON_OBJECT_SCHEMA)
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise ValueError('response_format of type "json_schema" needs json_schema.schema')
    return GrammarSpec("json_schema", _schema_text("response_format", rf.json_schema.schema_))


def _schema_text(field: str, schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{field} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{field} must be a JSON schema object")
    return json.dumps(schema)  # key order kept: it is the order properties are generated in


@functools.lru_cache(maxsize=DEFAULT_GRAMMAR_CACHE_SIZE)
def _check(spec: GrammarSpec) -> str:
    """'' when `spec` compiles, else why not."""
    try:
        check_grammar(spec)
    except ValueError as exc:
        return str(exc)
    return ""

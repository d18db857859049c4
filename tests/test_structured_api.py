"""Structured output and tool calls over HTTP: response_format, guided_*, 400s for bad
grammars, tool calls parsed from canned and real model output (whole and streamed), and the
official `openai` SDK against a live loopback server (forced tool call, `parse`)."""
from __future__ import annotations

import json
import re
import shutil
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from client import Client
from client.structured import function_tool, json_schema_format, parse_json, tool_calls
from server.api.protocol import ChatCompletionRequest
from server.api.tools import ToolCallStream, parse_tool_calls
from tests.server_fixtures import MODEL_NAME, live_server, make_app, running_engine

ENGINE = dict(max_model_len=256, num_kv_blocks=128, block_size=8)
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 4},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "size": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "tags", "size"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}
# Hermes / Qwen2.5-style: tools through the `tools` variable, calls as <tool_call> blocks
HERMES_TEMPLATE = (
    "{% if tools %}<|endoftext|>system\n<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|endoftext|>assistant\n{% for c in m.tool_calls %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}\n"
    "{% elif m.role == 'tool' %}<|endoftext|>user\n<tool_response>{{ m.content }}</tool_response>\n"
    "{% else %}<|endoftext|>{{ m.role }}\n{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    with running_engine(tiny_checkpoint("llama"), **ENGINE) as eng:
        yield eng


@pytest.fixture(scope="module")
def tool_engine(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("hermes") / "llama"
    shutil.copytree(tiny_checkpoint("llama"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": HERMES_TEMPLATE}))
    with running_engine(path, **ENGINE) as eng:
        yield eng


@pytest.fixture
async def client(engine):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://t") as c:
        yield c


@pytest.fixture
async def tool_client(tool_engine):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(tool_engine)), base_url="http://t") as c:
        yield c


def sse_chunks(body: str) -> list[dict]:
    return [json.loads(b[6:]) for b in body.split("\n\n") if b.startswith("data: {")]


async def test_response_format_json_schema_chat_whole_and_streamed(client):
    req = {"messages": USER, "max_tokens": 120, "temperature": 1.0, "seed": 4, "n": 2,
           "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    r = await client.post("/v1/chat/completions", json={**req, "n": 1, "stream": True})
    chunks = sse_chunks(r.text)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_json_object_guided_choice_regex_and_grammars(client, engine):
    brace = engine.engine.tokenizer.encode("}", add_special_tokens=False)[0]
    r = await client.post("/v1/chat/completions", json={  # "}" pushed up: the only object it can end is {}
        "messages": USER, "max_tokens": 20, "response_format": {"type": "json_object"}, "logit_bias": {str(brace): 100}})
    assert r.json()["choices"][0]["message"]["content"] == "{}" and r.json()["choices"][0]["finish_reason"] == "stop"
    r = await client.post("/v1/completions", json={"prompt": "Color:", "max_tokens": 10, "n": 3, "seed": 1,
                                                   "guided_choice": ["red", "green", "dark blue"]})
    assert {c["text"] for c in r.json()["choices"]} <= {"red", "green", "dark blue"}
    r = await client.post("/v1/completions", json={"prompt": "Id:", "max_tokens": 20, "n": 2, "seed": 2,
                                                   "guided_regex": r"[A-Z]{2}-\d{2,4}"})
    assert all(re.fullmatch(r"[A-Z]{2}-\d{2,4}", c["text"]) for c in r.json()["choices"]), r.text
    for grammar in ('start: "yes" | "no" | "maybe"', 'root ::= "yes" | "no" | "maybe"'):  # Lark, GBNF
        r = await client.post("/v1/completions", json={"prompt": "Ok?", "max_tokens": 5, "guided_grammar": grammar})
        assert r.json()["choices"][0]["text"] in {"yes", "no", "maybe"}, r.text
    r = await client.post("/v1/completions", json={"prompt": "J:", "max_tokens": 120, "guided_json": json.dumps(SCHEMA)})
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SCHEMA)


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", "objectx"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "type"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "a("}, "guided_regex", "unclosed group"),
    ({"guided_grammar": "start: foo"}, "guided_grammar", "unknown name"),
    ({"guided_choice": []}, "guided_choice", ""),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "cannot be combined"),
])
async def test_bad_structured_requests_are_400_naming_the_field(client, extra, param, words):
    for path, base in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "x"})):
        r = await client.post(path, json={**base, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and param in (err["param"] or "") and words in err["message"]


# -- tool calls ---------------------------------------------------------------------------
def test_tool_call_parsing_on_canned_outputs():
    content, calls = parse_tool_calls('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                      '{"city": "Oslo", "unit": "c"}}\n</tool_call>\n<tool_call>{"name": "get_time", '
                                      '"arguments": {"zone": "utc"}}</tool_call>')
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "c"}), ("get_time", {"zone": "utc"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    _, unclosed = parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": {"zone": "cet"}}\n')  # EOS before close
    assert unclosed[0]["function"]["name"] == "get_time"
    # streamed in arbitrary pieces: the same content and calls
    text = 'Sure <tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call> done <tool'
    for size in (1, 3, 7, len(text)):
        stream, content, calls = ToolCallStream(), "", []
        for i in range(0, len(text), size):
            c, k = stream.feed(text[i:i + size])
            content, calls = content + c, calls + k
        c, k = stream.flush()
        assert (content + c, [x["function"]["name"] for x in calls + k]) == ("Sure  done <tool", ["get_time"])
        assert [x["index"] for x in calls + k] == [0]


async def test_tool_choice_none_renders_and_parses_nothing(client):
    r = await client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER], "tool_choice": "none",
                                                        "max_tokens": 2})
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]


async def test_tool_roundtrip_rendering_and_choice_errors(tool_client, tool_engine):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees"}]
    tok = tool_engine.engine.tokenizer
    messages = ChatCompletionRequest.model_validate_json(json.dumps({"messages": history})).template_messages()
    rendered = tok.apply_chat_template(messages, tools=[WEATHER])  # arguments handed over as an object
    assert '<tools>get_weather </tools>' in rendered and '"arguments": {"city": "Oslo", "unit": "c"}' in rendered
    assert "<tool_response>4 degrees</tool_response>" in rendered
    r = await tool_client.post("/v1/chat/completions", json={"messages": history, "tools": [WEATHER], "max_tokens": 3,
                                                             "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(rendered, add_special_tokens=False))
    for choice, words in ((({"type": "function", "function": {"name": "nope"}}), "not among the tools"),
                          ("required", "needs tools")):
        body = {"messages": USER, "tool_choice": choice, **({"tools": [WEATHER]} if words != "needs tools" else {})}
        r = await tool_client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and words in r.json()["error"]["message"] and r.json()["error"]["param"] == "tool_choice"
    r = await tool_client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER], "tool_choice": "required",
                                                             "guided_regex": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


async def test_required_tool_call_whole_and_streamed(tool_client):
    req = {"messages": USER, "tools": [WEATHER, CLOCK], "tool_choice": "required", "max_tokens": 150,
           "temperature": 1.0, "seed": 7}
    r = await tool_client.post("/v1/chat/completions", json=req)
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
    r = await tool_client.post("/v1/chat/completions", json={**req, "stream": True})
    chunks = sse_chunks(r.text)
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [d["function"]["name"] for d in deltas] == [call["function"]["name"]]
    assert json.loads(deltas[0]["function"]["arguments"]) == json.loads(call["function"]["arguments"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip()


async def test_session_turns_take_tools_too(tool_client, client):
    sid = (await tool_client.post("/v1/sessions", json={})).json()["id"]
    req = {"messages": USER, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 150, "temperature": 1.0,
           "seed": 3}
    r = await tool_client.post(f"/v1/sessions/{sid}/chat/completions", json=req)
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    plain = (await client.post("/v1/sessions", json={})).json()["id"]  # a template without a tool-call format
    r = await client.post(f"/v1/sessions/{plain}/chat/completions", json={"messages": USER, "tools": [WEATHER]})
    # the generic envelope renders the tools into the prompt (tests/test_generic_tools.py), which
    # overflows this 256-token model: they are not silently ignored
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


class Answer(pydantic.BaseModel):
    color: Literal["red", "green", "blue"]
    size: int = pydantic.Field(ge=0, le=99)
    tags: list[Literal["x", "y"]] = pydantic.Field(max_length=2)


def test_openai_sdk_forced_tool_call_and_parse_against_a_live_server(tool_engine):
    with live_server(make_app(tool_engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model=MODEL_NAME, messages=USER, tools=[WEATHER, CLOCK], max_tokens=150, temperature=1.0, seed=3,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        parsed = client.chat.completions.parse(model=MODEL_NAME, messages=USER, response_format=Answer,
                                               max_tokens=100, temperature=1.0, seed=5)
        assert isinstance(parsed.choices[0].message.parsed, Answer), parsed
        assert parsed.choices[0].finish_reason == "stop"
        with Client(url, max_retries=0) as own:  # workmem's client and its helpers
            done = own.chat(USER, tools=[function_tool("get_time", CLOCK["function"]["parameters"])],
                            tool_choice="required", max_tokens=100, temperature=1.0, seed=1)
            assert tool_calls(done)[0][0] == "get_time" and tool_calls(done)[0][1]["zone"] in {"utc", "cet"}
            answer = parse_json(own.chat(USER, response_format=json_schema_format(Answer), max_tokens=100, seed=2))
            assert Answer.model_validate(answer)

"""Anthropic's Messages API on a live uvicorn server, driven by the official `anthropic` SDK:
messages.create, messages.stream, count_tokens, a tool_use / tool_result round trip on a
template with a tool format, x-api-key auth, and errors in Anthropic's shape."""
from __future__ import annotations

import json
import shutil

import anthropic
import httpx
import pytest

from server.api.protocol_messages import UNSUPPORTED, UNSUPPORTED_CREATE
from tests.server_fixtures import MODEL_NAME, live_server, make_app, running_engine
from tests.test_structured_api import HERMES_TEMPLATE, WEATHER

ENGINE = dict(max_model_len=256, num_kv_blocks=128, block_size=8)
KEY = "key-a"
TOOL = {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER["function"]["parameters"]}
USER = [{"role": "user", "content": "hello there"}]
GREEDY = {"extra_body": {"temperature": 0}}  # the SDK no longer names it; the API takes it


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("hermes-messages") / "llama"
    shutil.copytree(tiny_checkpoint("llama"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": HERMES_TEMPLATE}))
    with running_engine(path, **ENGINE) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with live_server(make_app(engine, api_keys=(KEY,))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0)


def test_create_and_count_tokens(client):
    m = client.messages.create(model=MODEL_NAME, max_tokens=6, system="be brief", messages=USER, **GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content[0].type == "text" and m.stop_reason in ("end_turn", "max_tokens")
    assert 0 < m.usage.output_tokens <= 6
    counted = client.messages.count_tokens(model=MODEL_NAME, system="be brief", messages=USER)
    # the same prompt again: Anthropic counts prefix-cache hits apart from input_tokens
    again = client.messages.create(model=MODEL_NAME, max_tokens=2, system="be brief", messages=USER, **GREEDY)
    assert counted.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens
    assert again.usage.cache_read_input_tokens > 0
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == counted.input_tokens


def test_stream_and_stop_sequences(client):
    with client.messages.stream(model=MODEL_NAME, max_tokens=8, messages=USER, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text and final.usage.output_tokens > 0
    whole = client.messages.create(model=MODEL_NAME, max_tokens=8, messages=USER, **GREEDY)
    assert whole.content[0].text == text  # greedy: the same answer either way
    stop = text[2:4]  # a stop sequence the greedy answer is known to reach
    cut = client.messages.create(model=MODEL_NAME, max_tokens=8, messages=USER, **GREEDY, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop and stop not in cut.content[0].text


def test_tool_use_and_tool_result_round_trip(client):
    with client.messages.stream(model=MODEL_NAME, max_tokens=150, messages=[{"role": "user", "content": "Oslo?"}],
                                tools=[TOOL], tool_choice={"type": "any"}, **GREEDY) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and "input_json" in events
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city", "unit"} and use.id.startswith("toolu_")
    reply = client.messages.create(model=MODEL_NAME, max_tokens=4, tools=[TOOL], **GREEDY, messages=[
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": [b.model_dump() for b in final.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "3 C"}]}])
    assert reply.content and reply.stop_reason in ("end_turn", "max_tokens", "tool_use")


@pytest.mark.parametrize("body, status, kind, words", [
    ({"messages": USER}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error", "messages[0].content[0].type"),
    ({"max_tokens": 4, "messages": USER, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400,
     "invalid_request_error", "tools[0].type"),
    ({"max_tokens": 4, "messages": USER, "tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, 400,
     "invalid_request_error", "nope"),
    ({"max_tokens": 4, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 100}}, 400,
     "invalid_request_error", "thinking"),
    ({"max_tokens": 4, "messages": USER, "model": "claude-nope"}, 404, "not_found_error", "claude-nope"),
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error",
     "messages[0].role"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f",
                                                                  "input": {}}]}]},
     400, "invalid_request_error", "messages[0].content[0].type"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                                                  "content": [{"type": "image"}]}]}]},
     400, "invalid_request_error", "messages[0].content[0].content"),
    ({"max_tokens": 4, "messages": USER, "system": [{"type": "image"}]}, 400, "invalid_request_error", "system[0]"),
    ({"max_tokens": 4, "messages": USER, "tools": [{"name": "f"}]}, 400, "invalid_request_error",
     "tools[0].input_schema"),
    ({"max_tokens": 4, "messages": USER, "thinking": {"type": "between_tools"}}, 400, "invalid_request_error",
     "thinking.type"),
    ({"max_tokens": 4, "messages": USER, "output_config": {"format": {"type": "xml"}}}, 400,
     "invalid_request_error", "output_config.format.type"),
    ({"max_tokens": 4, "messages": USER, "temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ({"max_tokens": 4, "messages": USER, "top_k": 0}, 400, "invalid_request_error", "top_k"),
    ({"max_tokens": 4, "messages": USER, "stop_sequences": ["a" * 300]}, 400, "invalid_request_error",
     "stop_sequences"),
    ({"max_tokens": 100000, "messages": USER}, 400, "invalid_request_error", "max_tokens=100000"),
    ({"max_tokens": 4, "messages": USER, "tools": [TOOL], "tool_choice": {"type": "tool"}}, 400,
     "invalid_request_error", "tool_choice"),
    ({"max_tokens": 4, "messages": USER, "tool_choice": {"type": "any"}}, 400, "invalid_request_error",
     "tool_choice needs tools"),
    ({"max_tokens": 4, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f",
                                                                       "input": []}]}]},
     400, "invalid_request_error", "messages[0].content[0].input"),
])
def test_errors_are_anthropic_shaped(server, body, status, kind, words):
    r = httpx.post(server + "/v1/messages", json={"model": MODEL_NAME, **body}, headers={"x-api-key": KEY}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind and words in r.json()["error"]["message"]


# a value for each field this server does not implement: each is a 400 naming it (count_tokens:
# those it takes too); service_tier, speed and output_config only with the values named here
REFUSED = {"container": "container_1", "mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}],
           "context_management": {"edits": []}, "diagnostics": {"previous_message_id": "msg_1"},
           "compaction": {"type": "enabled"}, "fallbacks": [{"model": "other"}], "thread": {"type": "create"},
           "inference_geo": "eu", "service_tier": "priority", "speed": "fast", "output_config": {"effort": "low"}}
NAMED = {"output_config": "output_config.effort"}
BOTH = (*UNSUPPORTED, "service_tier", "speed", "output_config")


@pytest.mark.parametrize("path, name", [("/v1/messages", n) for n in sorted(REFUSED)] +
                         [("/v1/messages/count_tokens", n) for n in BOTH])
def test_unsupported_fields_are_400_naming_them(server, path, name):
    assert set(REFUSED) == {*BOTH, *UNSUPPORTED_CREATE}
    body = {"model": MODEL_NAME, "max_tokens": 4, "messages": USER, name: REFUSED[name]}
    r = httpx.post(server + path, json=body, headers={"x-api-key": KEY}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert r.json()["type"] == "error" and error["type"] == "invalid_request_error"
    assert error["message"] == f"{NAMED.get(name, name)} is not supported by this server"


def test_x_api_key_and_bearer_auth(server):
    body = {"model": MODEL_NAME, "max_tokens": 1, "messages": USER}
    bad = httpx.post(server + "/v1/messages", json=body, headers={"x-api-key": "wrong"}, timeout=30)
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server, api_key="wrong", max_retries=0).messages.create(**body)
    ok = httpx.post(server + "/v1/messages/count_tokens", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["input_tokens"] > 0

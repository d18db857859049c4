"""Tools on a model whose chat template has no tool-call format (the tiny ChatML-style one,
as SmolLM2's): the generic JSON envelope (server/api/tool_generic.py) on chat completions,
the Responses API and the Messages API, whole and streamed, and its parts on canned text."""
from __future__ import annotations

import json
import shutil

import anthropic
import httpx
import jsonschema
import openai
import pytest

from server.api.tool_generic import EnvelopeStream, render_messages
from tests.server_fixtures import MODEL_NAME, live_server, make_app, running_engine
from tests.test_structured_api import CLOCK, USER, sse_chunks

LONG_CONTEXT = 1024  # the tools ride in the prompt: more room than the tiny checkpoint's 256 positions
ENGINE = dict(max_model_len=LONG_CONTEXT, num_kv_blocks=512, block_size=8)
REQUIRED = {"messages": USER, "tools": [CLOCK], "tool_choice": "required", "max_tokens": 100, "temperature": 0,
            "parallel_tool_calls": False}  # one call: a random model would fill an open array to max_tokens


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "llama"
    shutil.copytree(tiny_checkpoint("llama"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": LONG_CONTEXT}))
    with running_engine(path, **ENGINE) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with live_server(make_app(engine)) as url:
        yield url


def test_chat_calls_through_the_envelope_whole_and_streamed(server, engine):
    r = httpx.post(server + "/v1/chat/completions", json=REQUIRED, timeout=60).json()
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), CLOCK["function"]["parameters"])
    streamed = sse_chunks(httpx.post(server + "/v1/chat/completions", json={**REQUIRED, "stream": True},
                                     timeout=60).text)
    deltas = [d for c in streamed for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [d["function"] for d in deltas] == [call["function"]] and streamed[-1]["choices"][0]["finish_reason"] == \
        "tool_calls"
    # auto: the envelope may hold an answer instead; its JSON never leaks into the content
    auto = httpx.post(server + "/v1/chat/completions", json={**REQUIRED, "tool_choice": "auto", "max_tokens": 40,
                                                             "temperature": 1.0, "seed": 3}, timeout=60).json()
    message = auto["choices"][0]["message"]
    assert message.get("tool_calls") or not (message["content"] or "").startswith("{")


def test_a_session_turn_calls_and_the_next_resumes_its_kv(server):
    sid = httpx.post(server + "/v1/sessions", json={}).json()["id"]
    first = httpx.post(f"{server}/v1/sessions/{sid}/chat/completions", json=REQUIRED, timeout=60).json()
    (call,) = first["choices"][0]["message"]["tool_calls"]
    result = {"messages": [{"role": "tool", "content": "12:00", "tool_call_id": call["id"]}], "tools": [CLOCK],
              "max_tokens": 20, "temperature": 0}
    second = httpx.post(f"{server}/v1/sessions/{sid}/chat/completions", json=result, timeout=60).json()
    computed = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"] - 1
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == computed  # the same tools prompt: resident


def test_responses_and_messages_call_through_the_envelope(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    tool = {"type": "function", **CLOCK["function"]}
    r = client.responses.create(model=MODEL_NAME, input="time?", tools=[tool], tool_choice="required",
                                max_output_tokens=100, temperature=0, parallel_tool_calls=False)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_time" and json.loads(call.arguments)["zone"] in ("utc", "cet")
    after = client.responses.create(model=MODEL_NAME, previous_response_id=r.id, tools=[tool], max_output_tokens=30,
                                    temperature=0, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                           "output": "12:00"}])
    assert after.usage.input_tokens_details.cached_tokens > 0  # the envelope is in the resident transcript
    claude = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
    m = claude.messages.create(model=MODEL_NAME, max_tokens=100, messages=[{"role": "user", "content": "time?"}],
                               tools=[{"name": "get_time", "input_schema": CLOCK["function"]["parameters"]}],
                               tool_choice={"type": "any", "disable_parallel_tool_use": True},
                               extra_body={"temperature": 0})
    assert m.stop_reason == "tool_use" and m.content[-1].type == "tool_use" and m.content[-1].name == "get_time"


def test_envelope_stream_and_history_on_canned_text():
    text = '{"response": "hi \\"you\\" \\ud83d\\ude00"}'
    for step in (1, 5, len(text)):  # the answer is unescaped as it arrives, surrogate pairs kept whole
        stream, out = EnvelopeStream(), ""
        for i in range(0, len(text), step):
            piece, calls = stream.feed(text[i:i + step])
            out += piece
        tail, calls = stream.flush()
        assert (out + tail, calls) == ('hi "you" \U0001f600', [])
    stream = EnvelopeStream()
    assert stream.feed('{"tool_calls": [{"name": "get_time", "arguments": {"zone": "utc"}}]}') == ("", [])
    content, (call,) = stream.flush()
    assert content == "" and call["index"] == 0
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "utc"}'}
    cut = EnvelopeStream()
    assert cut.feed('{"response": "cut sh') == ("cut sh", []) and cut.flush() == ("", [])  # max_tokens ended it
    history = render_messages([
        {"role": "user", "content": "t?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "utc"}}}]},
        {"role": "tool", "content": "12:00", "tool_call_id": "c1"},
        {"role": "assistant", "content": "noon"}, {"role": "assistant", "content": '{"response": "kept"}'}],
        [CLOCK])
    assert history[0]["role"] == "system" and "get_time" in history[0]["content"]
    assert json.loads(history[2]["content"]) == {"tool_calls": [{"name": "get_time", "arguments": {"zone": "utc"}}]}
    assert json.loads(history[3]["content"]) == {"tool_response": {"tool_call_id": "c1", "content": "12:00"}}
    assert json.loads(history[4]["content"]) == {"response": "noon"} and history[5]["content"] == '{"response": "kept"}'

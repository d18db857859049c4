"""OpenAI's Responses API on a live uvicorn server, driven by the official `openai` SDK:
create / stream / retrieve / delete / input_items / cancel, `previous_response_id` chains
that resume the previous response's resident KV (and branch from older ones), function
calls on a template with a tool format, 400s in OpenAI's shape that leave nothing behind,
and the bounded store (memory and --session-dir)."""
from __future__ import annotations

import json
import re
import shutil
import threading
from typing import Literal

import httpx
import openai
import pydantic
import pytest

from server.api.protocol_responses import UNSUPPORTED
from tests.server_fixtures import MODEL_NAME, live_server, make_app, running_engine
from tests.test_structured_api import HERMES_TEMPLATE, WEATHER

ENGINE = dict(max_model_len=256, num_kv_blocks=160, block_size=8)
FN_WEATHER = {"type": "function", **WEATHER["function"]}  # the Responses API's flat function tool
KEYS = ("key-a", "key-b")
PICK = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tool_model(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("hermes-responses") / "llama"
    shutil.copytree(tiny_checkpoint("llama"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": HERMES_TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def engine(tool_model):
    with running_engine(tool_model, **ENGINE) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with live_server(make_app(engine, api_keys=KEYS)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEYS[0], max_retries=0)


def sessions(engine) -> set[str]:
    return set(engine.engine.sessions.sessions)


def test_create_retrieve_input_items_delete(client, engine):
    r = client.responses.create(model=MODEL_NAME, input="hello there", instructions="be brief",
                                max_output_tokens=6, temperature=0, metadata={"k": "v"})
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    assert r.output[0].type == "message" and r.output_text == r.output[0].content[0].text
    assert r.usage.input_tokens > 0 and r.usage.output_tokens <= 6 and r.metadata == {"k": "v"}
    assert r.usage.input_tokens_details.cached_tokens == 0
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.status == r.status
    items = client.responses.input_items.list(r.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "hello there")]
    assert client.responses.delete(r.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    assert r.id not in sessions(engine)


def test_previous_response_id_resumes_resident_kv_and_branches(client, engine):
    turn = dict(model=MODEL_NAME, max_output_tokens=5, temperature=0, instructions="be brief")
    first = client.responses.create(input="hello there", **turn)
    second = client.responses.create(input="and again", previous_response_id=first.id, **turn)
    third = client.responses.create(input="once more", previous_response_id=second.id, **turn)
    for before, after in ((first, second), (second, third)):
        # everything the previous turn computed is resident: only the new input is prefilled
        computed = before.usage.input_tokens + before.usage.output_tokens - 1
        assert after.usage.input_tokens_details.cached_tokens == computed
        assert after.usage.input_tokens > computed
    table = engine.engine.sessions
    # a branch from the first response shares its blocks (a fork), and leaves the chain as it was
    branch = client.responses.create(input="a different question", previous_response_id=first.id, **turn)
    assert branch.usage.input_tokens_details.cached_tokens == first.usage.input_tokens + first.usage.output_tokens - 1
    shared = set(table.sessions[first.id].block_table) & set(table.sessions[branch.id].block_table)
    assert shared and set(table.sessions[first.id].block_table[:-1]) <= set(table.sessions[third.id].block_table)
    assert client.responses.retrieve(third.id).output_text == third.output_text
    # the transcript grows by exactly the turns taken on it
    roles = [m["role"] for m in table.sessions[third.id].messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    # store=false keeps nothing, even when it continues a stored response
    before = sessions(engine)
    loose = client.responses.create(input="not kept", previous_response_id=third.id, store=False, **turn)
    assert loose.usage.input_tokens_details.cached_tokens > 0 and sessions(engine) == before
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(loose.id)


def test_stream_text_accumulates_in_the_sdk(client):
    # a schema the output completes within the budget (a random model's text may never stop)
    text = {"format": {"type": "json_schema", "name": "pick", "schema": PICK}}
    with client.responses.stream(model=MODEL_NAME, input="stream me", max_output_tokens=40, temperature=0,
                                 text=text) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert final.status == "completed" and json.loads(final.output_text)["a"] in ("x", "y")
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_function_call_round_trip_streamed(client, engine):
    tools = [FN_WEATHER]
    with client.responses.stream(model=MODEL_NAME, input="weather in Oslo?", tools=tools, tool_choice="required",
                                 max_output_tokens=150, temperature=0) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    calls = [o for o in final.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    args = json.loads(calls[0].arguments)
    assert set(args) == {"city", "unit"}
    # the tool's result goes back as a function_call_output continuing that response
    after = client.responses.create(
        model=MODEL_NAME, previous_response_id=final.id, tools=tools, max_output_tokens=5, temperature=0,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 3}'}])
    assert after.usage.input_tokens_details.cached_tokens > 0
    messages = engine.engine.sessions.sessions[after.id].messages
    assert messages[-2] == {"role": "tool", "content": '{"temp": 3}', "tool_call_id": calls[0].call_id}
    # the same history sent whole (no previous_response_id) as input items renders too
    whole = client.responses.create(model=MODEL_NAME, tools=tools, max_output_tokens=5, temperature=0, store=False,
                                    input=[{"role": "user", "content": "weather in Oslo?"},
                                           {"type": "function_call", "call_id": "c1", "name": "get_weather",
                                            "arguments": calls[0].arguments},
                                           {"type": "function_call_output", "call_id": "c1", "output": "3"}])
    assert whole.status in ("completed", "incomplete")


def _error(server: str, body: dict, key: str = KEYS[0]) -> dict:
    r = httpx.post(server + "/v1/responses", json={"model": MODEL_NAME, "max_output_tokens": 4, **body},
                   headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    return {"status": r.status_code, **r.json()["error"]}


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": "x", "reasoning": {"generate_summary": "auto"}}, "reasoning"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {"type": "objectx"}}}}, "text.format"),
    ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}, "tools": [FN_WEATHER]}, "tool_choice"),
    ({"input": "x", "max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]}, "input[0].content[0].type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]},
     "input[0].output"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": 3}]}, "tools[0].parameters"),
    ({"input": "x", "tool_choice": "any", "tools": [FN_WEATHER]}, "tool_choice"),
    ({"input": "x", "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}, "tools": [FN_WEATHER]},
     "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"input": "x", "truncation": "sometimes"}, "truncation"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
])
def test_bad_requests_are_400_naming_the_field_and_keep_nothing(server, engine, body, param):
    before = sessions(engine)
    err = _error(server, body)
    assert err["status"] == 400 and err["param"] == param and err["type"] == "invalid_request_error", err
    assert sessions(engine) == before


# a value for each field this server does not implement (UNSUPPORTED): each is a 400 naming it
REFUSED = {"background": True, "conversation": "conv_1", "prompt": {"id": "pmpt_1"}, "max_tool_calls": 3,
           "top_logprobs": 2, "context_management": [{"type": "compaction"}], "prompt_cache_retention": "24h",
           "prompt_cache_options": {"ttl": "30m"}, "service_tier": "flex",
           "background_options": {"completion_window": "2h"}, "moderation": {"model": "omni-moderation-latest"},
           "image": {"context_compression": "auto"}, "access_programs": {"cyber": "standard"}}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_fields_are_400_naming_them(server, engine, name):
    before = sessions(engine)
    err = _error(server, {"input": "x", name: REFUSED[name]})
    assert err["status"] == 400 and err["param"] == name and err["code"] == "unsupported_parameter", err
    assert err["message"].startswith(name) and sessions(engine) == before


def test_the_unused_values_of_unsupported_fields_are_accepted(client):
    r = client.responses.create(model=MODEL_NAME, input="x", max_output_tokens=1, background=False, top_logprobs=0,
                                service_tier="default", store=False)
    assert r.status in ("completed", "incomplete")


def test_what_codex_sends_is_accepted(engine):
    # Codex CLI's request shape: reasoning + encrypted-content include, store false, hosted
    # tools beside its function tools (web_search, a namespace): with --hosted-tools drop they
    # are left out of the prompt, by default a 400 names them
    body = {"model": MODEL_NAME, "stream": True, "store": False, "reasoning": {"summary": "auto"},
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k", "client_metadata": {"a": "b"},
            "tool_choice": "auto", "parallel_tool_calls": True, "max_output_tokens": 3,
            "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "be"}]},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
            "tools": [FN_WEATHER, {"type": "web_search"}, {"type": "namespace", "name": "agents", "tools": []}]}
    for hosted, status in (("drop", 200), ("reject", 400)):
        with live_server(make_app(engine, hosted_tools=hosted)) as url:
            r = httpx.post(url + "/v1/responses", json=body, timeout=60)
            assert r.status_code == status, r.text
            if status == 200:
                assert '"response.completed"' in r.text or '"response.incomplete"' in r.text
            else:
                assert r.json()["error"]["param"] == "tools[1].type"


def test_truncation_auto_drops_old_turns_disabled_answers_400(client, server, engine):
    first = client.responses.create(model=MODEL_NAME, input=" ".join(["hello"] * 25), max_output_tokens=4)
    longer = " ".join(["again"] * 35)  # fits alone, not after the first turn (256 tokens of context)
    before = sessions(engine)
    err = _error(server, {"input": longer, "previous_response_id": first.id})
    assert (err["status"], err["code"], err["param"]) == (400, "context_length_exceeded", "input"), err
    assert sessions(engine) == before
    cut = client.responses.create(model=MODEL_NAME, input=longer, previous_response_id=first.id,
                                  truncation="auto", max_output_tokens=4)
    whole = int(re.search(r"has (\d+) tokens", err["message"]).group(1))  # the untruncated prompt
    assert cut.truncation == "auto" and cut.usage.input_tokens < whole - first.usage.input_tokens // 2
    roles = [m["role"] for m in engine.engine.sessions.sessions[cut.id].messages]
    assert roles.count("user") == 2  # the transcript keeps both turns; only the prompt dropped turn 1


def test_input_items_after_an_unknown_item_is_400(client, server):
    r = client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=2)
    got = httpx.get(f"{server}/v1/responses/{r.id}/input_items", params={"after": "msg_nope"},
                    headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30)
    assert got.status_code == 400 and got.json()["error"]["param"] == "after"


def test_another_keys_response_does_not_exist(client, server, engine):
    mine = client.responses.create(model=MODEL_NAME, input="mine", max_output_tokens=3)
    other = openai.OpenAI(base_url=server + "/v1", api_key=KEYS[1], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    err = _error(server, {"input": "x", "previous_response_id": mine.id}, key=KEYS[1])
    assert err["code"] == "previous_response_not_found"
    assert client.responses.retrieve(mine.id).id == mine.id


HOLD_S = 30.0  # the longest the engine holds a response for the test's cancel (never reached when it passes)


def test_cancel_a_running_response(server, client, engine, monkeypatch):
    """The response is held mid-answer (the engine thread waits in its fault hook, text
    already sent) until the cancel's abort is queued: it cannot finish first, however slow
    the machine (it did under load, and /cancel answered response_not_running)."""
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    events: list[dict] = []
    started = threading.Event()
    aborted = threading.Event()
    real_abort = engine.abort

    def abort(request_id: str) -> None:
        real_abort(request_id)
        aborted.set()

    def hold(seq) -> None:
        if engine.engine.streams[seq].text:
            aborted.wait(HOLD_S)

    monkeypatch.setattr(engine, "abort", abort)
    monkeypatch.setattr(engine.engine, "fault_hook", hold)

    def stream() -> None:
        body = {"model": MODEL_NAME, "input": "a long answer please", "max_output_tokens": 200, "stream": True}
        with httpx.stream("POST", server + "/v1/responses", json=body, headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1]["type"] == "response.output_text.delta":
                        started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    rid = events[0]["response"]["id"]
    cancelled = httpx.post(f"{server}/v1/responses/{rid}/cancel", headers=headers, timeout=30).json()
    reader.join(30)
    assert not reader.is_alive()
    monkeypatch.setattr(engine.engine, "fault_hook", None)
    assert cancelled["status"] == "cancelled" and events[-1]["response"]["status"] == "cancelled"
    assert client.responses.retrieve(rid).status == "cancelled"
    again = httpx.post(f"{server}/v1/responses/{rid}/cancel", headers=headers, timeout=30)
    assert again.status_code == 400 and again.json()["error"]["code"] == "response_not_running"
    err = _error(server, {"input": "x", "previous_response_id": rid})
    assert err["param"] == "previous_response_id"


def test_the_store_is_bounded_in_memory_and_on_disk(tool_model, tmp_path):
    cap = 3
    with running_engine(tool_model, **ENGINE, session_dir=str(tmp_path)) as eng:
        with live_server(make_app(eng, max_stored_responses=cap)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            previous = None
            ids = []
            for i in range(8):  # a chain and a few fresh ones
                r = client.responses.create(model=MODEL_NAME, input=f"turn {i}", max_output_tokens=3,
                                            previous_response_id=previous if i % 3 else None)
                previous = r.id
                ids.append(r.id)
                on_disk = [p for p in tmp_path.glob("resp_*.session.json")]
                assert len(eng.engine.sessions.sessions) <= cap and len(on_disk) <= cap
            assert client.responses.retrieve(ids[-1]).id == ids[-1]
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(ids[0])


def test_openai_agents_runner_with_a_function_tool(server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # no trace export (it would go to OpenAI)
    seen: list[dict] = []

    @agents.function_tool
    def get_weather(city: Literal["Oslo", "Rome"], unit: Literal["c", "f"]) -> str:
        """Weather in a city (enums: a random model's arguments end within the token budget)."""
        seen.append({"city": city, "unit": unit})
        return "3 degrees"

    model = agents.OpenAIResponsesModel(
        model=MODEL_NAME, openai_client=openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEYS[0], max_retries=0))
    class Verdict(pydantic.BaseModel):  # a structured final answer: the random model's text ends in budget
        feels: Literal["cold", "warm"]

    agent = agents.Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model,
                         output_type=Verdict,
                         model_settings=agents.ModelSettings(tool_choice="required", temperature=0))
    result = agents.Runner.run_sync(agent, "Weather in Oslo?", max_turns=3)
    assert len(seen) == 1 and set(seen[0]) == {"city", "unit"}  # the Runner called the tool once
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    assert result.final_output.feels in ("cold", "warm")

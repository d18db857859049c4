"""Reasoning output on a thinking template (Qwen3 / DeepSeek-R1 style <think> blocks): chat's
reasoning_content (whole and streamed), chat_template_kwargs enable_thinking=false, Responses
`reasoning` items, Anthropic `thinking` blocks, and the splitter on canned text."""
from __future__ import annotations

import json
import shutil

import anthropic
import httpx
import openai
import pytest

from server.api.reasoning import ThinkStream, split_reasoning
from tests.server_fixtures import MODEL_NAME, live_server, make_app, running_engine
from tests.test_structured_api import USER, sse_chunks

# the generation prompt opens the block (or, with enable_thinking=false, closes an empty one);
# earlier answers are shown without their thinking, as Qwen3's template does
THINK_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{{ m['content'].split('</think>')[-1].lstrip() }}"
    "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}"
)
ENGINE = dict(max_model_len=256, num_kv_blocks=128, block_size=8)
SPLIT = {"messages": USER, "max_tokens": 40, "temperature": 0, "guided_regex": "[a-z]{3,8}</think>[a-z]{3,8}"}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("thinking") / "llama"
    shutil.copytree(tiny_checkpoint("llama"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": THINK_TEMPLATE}))
    with running_engine(path, **ENGINE) as eng:
        with live_server(make_app(eng)) as url:
            yield url


def test_chat_reasoning_content_whole_and_streamed(server):
    message = httpx.post(server + "/v1/chat/completions", json=SPLIT, timeout=60).json()["choices"][0]["message"]
    thought, answer = message["reasoning_content"], message["content"]
    assert message["reasoning"] == thought and thought.isalpha() and answer.isalpha()
    chunks = sse_chunks(httpx.post(server + "/v1/chat/completions", json={**SPLIT, "stream": True}, timeout=60).text)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == thought
    assert "".join(d.get("content", "") for d in deltas) == answer
    plain = httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "messages": USER, "max_tokens": 5, "temperature": 0, **NO_THINKING}).json()["choices"][0]["message"]
    assert "reasoning_content" not in plain and plain["content"]  # the template closed the block: all answer
    bad = httpx.post(server + "/v1/chat/completions", json={**SPLIT, "chat_template_kwargs": {"messages": []}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"


def test_responses_reasoning_items(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    r = client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=8, temperature=0)
    # a random model never closes the block: everything is reasoning
    assert [o.type for o in r.output] == ["reasoning"] and r.output[0].content[0].text
    assert 0 < r.usage.output_tokens_details.reasoning_tokens
    with client.responses.stream(model=MODEL_NAME, input="hi", max_output_tokens=8, temperature=0) as stream:
        kinds = [e.type for e in stream]
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    plain = client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=5, temperature=0,
                                    extra_body=NO_THINKING)
    assert [o.type for o in plain.output] == ["message"]
    after = client.responses.create(model=MODEL_NAME, input="more", max_output_tokens=5, temperature=0,
                                    previous_response_id=plain.id, extra_body=NO_THINKING)
    assert after.usage.input_tokens_details.cached_tokens > 0


def test_anthropic_thinking_blocks(server):
    client = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
    body = dict(model=MODEL_NAME, max_tokens=8, messages=USER, extra_body={"temperature": 0})
    m = client.messages.create(**body, thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in m.content] == ["thinking"] and m.content[0].thinking
    with client.messages.stream(**body) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert "thinking" in events and final.content[0].thinking == m.content[0].thinking
    plain = client.messages.create(**body, thinking={"type": "disabled"})
    assert [b.type for b in plain.content] == ["text"]


@pytest.mark.parametrize("step", [1, 3, 100])
def test_think_stream_on_canned_text(step):
    for text, thinking, want in [
        ("plan it</think>\n\nthe answer", True, ("plan it", "the answer")),
        ("<think>\nplan</think>answer", False, ("plan", "answer")),
        ("no thinking here", False, ("", "no thinking here")),
        ("still thinking </thi", True, ("still thinking </thi", "")),  # max_tokens cut it
    ]:
        stream, got = ThinkStream(thinking), ("", "")
        for i in range(0, len(text), step):
            r, a = stream.feed(text[i:i + step])
            got = (got[0] + r, got[1] + a)
        r, a = stream.flush()
        assert (got[0] + r, got[1] + a) == want == split_reasoning(text, thinking)

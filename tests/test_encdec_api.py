"""An encoder-decoder model (tiny BART) over real HTTP: completions through the openai SDK
(plain and streamed) give transformers' greedy text and count the encoder's input as the
prompt; chat is a 400 without a chat template and works with one; /v1/models says what it is."""
from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from tests.encdec_checkpoints import load_bart_reference, reference_seq2seq_greedy
from tests.server_fixtures import MODEL_NAME, live_server, make_app, running_engine

MAX_NEW = 12
PROMPT = "The lazy dog holds working memory"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def url(bart_checkpoint):
    with running_engine(bart_checkpoint, block_size=4) as engine, live_server(make_app(engine)) as base:
        yield base


@pytest.fixture(scope="module")
def expected(bart_checkpoint):
    """(prompt ids, greedy output ids) from transformers, EOS masked for MAX_NEW tokens."""
    import transformers as tf

    tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(bart_checkpoint / "tokenizer.json"))
    ids = tok(PROMPT)["input_ids"]
    tokens, _ = reference_seq2seq_greedy(load_bart_reference(bart_checkpoint), ids, MAX_NEW)
    return ids, tokens, tok.decode(tokens, skip_special_tokens=True)


def test_completions_match_transformers(url, expected):
    ids, _, text = expected
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    extra = {"min_tokens": MAX_NEW}
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0,
                                    extra_body=extra)
    assert out.choices[0].text == text and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == MAX_NEW
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0,
                                       stream=True, extra_body=extra)
    assert "".join(c.choices[0].text for c in stream if c.choices) == text
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=MAX_NEW, temperature=0,
                                       extra_body=extra)
    assert by_ids.choices[0].text == text


def test_chat_without_template_models_and_limits(url):
    models = httpx.get(url + "/v1/models").json()["data"][0]
    assert models["task"] == "generate" and models["encoder_decoder"] is True
    chat = httpx.post(url + "/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "chat template" in chat.json()["error"]["message"]
    long = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": [5] * 129, "max_tokens": 2})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum input length is 128" in long.json()["error"]["message"]
    too_many = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 128})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
    scored = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2,
                                                       "prompt_logprobs": 1})
    assert scored.status_code == 400 and "encoder-decoder" in scored.json()["error"]["message"]


def test_chat_with_a_template(bart_checkpoint, tmp_path, expected):
    """With a chat template, chat renders it and the rendered text is the encoder's input."""
    path = tmp_path / "bart-chat"
    shutil.copytree(bart_checkpoint, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    with running_engine(path) as engine, live_server(make_app(engine)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3, temperature=0, extra_body={"min_tokens": 3})
        assert out.usage.completion_tokens == 3
        assert out.usage.prompt_tokens == len(engine.tokenizer.encode_chat([{"role": "user", "content": "hi"}]))

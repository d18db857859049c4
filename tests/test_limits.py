"""The engine owns the request rules (server/engine/limits.py); the API asks the same
object and only maps its typed errors to HTTP. The tiny checkpoint pads its embedding
(384 rows) past its tokenizer (375 tokens), so the two vocabularies really differ here."""
from __future__ import annotations

import httpx
import pytest

from model.sampling import SamplingParams
from server.engine.limits import ContextLengthError, RequestError, RequestLimits
from tests.checkpoints import VOCAB
from tests.server_fixtures import make_app, running_engine

ENGINE = dict(max_model_len=64, num_kv_blocks=32, block_size=8)


def test_rules_and_their_codes():
    limits = RequestLimits(max_model_len=10, vocab_size=384, text_vocab_size=375)
    assert limits.token_bound() == 375 and limits.token_bound(decode=False) == 384
    assert limits.token_bound(compute=False) == 375
    limits.check_prompt([380], decode=False)  # a padded row: computable, no text
    with pytest.raises(RequestError, match=r"\[0, 375\)") as err:
        limits.check_prompt([380])
    assert err.value.param == "prompt" and err.value.code is None
    with pytest.raises(RequestError, match="at least one token") as err:
        limits.check_prompt([], param="prompt")
    assert err.value.api_message == "prompt must not be empty"
    assert limits.room(9) == 1 and limits.has_room(9) and not limits.has_room(10)
    with pytest.raises(ContextLengthError) as err:
        limits.room(10, param="messages")
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "messages")
    assert "maximum context length is 10 tokens, but the prompt has 10" in err.value.api_message
    assert limits.fit_max_tokens(4, None, None) == 6 and limits.fit_max_tokens(4, None, 3) == 3
    assert limits.fit_max_tokens(4, 6, 3) == 6
    with pytest.raises(ContextLengthError) as err:
        limits.fit_max_tokens(4, 7, None)
    assert err.value.param == "max_tokens" and "(6 tokens left)" in str(err.value)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    with running_engine(tiny_checkpoint("llama"), **ENGINE) as eng:
        yield eng


def test_engine_limits_know_both_vocabularies(engine):
    limits = engine.limits
    assert limits.vocab_size == VOCAB and limits.text_vocab_size == engine.tokenizer.vocab_size < VOCAB
    assert limits.max_model_len == engine.max_model_len == 64


@pytest.mark.asyncio
async def test_raw_ids_offline_but_text_ids_over_http(engine):
    padded = engine.tokenizer.vocab_size  # the first id with an embedding row and no text
    outs = [o async for o in engine.generate("raw", [1, padded], SamplingParams(max_tokens=2, ignore_eos=True))]
    assert outs[-1].finished and outs[-1].num_prompt_tokens == 2
    app = make_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
        r = await c.post("/v1/completions", json={"prompt": [1, padded], "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert f"[0, {padded})" in r.json()["error"]["message"]
        r = await c.post("/detokenize", json={"tokens": [padded]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
        r = await c.post("/v1/completions", json={"prompt": [1] * 64, "max_tokens": 1})
        err = r.json()["error"]
        assert r.status_code == 400 and (err["param"], err["code"]) == ("prompt", "context_length_exceeded")
        assert err["message"] == "this model's maximum context length is 64 tokens, but the prompt has 64 tokens"
        r = await c.post("/v1/completions", json={"prompt": [1] * 60, "max_tokens": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = await c.post("/v1/completions", json={"prompt": [1] * 60, "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_text_that_cannot_fit_is_refused_before_tokenizing():
    limits = RequestLimits(max_model_len=10, vocab_size=384, text_vocab_size=375, max_token_chars=3)
    limits.check_text(["x" * 60], "prompt")  # 10 tokens x 3 chars x slack 2
    with pytest.raises(ContextLengthError, match="61 characters of messages cannot fit") as err:
        limits.check_text(["x" * 30, "y" * 31], "messages")
    assert err.value.param == "messages"

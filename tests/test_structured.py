"""Grammar-constrained decoding in the engine (llguidance): random JSON schemas at temperature 1,
choices and regexes, n > 1, stop strings, preemption, sessions, prefix caching, and free rows
that get the same tokens beside constrained ones."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import numpy as np
import pytest
import torch

from model.sampling import GrammarSpec, SamplingParams, SamplingRow, TokenMask, process_logits, unpack_bitmask
from server.engine import LLM, EngineConfig, LLMEngine
from server.engine.grammar import BitmaskFiller, GrammarCompiler, GrammarState, check_grammar
from server.engine.sessions import Session

MAX_MODEL_LEN = 256
SCHEMA_BUDGET = 200  # worst-case output bytes of a generated schema (so it must complete in max_tokens)
NAMES = ["id", "name", "tags", "size", "kind", "items", "ok", "score"]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", block_size=8,
               max_model_len=MAX_MODEL_LEN, num_kv_blocks=512)


def schema_spec(schema: dict) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(schema))


# -- seeded random schemas whose every instance is short ---------------------------------
# Each builder returns (schema, most bytes an instance can take as the engine writes it:
# no free whitespace, ", " and ": " separators, a string character as a 12-byte surrogate pair).
def _leaf(rng: random.Random) -> tuple[dict, int]:
    kind = rng.choice(["integer", "number", "boolean", "enum", "string", "pattern", "null"])
    if kind == "integer":
        lo = rng.randint(-50, 5)
        hi = lo + rng.randint(0, 400)
        return {"type": "integer", "minimum": lo, "maximum": hi}, max(len(str(lo)), len(str(hi)))
    if kind == "number":  # multipleOf bounds the digits; a bare number has no end
        return {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.25}, 8
    if kind == "enum":
        values = rng.sample(["red", "green", "blue", 7, -1, True, None, "x y"], rng.randint(1, 4))
        return {"enum": values}, max(len(json.dumps(v)) for v in values)
    if kind == "string":
        n = rng.randint(0, 4)
        return {"type": "string", "minLength": rng.randint(0, n), "maxLength": n}, 2 + 12 * n
    if kind == "pattern":
        return {"type": "string", "pattern": "^[a-z]{1,5}[0-9]?$"}, 8
    return {"type": kind}, 5


def _node(rng: random.Random, depth: int) -> tuple[dict, int]:
    if depth >= 3 or (depth > 0 and rng.random() < 0.45):
        return _leaf(rng)
    if depth > 0 and rng.random() < 0.4:
        item, size = _node(rng, depth + 1)
        k = rng.randint(1, 3)
        return {"type": "array", "items": item, "minItems": rng.randint(0, 1), "maxItems": k}, 2 + k * (size + 2)
    names = rng.sample(NAMES, rng.randint(1, 3))
    props, total = {}, 2
    for name in names:
        props[name], size = _node(rng, depth + 1)
        total += len(name) + 2 + 2 + size + 2
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}, total


def random_schemas(count: int, seed: int) -> list[tuple[dict, int]]:
    rng, out = random.Random(seed), []
    while len(out) < count:
        schema, size = _node(rng, 0)
        if size <= SCHEMA_BUDGET:
            out.append((schema, size))
    return out


def test_random_json_schemas_complete_and_validate_at_temperature_1(llm):
    schemas = random_schemas(20, seed=2026)
    assert any('"array"' in json.dumps(s) for s, _ in schemas) and any("enum" in json.dumps(s) for s, _ in schemas)
    prompts = [f"Answer in JSON ({i}):" for i in range(len(schemas))]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=size + 1, structured=schema_spec(s))
              for i, (s, size) in enumerate(schemas)]
    outs = llm.generate(prompts, params)
    for (schema, _), out in zip(schemas, outs):
        assert out.finish_reason == "stop", (schema, out.text)  # the grammar completed
        jsonschema.validate(json.loads(out.text), schema)
    assert len({o.text for o in outs}) > 10  # sampled, not one canned answer


def test_choice_regex_n_and_stop_strings(llm):
    choice = GrammarSpec("choice", json.dumps(["red", "green", "blue-ish"]))
    regex = GrammarSpec("regex", r"[a-c]{2,5}-[0-9]{1,3}")
    outs = llm.generate(["Pick:", "Code:", "Pick again:"], [
        SamplingParams(temperature=1.0, n=4, seed=1, max_tokens=20, structured=choice),
        SamplingParams(temperature=1.0, n=3, seed=2, max_tokens=20, structured=regex),
        SamplingParams(temperature=0, max_tokens=20, structured=choice, stop=["-"]),
    ])
    assert all(c.text in {"red", "green", "blue-ish"} and c.finish_reason == "stop" for c in outs[0].outputs)
    for c in outs[1].outputs:
        assert re.fullmatch(r"[a-c]{2,5}-[0-9]{1,3}", c.text) and c.finish_reason == "stop", c.text
    assert outs[2].text in {"red", "green", "blue"} and outs[2].finish_reason == "stop"


def test_grammar_that_accepts_eos_stops(llm):
    # "(ab)+" may end after any "ab": the model's EOS is then allowed and ends the output with "stop";
    # a choice is complete after its last token: the engine stops without waiting for EOS.
    spec = GrammarSpec("regex", "(ab)+")
    outs = llm.generate(["x"] * 6, [SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured=spec)
                                     for i in range(6)])
    for out in outs:
        assert re.fullmatch("(ab)+", out.text) or out.finish_reason == "length"
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert stopped and all(o.token_ids[-1] in llm.engine.eos_token_ids for o in stopped)
    (yes,) = llm.generate(["x"], SamplingParams(temperature=0, max_tokens=20,
                                                 structured=GrammarSpec("choice", '["yes please"]')))
    assert yes.text == "yes please" and yes.finish_reason == "stop"
    assert llm.engine.eos_token_ids[0] not in yes.token_ids


def test_free_rows_get_the_same_tokens_beside_constrained_ones(llm):
    free = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 3
    free_prompts = ["The quick brown", "Working memory", "def add(a, b):"]
    alone = llm.generate(free_prompts, free)
    schema, size = random_schemas(1, seed=5)[0]
    greedy = SamplingParams(temperature=0, max_tokens=size + 1, structured=schema_spec(schema))
    json_prompt = "Answer in JSON, with every field the schema asks for:"
    mixed = llm.generate(
        [json_prompt, *free_prompts[:2], json_prompt, free_prompts[2]],
        [greedy, free[0], free[1], SamplingParams(**{**greedy.__dict__, "temperature": 1.0, "seed": 3}), free[2]],
    )
    assert [o.token_ids for o in (mixed[1], mixed[2], mixed[4])] == [o.token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[0].text), schema)
    (again,) = llm.generate([json_prompt], greedy)  # from the prefix cache, same grammar, same tokens
    assert again.num_cached_tokens > 0 and again.token_ids == mixed[0].token_ids


def test_preemption_recomputes_and_the_grammar_state_follows_the_tokens(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", block_size=4,
              max_model_len=160, num_kv_blocks=48, max_num_seqs=8)
    spec = GrammarSpec("regex", "[a-z]{120}")
    outs = llm.generate([f"p{i}" for i in range(6)],
                        [SamplingParams(temperature=1.0, seed=i, max_tokens=150, structured=spec) for i in range(6)])
    assert llm.engine.scheduler.num_preemptions > 0
    assert all(re.fullmatch("[a-z]{120}", o.text) and o.finish_reason == "stop" for o in outs)
    assert llm.engine.pool.num_used == 0


def test_grammar_state_syncs_forward_and_rolls_back(llm):
    compiler = llm.engine.grammars
    spec = GrammarSpec("regex", "[a-z]+-[0-9]+")
    tokens = llm.tokenizer.encode("abc-12", add_special_tokens=False)
    prompt = [5, 6, 7]
    state = GrammarState(compiler.matcher(spec))
    state.sync(prompt + tokens, len(prompt))
    assert state.num_consumed == len(tokens) and not state.failed
    state.sync(prompt + tokens[:1], len(prompt))  # tokens gone (as if recomputed from fewer)
    fresh = GrammarState(compiler.matcher(spec))
    fresh.sync(prompt + tokens[:1], len(prompt))
    masks = llm.engine.runner.fill_bitmasks([state, fresh], llm.engine.model_config.vocab_size)
    assert torch.equal(masks[0], masks[1]) and state.num_consumed == 1
    pooled = BitmaskFiller(parallel_rows=1)([state, fresh], llm.engine.model_config.vocab_size)
    assert torch.equal(pooled, masks) and 0 < int(unpack_bitmask(masks, 384).sum()) < 2 * 384
    bad = GrammarState(compiler.matcher(spec))
    bad.sync(prompt + llm.tokenizer.encode("-", add_special_tokens=False), len(prompt))
    assert bad.failed and bad.done


def test_compiled_grammars_are_cached_lru(tiny_checkpoint, llm):
    tok = llm.tokenizer
    compiler = GrammarCompiler(tok, llm.engine.model_config.vocab_size, llm.engine.eos_token_ids, cache_size=2)
    specs = [GrammarSpec("regex", f"a{{{k}}}") for k in (1, 2, 3)]
    compiler.matcher(specs[0])
    compiler.matcher(specs[1])
    assert compiler.matcher(specs[0]) is not compiler.matcher(specs[0])  # fresh copies of one entry
    compiler.matcher(specs[2])  # evicts specs[1], the least recently used
    assert len(compiler) == 2 and compiler.cached_specs() == [specs[0], specs[2]]


def test_bad_grammars_are_value_errors_naming_the_problem(llm):
    with pytest.raises(ValueError, match="unclosed group"):
        check_grammar(GrammarSpec("regex", "a("))
    with pytest.raises(ValueError, match="objectx"):
        check_grammar(schema_spec({"type": "objectx"}))
    with pytest.raises(ValueError, match="unknown name"):
        check_grammar(GrammarSpec("grammar", "start: foo"))
    with pytest.raises(ValueError, match="invalid regex"):
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(structured=GrammarSpec("regex", "a(")))
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="structured"):
        SamplingParams(structured={"kind": "regex", "source": "a"})


def test_session_turn_with_a_grammar(tiny_checkpoint):
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint("llama")), dtype="float32", device="cpu",
                                    block_size=4, num_kv_blocks=64, max_model_len=128))
    engine.sessions.create(Session("s", ttl=60))
    spec = GrammarSpec("choice", '["alpha", "beta"]')
    for turn in range(2):
        prompt = engine.sessions.get("s").token_ids + [10 + turn, 11, 12]
        engine.add_request(f"t{turn}", prompt, SamplingParams(temperature=1.0, seed=turn, max_tokens=10, structured=spec),
                           session_id="s", new_messages=[{"role": "user", "content": "pick"}])
        outs = [o for _ in range(30) if engine.has_unfinished() for o in engine.step()]
        assert outs[-1].finish_reason == "stop"
        assert engine.sessions.get("s").messages[-1]["content"] in {"alpha", "beta"}
    assert engine.sessions.get("s").num_turns == 2


def test_token_mask_touches_only_its_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 70)
    allowed = torch.zeros(1, 70, dtype=torch.bool)
    allowed[0, [0, 31, 33, 69]] = True
    words = np.zeros((1, 3), dtype=np.uint32)
    for t in (0, 31, 33, 69):
        words[0, t // 32] |= np.uint32(1 << (t % 32))
    bits = torch.from_numpy(words.view(np.int32))
    assert torch.equal(unpack_bitmask(bits, 70), allowed)
    assert unpack_bitmask(bits, 100)[:, 70:].sum() == 0  # a narrow mask forbids what it does not cover
    rows = [SamplingRow(SamplingParams(), [], []) for _ in range(3)]
    x = process_logits(logits, rows, TokenMask([1], bits))
    assert torch.equal(x[0], logits[0]) and torch.equal(x[2], logits[2])
    keep = [0, 31, 33, 69]
    assert torch.isinf(x[1]).sum() == 66 and torch.equal(x[1, keep], logits[1, keep])

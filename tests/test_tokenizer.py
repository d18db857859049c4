"""model/tokenizer.py against transformers' fast tokenizer, on a small byte-level BPE trained here."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from model.tokenizer import IncrementalDetokenizer, StopStringChecker, TemplateError, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# trim_blocks / lstrip_blocks matter for this layout; tojson must keep non-ASCII and '<'
CHATML = """{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if tools %}{{ tools | tojson }}
{% endif %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
WORDS = ["hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "stream",
         "token", "café", "naïve", "résumé", "Straße", "Ångström", "你好", "世界", "中文", "模型", "推理",
         "😀", "🚀", "👍🏽", "❤️", "ä", "ö", "ü", ",", ".", "!", "?", "\n", "  ", "42", "3.14"]
# rare characters and emoji absent from the training text become several byte tokens
TEXTS = ["Hello world!", "  leading spaces and trailing  ", "café naïve résumé Ωmega",
         "你好，世界！今天的模型推理很快。龘靐齉", "emoji 🦄🧠🫠👩‍👩‍👧‍👦 mixed 中文 text",
         "special <|im_end|> in text<|im_start|>user", "line1\nline2\n\n\ttab", ""]
MESSAGES = [{"role": "system", "content": "You are terse. <b>&</b>"},
            {"role": "user", "content": "Wie geht's? 你好 🦄"},
            {"role": "assistant", "content": "Gut!"},
            {"role": "user", "content": "Und jetzt?"}]


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]


@pytest.fixture(scope="module")
def backend() -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def _write_dir(path: Path, backend: Backend, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "bos_token": None, **config}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory, backend) -> Path:
    return _write_dir(tmp_path_factory.mktemp("chatml"), backend, chat_template=CHATML)


@pytest.fixture(scope="module")
def tok(chatml_dir) -> Tokenizer:
    return Tokenizer.from_dir(chatml_dir)


@pytest.fixture(scope="module")
def hf(chatml_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(chatml_dir))


# ---- encode / decode / chat template parity with transformers ----

def test_encode_decode_match_transformers(tok, hf):
    assert tok.vocab_size == len(hf) > 256 + len(SPECIALS)
    assert tok.eos_token_id == hf.eos_token_id == tok.backend.token_to_id("<|im_end|>")
    assert tok.bos_token_id is None and tok.eos_token_ids == (tok.eos_token_id,)
    assert tok.special_token_ids == {tok.backend.token_to_id(t) for t in SPECIALS}
    for text in TEXTS:
        for add in (True, False):
            ids = tok.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    specials = tok.encode(TEXTS[5])
    assert tok.decode(specials, skip_special_tokens=False) == TEXTS[5]
    assert "<|im_end|>" not in tok.decode(specials, skip_special_tokens=True)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, add_generation_prompt):
    ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    ref = hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert "\n    " not in ours  # lstrip_blocks/trim_blocks applied
    assert tok.encode_chat(MESSAGES, add_generation_prompt) == hf.encode(ref, add_special_tokens=False)


def test_tojson_keeps_unicode_and_kwargs_reach_template(tok, hf):
    tools = [{"name": "wetter", "description": "Grüße <b> 你好"}]
    ours = tok.apply_chat_template(MESSAGES[:1], tools=tools)
    assert ours == hf.apply_chat_template(MESSAGES[:1], tools=tools, add_generation_prompt=True, tokenize=False)
    assert json.dumps(tools, ensure_ascii=False) in ours


def _with_bos_post_processor(backend: Backend) -> Backend:
    out = Backend.from_str(backend.to_str())
    out.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", backend.token_to_id("<|endoftext|>"))])
    return out


def test_bos_from_added_token_dict_added_once(tmp_path, backend):
    from transformers import AutoTokenizer
    bos = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    path = _write_dir(tmp_path, _with_bos_post_processor(backend), bos_token=bos, add_bos_token=True,
                      chat_template=template)
    tok, hf = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(str(path))
    bos_id = backend.token_to_id("<|endoftext|>")
    assert tok.bos_token_id == bos_id
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text) and ids[0] == bos_id and ids[1:2] != [bos_id]
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    ids = tok.encode_chat(MESSAGES[:2])
    assert ids.count(bos_id) == 1 and ids == hf.encode(tok.apply_chat_template(MESSAGES[:2]), add_special_tokens=False)


def test_bos_added_by_wrapper_only_when_post_processor_does_not(backend):
    bos_id = backend.token_to_id("<|endoftext|>")
    plain = Tokenizer(backend, bos_token="<|endoftext|>", add_bos_token=True)
    assert plain.encode("hello") == [bos_id, *backend.encode("hello", add_special_tokens=False).ids]
    assert plain.encode("hello", add_special_tokens=False)[0] != bos_id
    both = Tokenizer(_with_bos_post_processor(backend), bos_token="<|endoftext|>", add_bos_token=True)
    assert both.encode("hello") == plain.encode("hello")


# ---- where the chat template comes from ----

def test_template_named_list_form(tmp_path, backend):
    listed = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    assert Tokenizer.from_dir(_write_dir(tmp_path / "a", backend, chat_template=listed)).apply_chat_template([]) == "DEFAULT"
    unnamed = [{"name": "rag", "template": "RAG"}, {"name": "tool_use", "template": "TOOLS"}]
    assert Tokenizer.from_dir(_write_dir(tmp_path / "b", backend, chat_template=unnamed)).apply_chat_template([]) == "RAG"


def test_chat_template_jinja_file_takes_precedence(tmp_path, backend):
    path = _write_dir(tmp_path, backend, chat_template="FROM CONFIG")
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}", encoding="utf-8")
    assert Tokenizer.from_dir(path).apply_chat_template(MESSAGES[1:3]) == "[Wie geht's? 你好 🦄][Gut!]"


def test_missing_template_and_missing_tokenizer_json(tmp_path, backend):
    tok = Tokenizer.from_dir(_write_dir(tmp_path / "plain", backend))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "empty")


def test_raise_exception_surfaces(tok):
    with pytest.raises(TemplateError, match="unknown role: wizard") as info:
        tok.apply_chat_template([{"role": "wizard", "content": "hi"}])
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("source", ["{{ ''.__class__.__mro__ }}", "{{ messages.__class__.__name__ }}",
                                    "{{ raise_exception.__globals__.keys() }}",
                                    "{{ cycler.__init__.__globals__ }}",
                                    "{% set ns = namespace(x=1) %}{% set ns.__class__ = 2 %}{{ ns.x }}",
                                    "{{ namespace(_secret=1) }}"])
def test_sandbox_refuses_unsafe_access(backend, source):
    tok = Tokenizer(backend, chat_template=source)
    with pytest.raises(TemplateError, match="unsafe|not allowed") as info:
        tok.apply_chat_template(MESSAGES)
    assert isinstance(info.value, ValueError)


def test_sandbox_single_unsafe_attribute_renders_empty(backend):
    # like transformers: one unsafe lookup is an undefined value, which prints as ""
    tok = Tokenizer(backend, chat_template="[{{ messages.__class__ }}][{{ messages.pop }}]")
    assert tok.apply_chat_template(MESSAGES) == "[][]"


def test_template_globals_and_unset_specials(backend):
    template = "{{ strftime_now('%Y') }}|{{ bos_token }}|{{ eos_token }}|{% generation %}{{ x }}{% endgeneration %}"
    tok = Tokenizer(backend, chat_template=template, eos_token="<|im_end|>")
    from datetime import datetime
    assert tok.apply_chat_template([], x="body") == f"{datetime.now().year}||<|im_end|>|body"


def test_eos_ids_merged_from_generation_config_and_config(tmp_path, backend):
    path = _write_dir(tmp_path, backend)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    (path / "config.json").write_text(json.dumps({"eos_token_id": 11}))
    tok = Tokenizer.from_dir(path)
    assert tok.eos_token_id == 2  # <|im_end|>
    assert tok.eos_token_ids == (2, 7, 9, 11)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    (path / "config.json").unlink()
    assert Tokenizer.from_dir(path).eos_token_ids == (2, 0)


# ---- incremental detokenizer ----

def _stream(tok: Tokenizer, ids: list[int], chunk: int, prompt=(), skip=True) -> list[str]:
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [det.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(det.flush())
    assert det.text == "".join(deltas)
    return deltas


def _partial_token_count(tok: Tokenizer, ids: list[int]) -> int:
    return sum("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_multibyte(tok, chunk, skip):
    text = "".join(TEXTS[2:6]) + " 🦄龘<|im_end|> tail"
    ids = tok.encode(text, add_special_tokens=False)
    assert _partial_token_count(tok, ids) >= 6  # the text really splits characters across tokens
    prompt = tok.encode_chat(MESSAGES)
    deltas = _stream(tok, ids, chunk, prompt, skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in "".join(deltas)) == (not skip)
    assert not any("\ufffd" in d for d in deltas)
    assert sum(bool(d) for d in deltas) > len(ids) // (2 * chunk)  # streams, not one blob at the end


def test_detokenizer_holds_partial_char_and_flushes_it(tok):
    ids = tok.encode("🦄", add_special_tokens=False)
    assert len(ids) > 1
    det = IncrementalDetokenizer(tok)
    assert [det.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert det.flush() == tok.decode(ids[:-1]) and det.text.endswith("\ufffd")


def test_detokenizer_window_stays_bounded(tok):
    ids = tok.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, tok.encode_chat(MESSAGES))
    widest = 0
    for i in ids:
        det.add([i])
        widest = max(widest, det.window_size)
    assert widest <= 12 and len(ids) > 500
    assert det.text + det.flush() == tok.decode(ids)


def _byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One token per raw byte, through the GPT-2 byte-to-unicode alphabet of ByteLevel."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in printable)})
    return [tok.backend.token_to_id(table[b]) for b in data]


def test_detokenizer_forced_split_keeps_open_character(tok):
    # nine lone continuation bytes (each a U+FFFD) hold the window past MAX_HELD_TOKENS right
    # when an unfinished 中 begins; the forced split must not emit that open character
    ids = _byte_ids(tok, b"\x80" * 9 + "中".encode() + b"!")
    deltas = _stream(tok, ids, 1)
    assert "".join(deltas) == tok.decode(ids) == "\ufffd" * 9 + "中!"
    assert deltas[-1] == ""  # nothing was left for flush


def test_detokenizer_skipped_specials_inside_a_character(tok):
    end = tok.backend.token_to_id("<|im_end|>")
    e4, b8, ad = _byte_ids(tok, "中".encode())
    ids = [e4, *[end] * 12, b8, *[end] * 12, ad]
    assert "".join(_stream(tok, ids, 1, skip=True)) == tok.decode(ids, skip_special_tokens=True) == "中"
    assert "".join(_stream(tok, ids, 1, skip=False)) == tok.decode(ids, skip_special_tokens=False)


def test_detokenizer_prompt_ending_mid_character(tok):
    e4, b8, ad = _byte_ids(tok, "中".encode())
    prompt = tok.encode("hi ", add_special_tokens=False) + [e4]
    deltas = _stream(tok, [b8, ad, *tok.encode(" ok", add_special_tokens=False)], 1, prompt)
    assert "".join(deltas) == tok.decode([b8, ad]) + " ok" == "\ufffd\ufffd ok"


def test_detokenizer_prompt_context_keeps_metaspace_space():
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    sp = Tokenizer(backend)
    assert sp.decode([2, 3]) == "world!" and sp.decode([1, 2, 3]) == "Hello world!"
    assert "".join(_stream(sp, [2, 3], 1, prompt=[1])) == " world!"  # as in "Hello world!"
    assert "".join(_stream(sp, [2, 3], 1)) == "world!"


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_detokenizer_random_ids_exact(tok, data):
    byte_ids = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    pool = st.one_of(st.sampled_from(byte_ids), st.integers(0, tok.vocab_size - 1))
    ids = data.draw(st.lists(pool, max_size=40))
    skip = data.draw(st.booleans())
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas, i = [], 0
    while i < len(ids):
        n = data.draw(st.integers(1, 4))
        deltas.append(det.add(ids[i:i + n]))
        i += n
    assert "".join(deltas) + det.flush() == tok.decode(ids, skip_special_tokens=skip)
    assert det.window_size <= 4 + 2 * 8 + 4


# ---- stop strings ----

def _run_stops(stops, deltas):
    checker = StopStringChecker(stops)
    out, stopped = [], False
    for d in deltas:
        emitted, stopped = checker.feed(d)
        out.append(emitted)
        if stopped:
            break
    return "".join(out) + ("" if stopped else checker.flush()), stopped, out


def test_stop_split_across_many_deltas():
    deltas = list("Hello wor") + ["ld<", "|", "e", "n", "d", "|>", " never shown"]
    text, stopped, out = _run_stops(["<|end|>"], deltas)
    assert (text, stopped) == ("Hello world", True)
    assert out[-6:] == ["ld", "", "", "", "", ""]  # "<|end" held back while it could still match


def test_multiple_stops_earliest_wins():
    text, stopped, _ = _run_stops(["STOP", "\n\n", "op"], ["one two\n", "\nthree STOP"])
    assert (text, stopped) == ("one two", True)
    text, stopped, _ = _run_stops(["cd", "abc"], ["xab", "cd"])
    assert (text, stopped) == ("x", True)  # "abc" starts earlier than "cd"
    text, stopped, _ = _run_stops(["abcd", "b"], ["xab", "cd"])
    assert (text, stopped) == ("xa", True)


def test_stop_that_never_completes_is_flushed():
    checker = StopStringChecker(["</answer>", ""])
    assert checker.feed("final </ans") == ("final ", False)
    assert checker.feed("we") == ("", False)
    assert checker.feed("r</") == ("</answer", False)
    assert checker.flush() == "</"
    assert checker.feed("x") == ("x", False)


def test_after_stop_nothing_more():
    checker = StopStringChecker(["."])
    assert checker.feed("a.b") == ("a", True)
    assert checker.feed("more") == ("", True) and checker.flush() == ""


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab\n世", max_size=40),
       stops=st.lists(st.text(alphabet="ab\n世", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=12))
@example(text="aba", stops=["b", "aba"], cuts=[2])  # "b" completes before "aba" does
@example(text="aba", stops=["b", "aba"], cuts=[])
def test_stop_checker_property(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    # the stop string that completes first ends the text (as token-by-token generation would)
    done = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    first = min(done)[1] if done else None
    emitted, stopped, out = _run_stops(stops, deltas)
    assert emitted == (text if first is None else text[:first])
    assert stopped == (first is not None)
    assert not any(s in emitted for s in stops)

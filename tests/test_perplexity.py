"""`workmem bench perplexity` against a real server on a tiny checkpoint: the number it
prints is transformers' perplexity of the same windows (all tokens, or llama-perplexity's
second halves)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from loadtest.perplexity import main as perplexity_main, scored_positions
from model.tokenizer import Tokenizer
from tests.checkpoints import CORPUS, load_reference
from tests.server_fixtures import live_server, make_app, running_engine

CONTEXT = 24


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def url(model_dir):
    with running_engine(model_dir, max_model_len=128, num_kv_blocks=64, block_size=8) as engine:
        with live_server(make_app(engine)) as base:
            yield base


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(" ".join(CORPUS[:24]), encoding="utf-8")
    return path


def reference_ppl(model_dir, text: str, second_half: bool, max_windows: int | None = None) -> tuple[float, int]:
    tokens = Tokenizer.from_dir(model_dir).encode(text, add_special_tokens=False)
    ref = load_reference(model_dir)
    nlls = []
    for i in range(min(len(tokens) // CONTEXT, max_windows or 10**9)):
        window = tokens[i * CONTEXT:(i + 1) * CONTEXT]
        with torch.no_grad():
            lp = ref(torch.tensor([window])).logits[0].float().log_softmax(-1)
        nlls += [-lp[j - 1, window[j]].item() for j in scored_positions(CONTEXT, second_half)]
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


@pytest.mark.parametrize("second_half", [False, True])
def test_perplexity_matches_transformers(url, model_dir, text_file, tmp_path, second_half):
    out = tmp_path / "ppl.json"
    argv = [str(text_file), "--url", url, "--context", str(CONTEXT), "--out", str(out), "--max-windows", "5"]
    assert perplexity_main(argv + (["--second-half"] if second_half else [])) == 0
    result = json.loads(out.read_text())
    expected, count = reference_ppl(model_dir, text_file.read_text(), second_half, max_windows=5)
    assert result["windows"] == 5 and result["scored_tokens"] == count
    assert count == 5 * (CONTEXT // 2 - 1 if second_half else CONTEXT - 1)
    assert abs(result["ppl"] - expected) / expected < 1e-4
    assert result["ppl_stderr"] > 0


def test_too_short_a_file_is_an_error(url, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox.", encoding="utf-8")
    assert perplexity_main([str(short), "--url", url, "--context", str(CONTEXT)]) == 1
    assert "fewer than one --context" in capsys.readouterr().err

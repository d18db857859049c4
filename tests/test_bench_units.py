"""loadtest's pure parts: percentiles, SLOs, workloads, SSE parsing, Prometheus parsing,
the summary table and the missing-extra message. No server."""
from __future__ import annotations

import asyncio
import io
import sys

import numpy as np
import pytest

from loadtest.cli import main as bench_main
from loadtest.client import LiveStats, RequestResult, _Stream
from loadtest.config import BenchConfig, parse_rates, parse_slo, parse_target
from loadtest.plot import INSTALL_HINT, MissingExtra, require_matplotlib
from loadtest.report import meets_slo, percentile, stats_ms, summarize
from loadtest.scrape import gauges, parse_prometheus
from loadtest.table import cells, plain_table, print_table
from loadtest.workloads import arrival_gaps, jobs, warmup_jobs


def test_percentiles_match_numpy_and_are_ordered():
    rng = np.random.default_rng(0)
    values = sorted(rng.exponential(1.0, 101).tolist())
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    s = stats_ms(values)
    assert s["p50"] <= s["p90"] <= s["p99"] <= s["max"] == pytest.approx(values[-1] * 1000)
    assert s["mean"] == pytest.approx(np.mean(values) * 1000)
    assert stats_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}


def test_slo_parsing_and_goodput():
    assert parse_slo("ttft_ms=500, tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert parse_slo(None) == {}
    with pytest.raises(ValueError, match="ttft_ms"):
        parse_slo("latency=3")
    fast = RequestResult(start=0.0, ok=True, ttft_s=0.1, e2e_s=0.5, output_tokens=5, chunk_times=[0.1, 0.2, 0.3, 0.4, 0.5])
    slow = RequestResult(start=0.0, ok=True, ttft_s=2.0, e2e_s=2.1, output_tokens=1, chunk_times=[2.0])
    assert fast.tpot_s == pytest.approx(0.1) and slow.tpot_s is None
    assert meets_slo(fast, {"ttft_ms": 500, "tpot_ms": 150}) and not meets_slo(slow, {"ttft_ms": 500})
    assert meets_slo(slow, {"tpot_ms": 1})  # one token: no TPOT to miss
    failed = RequestResult(start=0.0).fail("HTTP 500: boom")
    summary = summarize([fast, slow, failed], duration_s=2.0, run_start=0.0, slo={"ttft_ms": 500})
    assert summary["completed"] == 2 and summary["failed"] == 1 and summary["errors"] == ["HTTP 500: boom"]
    assert summary["goodput"] == pytest.approx(0.5) and summary["request_throughput"] == pytest.approx(1.0)
    assert summary["itl_ms"]["p50"] == pytest.approx(100)
    assert sum(summary["throughput_over_time"]["output_tok_s"]) == pytest.approx(6)
    assert summarize([fast], 1.0, 0.0, {})["goodput"] is None


def test_flag_parsers():
    assert parse_rates("1,2.5,inf")[-1] == float("inf")
    with pytest.raises(ValueError):
        parse_rates("0,1")
    assert parse_target("http://h:1/=vllm", 1).name == "vllm"
    assert parse_target("http://h:2", 1) == parse_target("http://h:2", 1)
    assert parse_target("http://h:2", 1).name == "h:2"


def test_workloads_are_seeded_and_shaped():
    cfg = BenchConfig(num_requests=20, input_len=10, output_len=8, range_ratio=0.5, shared_prefix_len=6,
                      num_sessions=3, turns=4)
    a, b = list(jobs(cfg, 1)), list(jobs(cfg, 1))
    assert a == b and a != list(jobs(cfg, 2)) and len(a) == 20
    for job in a:
        (turn,) = job.turns
        assert 5 <= len(turn.prompt.split()) <= 15 and 4 <= turn.max_tokens <= 12
    prefixes = {j.turns[0].prompt.split("\n")[0] for j in jobs(BenchConfig(**{**cfg.__dict__, "workload": "shared-prefix"}), 0)}
    assert len(prefixes) == 1 and len(prefixes.pop().split()) == 6
    convs = list(jobs(BenchConfig(**{**cfg.__dict__, "workload": "sessions"}), 0))
    assert len(convs) == 3 and all(j.conversation and len(j.turns) == 4 for j in convs)
    sharegpt = list(jobs(BenchConfig(**{**cfg.__dict__, "workload": "sharegpt-like", "num_requests": 200}), 0))
    assert max(len(j.turns[0].prompt.split()) for j in sharegpt) <= 80
    assert len({j.turns[0].max_tokens for j in sharegpt}) > 10  # a spread, not one length
    assert len(warmup_jobs(BenchConfig(warmup=3), 0)) == 3
    endless = jobs(BenchConfig(num_requests=None, duration_s=1), 0)
    assert len([next(endless) for _ in range(500)]) == 500


def test_copy_workload_asks_for_text_the_prompt_holds():
    from loadtest.workloads import SENTENCES

    cfg = BenchConfig(workload="copy", num_requests=9, output_len=200)
    a = list(jobs(cfg, 3))
    assert a == list(jobs(cfg, 3)) and a != list(jobs(cfg, 4))
    repeat, rewrite, quote = a[0::3], a[1::3], a[2::3]
    for job in a:
        assert job.turns[0].max_tokens == 200 and not job.conversation
    for job in repeat + quote:  # five whole sentences of the passage to give back
        assert sum(s in job.turns[0].prompt for s in SENTENCES) == 5
    for job in rewrite:  # the function to rename is in the code block
        prompt = job.turns[0].prompt
        old = prompt.split("`")[1]
        assert prompt.startswith("Rewrite") and f"def {old}(" in prompt.split("```python")[1]


def test_arrivals():
    gaps = arrival_gaps(4.0, 1.0, 0)
    mean = sum(next(gaps) for _ in range(4000)) / 4000
    assert mean == pytest.approx(0.25, rel=0.1)
    assert next(arrival_gaps(float("inf"), 1.0, 0)) == 0.0


def _feed(lines: list[str], live: LiveStats | None = None) -> RequestResult:
    parser = _Stream(RequestResult(start=0.0), live)
    for i, line in enumerate(lines):
        parser.feed(line, float(i + 1))
    return parser.close(10.0)


def test_sse_parsing():
    live = LiveStats()
    chat = _feed(['data: {"choices":[{"delta":{"role":"assistant"}}]}', "",
                  'data: {"choices":[{"delta":{"content":"Hi"}}]}', ": keep-alive",
                  'data: {"choices":[{"delta":{"content":" there"},"finish_reason":"length"}]}',
                  ('data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,'
                   '"prompt_tokens_details":{"cached_tokens":4}}}'), "data: [DONE]"], live)
    assert chat.ok and chat.ttft_s == 3.0 and chat.chunk_times == [3.0, 5.0] and chat.text == "Hi there"
    assert (chat.output_tokens, chat.prompt_tokens, chat.cached_tokens, chat.counts_from) == (3, 7, 4, "usage")
    assert live.chunks == 2
    plain = _feed(['data: {"choices":[{"text":"a"}]}', 'data: {"choices":[{"text":"b"}]}', "data: [DONE]"])
    assert plain.ok and plain.output_tokens == 2 and plain.counts_from == "chunks"
    broken = _feed(['data: {"choices":[{"text":"a"}]}'])
    assert not broken.ok and "before [DONE]" in broken.error
    error = _feed(['data: {"error":{"message":"boom"}}', "data: [DONE]"])
    assert not error.ok and "boom" in error.error


def test_prometheus_parsing():
    text = ("# HELP x\nworkmem_kv_blocks_used 3.0\nworkmem_kv_blocks_total 12.0\n"
            'workmem_request_success_total{finished_reason="length"} 4.0\n'
            'workmem_request_success_total{finished_reason="stop"} 1.0\n'
            'vllm:num_requests_waiting{model_name="m"} 2.0\n')
    sample = parse_prometheus(text)
    assert sample["workmem_request_success_total"] == 5.0
    g = gauges(sample)
    assert g["kv_usage"] == 0.25 and g["waiting"] == 2.0


def _run(name: str, **kw) -> dict:
    base = {"name": name, "completed": 4, "failed": 0, "errors": [], "output_throughput": 100.0,
            "ttft_ms": {"mean": 10.0, "p50": 9.0, "p90": 12.0, "p99": 13.0, "max": 14.0}, "notes": []}
    return {**base, **kw}


def test_tables_plain_and_rich():
    runs = [_run("a"), _run("b", output_throughput=50.0, failed=2, errors=["ConnectError: refused"])]
    header, rows = cells(runs, ratios=True)
    assert header == ["metric", "a", "b", "b / a"]
    assert ["output tok/s", "100.0", "50.0", "0.5x"] in rows
    assert not any(r[0].startswith("TPOT") for r in rows)  # rows nobody measured are left out
    for use_rich in (False, True):
        out = io.StringIO()
        print_table(runs, "t", ratios=True, file=out, use_rich=use_rich)
        text = out.getvalue()
        assert "b / a" in text and "0.5x" in text and "b: 2 failed; first error: ConnectError: refused" in text
    assert plain_table(["m", "x"], [["k", "1"]]).splitlines()[2].startswith("k")


def test_missing_matplotlib_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match="pip install 'workmem\\[bench\\]'"):
        require_matplotlib()
    assert bench_main(["--url", "http://127.0.0.1:9", "--plot", "x.png", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"loadtest: error: {INSTALL_HINT}"


def test_bad_flags_exit_2(capsys):
    assert bench_main(["--duration", "5"]) == 2  # open-ended and unbounded
    assert bench_main(["--sweep-rate", "1,2", "--compare", "http://127.0.0.1:9"]) == 2
    assert bench_main(["--slo", "nope=1"]) == 2
    assert "loadtest: error" in capsys.readouterr().err


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [False, True])
async def test_progress_display(monkeypatch, tty):
    from loadtest import progress

    stream = _Tty() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    live = LiveStats(total=4)
    async with progress.live_progress(live, "srv"):
        live.completed, live.failed, live.chunks = 3, 1, 40
        await asyncio.sleep(2 * progress.REFRESH_S)
    text = stream.getvalue()
    assert "srv" in text and ("failed 1" in text if tty else "3/4 done, 1 failed" in text)


def test_old_http_flags_translate():
    from loadtest.http import translate

    args = translate(["--concurrency", "4", "--requests", "8", "--max-tokens", "16", "--prompt-repeats", "2",
                      "--json", "o.json", "--url", "http://h:1"])
    assert args[args.index("--num-requests") + 1] == "8" and args[args.index("--output-len") + 1] == "16"
    assert args[args.index("--input-len") + 1] == "30" and args[-4:] == ["--out", "o.json", "--url", "http://h:1"]


def test_sessions_script_prints_ttft_per_turn(capsys):
    from loadtest.sessions import MODE_A, MODE_B, print_turns

    def run(ttfts: list[float], failed: int = 0) -> dict:
        return {"failed": failed, "errors": ["HTTP 500: x"] * failed, "ttft_ms_by_turn": [
            {"turn": i + 1, "ttft_ms": {"p50": t}, "prompt_tokens_mean": 100.0 * (i + 1)} for i, t in enumerate(ttfts)]}

    print_turns({MODE_A: run([200.0, 220.0]), MODE_B: run([200.0, 500.0], failed=1)}, turns=2)
    out = capsys.readouterr().out
    assert "| 2 | 200 | 0.220 | 0.500 |" in out
    assert f"{MODE_B}: turn 2 / turn 1 TTFT = 2.50x" in out and f"{MODE_B}: 1 failed" in out

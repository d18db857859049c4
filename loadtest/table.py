"""The terminal summary: one column per run (a single run, `--compare` servers, or
`--sweep-rate` points), ratio columns against the first run for `--compare`; then the
failures. `rich` when installed (the `bench` extra), plain text otherwise."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

PLAIN_WIDTH = 160  # rich's width when stdout is not a terminal

Row = tuple[str, Callable[[dict], Any]]


def _get(*path: str) -> Callable[[dict], Any]:
    def get(run: dict) -> Any:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value
    return get


def _series_max(name: str) -> Callable[[dict], Any]:
    def get(run: dict) -> Any:
        values = ((run.get("server_metrics") or {}).get("series") or {}).get(name)
        return max(values) if values else None
    return get


ROWS: list[Row] = [
    ("completed", _get("completed")), ("failed", _get("failed")), ("duration (s)", _get("duration_s")),
    ("requests/s", _get("request_throughput")), ("output tok/s", _get("output_throughput")),
    ("total tok/s", _get("total_token_throughput")), ("input tokens", _get("total_input_tokens")),
    ("output tokens", _get("total_output_tokens")), ("cached prompt tokens", _get("total_cached_tokens")),
    ("goodput (req/s)", _get("goodput")),
    *[(f"TTFT {k} (ms)", _get("ttft_ms", k)) for k in ("mean", "p50", "p90", "p99")],
    *[(f"TPOT {k} (ms)", _get("tpot_ms", k)) for k in ("mean", "p50", "p99")],
    *[(f"ITL {k} (ms)", _get("itl_ms", k)) for k in ("p50", "p99")],
    *[(f"E2E {k} (ms)", _get("e2e_ms", k)) for k in ("p50", "p99", "max")],
    ("server KV usage max (%)", lambda r: None if (v := _series_max("kv_usage")(r)) is None else 100 * v),
    ("server waiting max", _series_max("waiting")),
    ("token counts from", _get("token_counts_from")), ("sessions via", _get("session_mode")),
]


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def turn_rows(runs: list[dict]) -> list[Row]:
    """Sessions: one TTFT p50 row per turn."""
    turns = max((len(r.get("ttft_ms_by_turn") or []) for r in runs), default=0)

    def p50(i: int) -> Callable[[dict], Any]:
        def get(run: dict) -> Any:
            by_turn = run.get("ttft_ms_by_turn") or []
            return by_turn[i]["ttft_ms"]["p50"] if i < len(by_turn) else None
        return get

    return [(f"TTFT p50 turn {i + 1} (ms)", p50(i)) for i in range(turns)]


def cells(runs: list[dict], ratios: bool) -> tuple[list[str], list[list[str]]]:
    """(header, rows) as strings; a row is shown when any run has a value for it."""
    names = [str(r.get("name")) for r in runs]
    header = ["metric", *names, *(f"{n} / {names[0]}" for n in names[1:] if ratios)]
    rows = []
    for label, get in ROWS + turn_rows(runs):
        values = [get(r) for r in runs]
        if all(v is None for v in values):
            continue
        row = [label, *map(fmt, values)]
        if ratios:
            base = values[0]
            row += [fmt(v / base) + "x" if _num(v) and _num(base) and base else "-" for v in values[1:]]
        rows.append(row)
    return header, rows


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def failures(runs: list[dict]) -> list[str]:
    """One line per run with failures (its first error), then the runs' notes."""
    out = []
    for r in runs:
        if r.get("failed"):
            out.append(f"{r.get('name')}: {r['failed']} failed; first error: {(r.get('errors') or ['?'])[0]}")
        out += [f"{r.get('name')}: {note}" for note in r.get("notes") or []]
    return out


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cols: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _rich() -> tuple[Any, Any] | None:
    """(Console, Table) from rich, or None when it is not installed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return None
    return Console, Table


def print_table(runs: list[dict], title: str, ratios: bool = False, file: TextIO | None = None,
                use_rich: bool = True) -> None:
    """Print the summary of `runs` (one column each) and any failures and notes."""
    out = file or sys.stdout
    header, rows = cells(runs, ratios)
    rich = _rich() if use_rich else None
    if rich is None:
        print(f"{title}\n{plain_table(header, rows)}", file=out)
        for message in failures(runs):
            print(message, file=out)
        return
    Console, Table = rich
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(file=out, width=None if out.isatty() else PLAIN_WIDTH)
    console.print(table)
    for message in failures(runs):
        console.print(message, markup=False, highlight=False, soft_wrap=True)

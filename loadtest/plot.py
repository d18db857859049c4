"""`--plot FILE.png`: latency CDFs, output throughput over time, the server's KV usage
over time and, for `--sweep-rate`, throughput and latency against the request rate.
Needs matplotlib (`pip install 'workmem[bench]'`); drawn from the result dicts only."""
from __future__ import annotations

from typing import Any

INSTALL_HINT = "--plot needs matplotlib: pip install 'workmem[bench]'"
PANEL_SIZE_IN = (5.0, 3.6)  # inches per panel
DPI = 110


class MissingExtra(RuntimeError):
    """An optional dependency of the `bench` extra is not installed."""


def require_matplotlib() -> Any:
    """pyplot on the Agg backend, or MissingExtra with the one-line install hint."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, values: list[float], label: str) -> None:
    v = sorted(values)
    if v:
        ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=label, drawstyle="steps-post")


def latency_cdfs(ax: Any, runs: list[dict]) -> None:
    for run in runs:
        ok = [r for r in run.get("requests", []) if r["ok"]]
        _cdf(ax, [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None], f"{run['name']} TTFT")
        _cdf(ax, [r["e2e_ms"] for r in ok if r["e2e_ms"] is not None], f"{run['name']} E2E")
    ax.set(title="latency CDF", xlabel="ms", ylabel="fraction of requests")


def tpot_cdf(ax: Any, runs: list[dict]) -> None:
    for run in runs:
        _cdf(ax, [r["tpot_ms"] for r in run.get("requests", []) if r["ok"] and r["tpot_ms"] is not None],
             f"{run['name']} TPOT")
    ax.set(title="time per output token CDF", xlabel="ms", ylabel="fraction of requests")


def throughput_over_time(ax: Any, runs: list[dict]) -> None:
    for run in runs:
        series = run.get("throughput_over_time") or {}
        ax.plot(series.get("t_s", []), series.get("output_tok_s", []), label=run["name"])
    ax.set(title="output throughput", xlabel="s since start", ylabel="tokens/s")


def kv_over_time(ax: Any, runs: list[dict]) -> None:
    for run in runs:
        series = (run.get("server_metrics") or {}).get("series") or {}
        if "kv_usage" in series:
            ax.plot(series["t_s"][:len(series["kv_usage"])], [100 * v for v in series["kv_usage"]],
                    label=f"{run['name']} KV %")
        if "waiting" in series:
            ax.plot(series["t_s"][:len(series["waiting"])], series["waiting"], "--", label=f"{run['name']} waiting")
    ax.set(title="server KV usage (%) and waiting requests", xlabel="s since start")


def versus_rate(ax_tput: Any, ax_lat: Any, runs: list[dict], rates: list[float]) -> None:
    x = list(range(len(rates)))
    ax_tput.plot(x, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
    ax_tput.set(title="throughput vs request rate", xlabel="requests/s", ylabel="tokens/s")
    for key, stat in (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("e2e_ms", "p50")):
        ax_lat.plot(x, [r[key][stat] for r in runs], "o-", label=f"{key[:-3].upper()} {stat}")
    ax_lat.set(title="latency vs request rate", xlabel="requests/s", ylabel="ms", yscale="log")
    for ax in (ax_tput, ax_lat):
        ax.set_xticks(x, [f"{r:g}" for r in rates])


def plot_runs(runs: list[dict], path: str, rates: list[float] | None = None) -> None:
    """Write the figure of `runs` (one curve each) to `path`; with `rates`, two more panels."""
    plt = require_matplotlib()
    cols = 3 if rates else 2
    fig, axes = plt.subplots(2, cols, figsize=(PANEL_SIZE_IN[0] * cols, PANEL_SIZE_IN[1] * 2), squeeze=False)
    panels = axes.flatten()
    latency_cdfs(panels[0], runs)
    throughput_over_time(panels[1], runs)
    kv_over_time(panels[cols], runs)
    tpot_cdf(panels[cols + 1], runs)
    if rates:
        versus_rate(panels[2], panels[cols + 2], runs, rates)
    for ax in panels:
        if ax.has_data():
            ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)

"""PNG plots and one self-contained HTML page (the PNGs inlined as data URIs) from a report dict.

latency.png      TTFT, TPOT and end-to-end p50/p90/p99 against offered load
throughput.png   output tokens/s and goodput against offered load
expert_load.png  tokens routed per (MoE layer, expert) during the test: each layer's share
timeline.png     running / waiting requests on the server over time, per run
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _x(runs: list[dict]) -> tuple[list[float], str]:
    if all(r.get("rate") for r in runs):
        return [r["rate"] for r in runs], "offered load (requests/s)"
    return [r.get("concurrency") or 0 for r in runs], "concurrency (requests in flight)"


def _latency(runs, path: Path) -> None:
    plt = _plt()
    xs, label = _x(runs)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"),
                              ("time to first token", "time per output token", "end to end")):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ys = [(r.get(key) or {}).get(q) for r in runs]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=q)
        slo = (runs[-1].get("slo") or {}).get(key)
        if slo:
            ax.axhline(slo, color="red", lw=0.8, label="SLO")
        ax.set_title(title)
        ax.set_xlabel(label)
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _throughput(runs, path: Path) -> None:
    plt = _plt()
    xs, label = _x(runs)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(xs, [r.get("output_tokens_per_s", 0) for r in runs], "o-")
    a1.set_title("output tokens/s")
    a2.plot(xs, [r.get("throughput_rps", 0) for r in runs], "o-", label="completed")
    a2.plot(xs, [r.get("goodput_rps", 0) for r in runs], "s--", label="within SLO (goodput)")
    if all(r.get("rate") for r in runs):
        a2.plot(xs, xs, ":", color="grey", label="offered")
    a2.set_title("requests/s")
    for ax in (a1, a2):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _heatmap(load: list[list[int]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(16, 4 + 0.25 * len(load[0])), 1.5 + 0.35 * len(load)))
    shares = [[x / max(sum(row), 1) for x in row] for row in load]
    im = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("expert load: share of each layer's routed tokens")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _timeline(runs, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.5))
    offset = 0.0
    for i, r in enumerate(runs):
        tl = r.get("timeline") or []
        if not tl:
            continue
        ts = [offset + p["t"] for p in tl]
        ax.plot(ts, [p["running"] for p in tl], color="C0", label="running" if i == 0 else None)
        ax.plot(ts, [p["waiting"] for p in tl], color="C1", label="waiting" if i == 0 else None)
        ax.axvline(offset, color="grey", lw=0.5)
        offset = ts[-1] + 1.0
    ax.set_xlabel("seconds (runs one after another)")
    ax.set_ylabel("sequences on the server")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_plots(out: Path, report: dict) -> list[Path]:
    runs = report["runs"]
    paths = [out / "latency.png", out / "throughput.png"]
    _latency(runs, paths[0])
    _throughput(runs, paths[1])
    if report.get("expert_load") and any(any(r) for r in report["expert_load"]):
        paths.append(out / "expert_load.png")
        _heatmap(report["expert_load"], paths[-1])
    if any(r.get("timeline") for r in runs):
        paths.append(out / "timeline.png")
        _timeline(runs, paths[-1])
    page = out / "report.html"
    page.write_text(_html(report, paths))
    return paths + [page]


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _html(report: dict, images: list[Path]) -> str:
    rows = []
    for r in report["runs"]:
        load = f"{r['rate']:g} req/s" if r.get("rate") else f"concurrency {r.get('concurrency')}"
        req = r["requests"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            load, req["sent"], req["completed"], req["failed"],
            _fmt(r["ttft_ms"]["p50"]), _fmt(r["ttft_ms"]["p90"]), _fmt(r["ttft_ms"]["p99"]),
            _fmt(r["tpot_ms"]["p50"], 2), _fmt(r["tpot_ms"]["p99"], 2), _fmt(r["e2e_ms"]["p50"]),
            _fmt(r["output_tokens_per_s"]), _fmt(r["goodput_rps"], 2), _fmt(100 * r["cached_token_share"]),
            ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "-",
            "YES: " + "; ".join(r["generator"]["reasons"]) if r["generator_bottleneck"] else "no")) + "</tr>")
    head = ("load", "sent", "completed", "failed", "TTFT p50 ms", "p90", "p99", "TPOT p50 ms", "p99",
            "e2e p50 ms", "output tok/s", "goodput req/s", "cached %", "errors", "generator bottleneck")
    imgs = "".join(
        f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}" alt="{p.stem}">' for p in images if p.suffix == ".png")
    model = report.get("model", {})
    warn = ('<p class="warn">The generator was a bottleneck in at least one run: its latencies partly '
            'measure the load generator, not the server.</p>') if report.get("generator_bottleneck") else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mesh loadtest: {html.escape(report.get('target', ''))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}
.warn{{color:#b00;font-weight:bold}}pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>mesh loadtest</h1>
<p>target <b>{html.escape(report.get('target', ''))}</b>, model {html.escape(str(model.get('model', '')))}
({html.escape(str(model.get('family', '')))}, {model.get('num_experts', '?')} experts top-{model.get('top_k', '?')},
{model.get('num_expert_workers', 0)} expert workers), started {html.escape(report.get('started_at', ''))}</p>
{warn}
<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(rows)}</table>
{imgs}
<h2>workload</h2><pre>{html.escape(json.dumps(report.get('workload', {}), indent=1))}</pre>
</body></html>
"""

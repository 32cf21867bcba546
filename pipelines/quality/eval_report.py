"""What the eval job shows: the one-screen table, ``eval.md``, ``eval.png`` and ``eval.json``, from its report.

Pure functions of the report dict (``pipelines.quality.evaluate.run`` builds it); files are written atomically
(a temporary file, then a rename), so a reader never sees half a report.

Example::

    print(table(report))
    write_outputs(report, "eval-report")   # {"json": ..., "markdown": ..., "plot": ...}
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

COLUMNS = ("variant", "nDCG@10", "MRR@10", "R@100", "pairs", "seconds", "pairs/s")


def rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One tuple of display strings per variant, in report order."""
    out = []
    for v in report.get("variants", []):
        m = v["metrics"]
        pps = f"{v['pairs_per_second']:,.1f}" if v.get("pairs_per_second") else "-"
        out.append((v["name"], f"{m['ndcg@10']:.4f}", f"{m['mrr@10']:.4f}", f"{m['recall@100']:.4f}",
                    f"{v['pairs']:,}", f"{v['seconds']:,.2f}", pps))
    return out


def table(report: dict[str, Any], markdown: bool = False) -> str:
    """The variants as aligned text columns, or as a Markdown table."""
    body = rows(report)
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * (len(COLUMNS) - 1)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(COLUMNS)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(r) for r in body)])


def verdict(report: dict[str, Any]) -> str:
    """One sentence: the best variant by nDCG@10 and what it costs over its first stage."""
    best = report.get("best")
    if not best:
        return "No variant was evaluated."
    if best["depth"] is None and not best["reranked"]:
        return f"Best: `{best['name']}` (nDCG@10 {best['ndcg@10']:.4f}); no reranker configured (add a rerank section)."
    if best["depth"] is None:
        return (f"Best: `{best['name']}` (nDCG@10 {best['ndcg@10']:.4f}); no reranked variant beat it, so the "
                "cross-encoder's cost buys nothing on this collection.")
    fs = best["first_stage_seconds"]
    ratio = f" ({best['seconds'] / fs:,.1f}x its time)" if fs else ""
    return (f"Best: `{best['name']}` (nDCG@10 {best['ndcg@10']:.4f}, {best['gain']:+.4f} over its first stage "
            f"`{best['first_stage']}` at {best['first_stage_ndcg@10']:.4f}); it scores {best['pairs']:,} pairs in "
            f"{best['extra_seconds']:,.2f} s on top of the first stage's {fs:,.2f} s{ratio}.")


def markdown(report: dict[str, Any], plot_name: str = "eval.png") -> str:
    m, q, p = report["models"], report["queries"], report["passages"]
    fusion = m.get("fusion") or {}
    settings = [
        ("collection", f"`{report['collection']}` (split `{report['split']}`)"),
        ("queries", f"{q['evaluated']:,} evaluated of {q['judged']:,} judged"
                    + (f" ({q['beyond_max_queries']:,} beyond eval.max_queries)" if q["beyond_max_queries"] else "")),
        ("passages", f"`{p['table']}` v{p['version']} ({p['action']}: {p['reason']})"),
        ("bi-encoder", f"`{m['bi_encoder']}`"),
        ("cross-encoder", f"`{m['cross_encoder']}`" if m.get("cross_encoder") else "none (first stages only)"),
        ("fusion", f"w = {fusion['weight']:g} ({fusion['origin']})" if fusion.get("weight") is not None
                   else fusion.get("origin", "none")),
        ("candidates", f"top {report['candidates_k']} per query and source; rerank depths {report['depths']}"),
        ("run", f"`{report['run_id']}`, {report['finished_at']}"),
    ]
    lines = [f"# Evaluation: {Path(report['collection']).name} ({report['split']})", ""]
    lines += [f"- **{k}**: {v}" for k, v in settings]
    note = ("Seconds: first stage (query encoding + search) plus cross-encoder scoring up to that depth; "
            "pairs/s counts scoring only.")
    lines += ["", table(report, markdown=True), "", verdict(report), "", note, "",
              f"![quality against rerank depth and cost]({plot_name})", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Left: nDCG@10 against rerank depth K (first stages as horizontal lines). Right: nDCG@10 against seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(v["source"] for v in variants))}
    for v in variants:
        if v["depth"] is None:
            left.axhline(v["metrics"]["ndcg@10"], color=colors[v["source"]], linestyle=":", linewidth=1.2,
                         label=f"{v['name']} (first stage)")
    lines: dict[tuple[str, bool], list[dict]] = {}
    for v in variants:
        if v["depth"] is not None:
            lines.setdefault((v["source"], v["fusion"] is not None), []).append(v)
    for (source, fused), vs in lines.items():
        left.plot([v["depth"] for v in vs], [v["metrics"]["ndcg@10"] for v in vs], marker="o",
                  color=colors[source], linestyle="--" if fused else "-",
                  label=f"{source} → CE" + (f" + fusion (w={vs[0]['fusion']:g})" if fused else ""))
    depths = report["depths"]
    if depths:
        left.set_xscale("log")
        left.set_xticks(depths, [str(d) for d in depths])
        left.minorticks_off()
    left.set(xlabel="rerank depth K", ylabel="nDCG@10", title="quality against rerank depth")
    left.legend(fontsize=8, loc="best")
    left.grid(alpha=0.3)

    first = {v["source"]: v for v in variants if v["depth"] is None}
    for (source, fused), vs in lines.items():  # each reranked source as a cost curve from its first stage
        curve = ([first[source]] if source in first else []) + vs
        right.plot([v["seconds"] for v in curve], [v["metrics"]["ndcg@10"] for v in curve], color=colors[source],
                   linestyle="--" if fused else "-", marker="D" if fused else "o", markersize=4, linewidth=1)
        for v in vs:
            right.annotate(f"K={v['depth']}" + ("+f" if fused else ""), (v["seconds"], v["metrics"]["ndcg@10"]),
                           fontsize=7, xytext=(4, -9 if fused else 3), textcoords="offset points")
    for v in first.values():
        right.scatter(v["seconds"], v["metrics"]["ndcg@10"], color=colors[v["source"]], marker="s", s=40, zorder=3)
        right.annotate(v["name"], (v["seconds"], v["metrics"]["ndcg@10"]), fontsize=8, weight="bold",
                       xytext=(4, 3), textcoords="offset points")
    secs = [v["seconds"] for v in variants if v["seconds"] > 0]
    if secs and max(secs) / min(secs) > 20:
        right.set_xscale("log")
    right.set(xlabel="seconds (first stage + scoring)", ylabel="nDCG@10",
              title="quality against cost (squares: first stages; K=rerank depth, +f: fused)")
    right.grid(alpha=0.3)
    fig.suptitle(f"{Path(report['collection']).name} ({report['split']}, {report['queries']['evaluated']} queries)")
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_outputs(report: dict[str, Any], folder: str) -> dict[str, str]:
    """``eval.png`` and ``eval.md`` now; returns the paths of the three files (``eval.json`` is written last,
    by ``write_json``, once the report holds every path)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    paths = {"json": os.path.join(folder, "eval.json"), "markdown": os.path.join(folder, "eval.md"),
             "plot": os.path.join(folder, "eval.png")}
    plot(report, paths["plot"])
    text = markdown(report, os.path.basename(paths["plot"]))
    _atomic(paths["markdown"], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return paths


def write_json(report: dict[str, Any], path: str) -> None:
    body = json.dumps(report, indent=2, default=str) + "\n"
    _atomic(path, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

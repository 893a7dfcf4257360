"""The seed's two tables for every checkpoint (``results.md``), a chart (``results.png``), and the
same tables printed at the end of the job."""

from __future__ import annotations

import os
import tempfile

from cerbero_ray import storage
from cerbero_ray.evaluate.evalita import SEED_NAMES

EVALITA = list(SEED_NAMES)  # ami2020, ironita, sentipolc: the seed's column order


def _f(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def squad_table(results: dict, published: list[dict]) -> list[str]:
    names = [t for t, v in results["tasks"].items() if v["kind"] == "squad"]
    if not names:
        return []
    lines = [
        "| Model | SQuAD-it F1 | SQuAD-it EM | F1 (Italian-normalised) | EM (Italian-normalised) | rows |",
        "|---|---|---|---|---|---|",
    ]
    for ckpt, res in results["results"].items():
        for t in names:
            m = res.get(t, {}).get("generate")
            if m:
                label = ckpt if len(names) == 1 else f"{ckpt} ({t})"
                lines.append(
                    f"| {label} | {_f(m['f1'])} | {_f(m['em'])} | {_f(m['f1_it'])} | {_f(m['em_it'])} | {m['rows']} |"
                )
    for p in published:
        if p.get("squad_it_f1") is not None:
            lines.append(f"| {p['model']} | {_f(p['squad_it_f1'])} | {_f(p.get('squad_it_em'))} | – | – | – |")
    return lines


def evalita_table(results: dict, published: list[dict], metric: str = "f1") -> list[str]:
    present = [t for t in EVALITA if t in results["tasks"]]
    if not present:
        return []
    head = " | ".join(f"{SEED_NAMES[t].capitalize()} ({t})" for t in present)
    lines = [f"| Model | protocol | {head} |", "|---|---|" + "---|" * len(present)]
    for ckpt, res in results["results"].items():
        for proto in ("generate", "score"):
            cells = [res.get(t, {}).get(proto, {}).get(metric) for t in present]
            if any(c is not None for c in cells):
                lines.append(f"| {ckpt} | {proto} | " + " | ".join(_f(c) for c in cells) + " |")
    for base in ("majority_class", "always_positive"):
        cells = [results["tasks"][t]["baselines"][base][metric] for t in present]
        lines.append(f"| *{base.replace('_', ' ')}* | baseline | " + " | ".join(_f(c) for c in cells) + " |")
    if metric == "f1":
        for p in published:
            if any(p.get(t) is not None for t in present):
                lines.append(f"| {p['model']} | generate | " + " | ".join(_f(p.get(t)) for t in present) + " |")
    return lines


def _shots(results: dict, ec: dict, squad: bool) -> str:
    """The shots of the tasks evaluated (of SQuAD, or of the EVALITA tasks)."""
    found = {ec["tasks"][t]["shots"] for t, v in results["tasks"].items() if (v["kind"] == "squad") == squad}
    return "/".join(str(k) for k in sorted(found)) or "?"


def markdown(results: dict, ec: dict) -> str:
    out = ["# Evaluation", ""]
    sq = squad_table(results, ec.get("published") or [])
    if sq:
        out += [f"## SQuAD-it ({_shots(results, ec, True)}-shot, greedy, official SQuAD v1.1 EM/F1, %)", "", *sq, ""]
    for metric, title in (("f1", "F1 of the positive class"), ("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        ev = evalita_table(results, ec.get("published") or [], metric)
        if ev:
            out += [f"## EVALITA ({_shots(results, ec, False)}-shot yes/no, {title}, %)", "", *ev, ""]
    rows = ", ".join(
        f"{t} {v['rows']} rows (pool {v['pool_rows']}, rejects {sum(v['rejects'].values())})"
        for t, v in results["tasks"].items()
    )
    out += [f"Rows scored: {rows}.", ""]
    if results["skipped_tasks"]:
        out += [f"Skipped (no file): {', '.join(results['skipped_tasks'])}.", ""]
    out += [
        "Protocols: `generate` is the authors' (greedy answer, at most 32 tokens, cut at the first newline, "
        "mapped to the nearest label by edit distance); `score` is ours (the label scorer: the log-probability "
        "of `si`/`no` as the assistant's whole answer, no generation). Published rows are the seed's figures "
        "for reference.",
        "",
    ]
    return "\n".join(out)


def chart(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bars = []  # (task label, series label, value)
    for ckpt, res in results["results"].items():
        for t, by_proto in res.items():
            for proto, m in by_proto.items():
                bars.append((t, f"{ckpt} ({proto})", m.get("f1")))
    tasks = list(dict.fromkeys(b[0] for b in bars))
    series = list(dict.fromkeys(b[1] for b in bars))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(tasks) + 2), 4), dpi=120)
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        vals = [next((v for t2, s2, v in bars if t2 == t and s2 == s), 0) or 0 for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=s)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(series) - 1) / 2, tasks)
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title("evaluation: F1 per task (SQuAD-it: F1; EVALITA: positive class)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(results: dict, ec: dict) -> dict:
    """``results.md`` and ``results.png`` under ``evaluate.output_dir``; prints the tables."""
    out = ec["output_dir"]
    md = markdown(results, ec)
    storage.write_bytes(storage.join(out, "results.md"), md.encode())
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "results.png")
        chart(results, local)
        storage.upload_file(local, storage.join(out, "results.png"))
    print(md, flush=True)
    return {
        "results_md": storage.join(out, "results.md"),
        "results_png": storage.join(out, "results.png"),
        "results_json": storage.join(out, "results.json"),
    }

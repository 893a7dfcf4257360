"""``results.md`` (printed at the end of the job too) and ``results.png``.

Every figure is given on the first prompt wording with its 95% bootstrap interval, or, where a
few-shot unit ran several draws of shots, as the mean over the draws with their range; the prompt
sensitivity table gives the mean ± standard deviation over the wordings, the best one, the combined
score and the spread over shot draws; the shot-draws table names each draw's shots; the paired
table gives each model's difference from the first on the same rows.
The seed's published rows stand beside both F1 tables, since the seed does not say which F1 it
published. Each task says what was scored and how that differs from the published setting.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile

from cerbero_ray import storage
from cerbero_ray.config.evaluate import EvaluateConfig
from cerbero_ray.evaluate.evalita import SEED_NAMES
from cerbero_ray.inputs import COMPRESSION_SUFFIXES

log = logging.getLogger(__name__)

EVALITA = list(SEED_NAMES)  # ami2020, ironita, sentipolc: the seed's column order
PROTOCOLS = ("generate", "choice", "score", "benchita")
TITLES = {
    "f1": "F1 of the positive class",
    "macro_f1": "macro-F1",
    "accuracy": "accuracy",
    "weighted_f1": "weighted F1 (benchita's classification_report)",
}
FULL_SQUAD_IT_TEST = 7609  # questions in SQuAD-it's test set


def _f(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _ci(unit: dict | None, metric: str) -> str:
    """``value [lo, hi]`` of a figure of a unit (over several shot draws: their mean and range,
    ``mean (draws lo–hi)``), or ``–``."""
    if not unit or unit.get(metric) is None:
        return "–"
    spread = (unit.get("draw_spread") or {}).get(metric)
    if spread:
        return f"{unit[metric]:.2f} (draws {spread[0]:.1f}–{spread[1]:.1f})"
    lo_hi = (unit.get("ci") or {}).get(metric)
    return f"{unit[metric]:.2f} [{lo_hi[0]:.1f}, {lo_hi[1]:.1f}]" if lo_hi else f"{unit[metric]:.2f}"


def _draws(units: dict, protocol: str, prompt: int = 0) -> list[dict]:
    """The units of one wording of ``protocol``, one per shot draw, draw 0 first."""
    return [u for k, u in sorted(units.items()) if k == f"{protocol}/{prompt}" or k.startswith(f"{protocol}/{prompt}#")]


def _first(units: dict, protocol: str) -> dict | None:
    """``protocol``'s first prompt wording: its unit, or over several shot draws one that holds each
    figure's mean over the draws and (``draw_spread``) their lowest and highest."""
    ds = _draws(units, protocol)
    if len(ds) <= 1:
        return ds[0] if ds else None
    out = {"rows": ds[0]["rows"], "draws": len(ds), "draw_spread": {}}
    for k, v in ds[0].items():
        if isinstance(v, float) and all(isinstance(d.get(k), float) for d in ds):
            vals = [d[k] for d in ds]
            out[k] = round(sum(vals) / len(vals), 4)
            out["draw_spread"][k] = (min(vals), max(vals))
    return out


def tracked_figures(units: dict) -> dict[str, float]:
    """A task's figures as the tables give them (each protocol's first prompt wording; over several
    shot draws, their mean), ``{"<protocol>/<metric>": value}``: what an experiment tracker gets."""
    out = {}
    for proto in dict.fromkeys(k.split("/")[0] for k in units):
        first = _first(units, proto) or {}
        out.update({f"{proto}/{k}": v for k, v in first.items() if isinstance(v, float)})
    return out


def squad_table(results: dict, published: list[dict]) -> list[str]:
    names = [t for t, v in results["tasks"].items() if v["kind"] == "squad"]
    if not names:
        return []
    lines = [
        "| Model | protocol | F1 | EM | F1 (Italian-normalised) | EM (Italian-normalised) | rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, res in results["results"].items():
        for t in names:
            units = res.get(t, {})
            label = model if len(names) == 1 else f"{model} ({t})"
            g, b = _first(units, "generate"), _first(units, "benchita")
            if g:
                lines.append(
                    f"| {label} | generate | {_ci(g, 'f1')} | {_ci(g, 'em')} | {_ci(g, 'f1_it')} | "
                    f"{_ci(g, 'em_it')} | {g['rows']} |"
                )
            if b:
                lines.append(
                    f"| {label} | benchita (v2, first gold) | {_ci(b, 'f1')} | {_ci(b, 'exact')} | – | – | "
                    f"{b['rows']} |"
                )
    for p in published:
        if p.get("squad_it_f1") is not None:
            lines.append(
                f"| {p['model']} | published | {_f(p['squad_it_f1'])} | {_f(p.get('squad_it_em'))} | – | – | – |"
            )
    return lines


def evalita_table(results: dict, published: list[dict], metric: str) -> list[str]:
    present = [t for t in EVALITA if t in results["tasks"]]
    if not present:
        return []
    head = " | ".join(f"{SEED_NAMES[t].capitalize()} ({t})" for t in present)
    lines = [f"| Model | protocol | {head} |", "|---|---|" + "---|" * len(present)]
    for model, res in results["results"].items():
        for proto in PROTOCOLS:
            cells = [_ci(_first(res.get(t, {}), proto), metric) for t in present]
            if any(c != "–" for c in cells):
                lines.append(f"| {model} | {proto} | " + " | ".join(cells) + " |")
    if metric in ("f1", "macro_f1", "accuracy"):
        for base in ("majority_class", "always_positive"):
            cells = [_f(results["tasks"][t]["baselines"][base][metric]) for t in present]
            lines.append(f"| *{base.replace('_', ' ')}* | baseline | " + " | ".join(cells) + " |")
    if metric in ("f1", "macro_f1"):  # which F1 the seed published is not stated: beside both
        for p in published:
            if any(p.get(t) is not None for t in present):
                lines.append(
                    f"| {p['model']} | published (F1, unstated) | " + " | ".join(_f(p.get(t)) for t in present) + " |"
                )
    return lines


def counts_table(results: dict) -> list[str]:
    """Answers the protocols could not read, and prompts cut to fit, per model and task."""
    lines = [
        "| Model | task | protocol/prompt | unparsed (generate, choice) | unknown (benchita) | too long (score) | "
        "prompts cut |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, res in results["results"].items():
        for t, units in res.items():
            for key, u in sorted(units.items()):
                if u.get("unparsed") or u.get("unknown") or u.get("errors") or u.get("truncated"):
                    lines.append(
                        f"| {model} | {t} | {key} | {u.get('unparsed', 0)} of {u['rows']} | {u.get('unknown', 0)} | "
                        f"{u.get('errors', 0)} | {u.get('truncated', 0)} |"
                    )
    return lines if len(lines) > 2 else []


def prompts_table(results: dict) -> list[str]:
    lines = [
        "| Model | task | protocol | figure | mean ± std over prompts | best (prompt) | combined | "
        "std over shot draws (draws) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results["over_prompts"].items():
        for t, protocols in res.items():
            for proto, figs in protocols.items():
                metric = "f1" if "f1" in figs else next(iter(figs), None)
                s = figs.get(metric) if metric else None
                if s and (s["prompts"] > 1 or s.get("draws", 1) > 1):
                    draws = f"{s['draw_std']:.2f} ({s['draws']})" if s.get("draws", 1) > 1 else "– (1)"
                    lines.append(
                        f"| {model} | {t} | {proto} | {metric} | {s['mean']:.2f} ± {s['std']:.2f} | "
                        f"{s['best']:.2f} ({s['best_prompt']}) | {s['combined']:.2f} | {draws} |"
                    )
    return lines if len(lines) > 2 else []


def draws_table(results: dict) -> list[str]:
    """Each shot draw of the first wording, with its shots' ids and its figure, and per (model,
    task, protocol) one line on how far the figure moved across the draws."""
    lines = ["| Model | task | protocol | draw | shots (ids) | figure [95% CI] |", "|---|---|---|---|---|---|"]
    moved = []
    for model, res in results["results"].items():
        for t, units in res.items():
            shots = results["tasks"].get(t, {}).get("shots") or []
            for proto in ("generate", "choice", "score"):
                ds = _draws(units, proto)
                if len(ds) < 2:
                    continue
                metric = "macro_f1" if "macro_f1" in ds[0] else "f1"
                for d, u in enumerate(ds):
                    ids = ", ".join(shots[d]) if d < len(shots) else "?"
                    lines.append(f"| {model} | {t} | {proto} | {d} | {ids} | {_ci(u, metric)} |")
                vals = [u[metric] for u in ds]
                moved.append(
                    f"- {model}, {t}, {proto}: {metric} moved by {max(vals) - min(vals):.2f} points across "
                    f"{len(ds)} shot draws ({min(vals):.2f}–{max(vals):.2f}; mean {sum(vals) / len(vals):.2f})."
                )
    return lines + [""] + moved if moved else []


def paired_table(results: dict) -> list[str]:
    lines = [
        "| Difference | task | protocol/prompt | figure | difference [95% CI] | share of resamples ≤ 0 |",
        "|---|---|---|---|---|---|",
    ]
    for pair, tasks in results.get("paired", {}).items():
        for t, units in tasks.items():
            for key, figs in sorted(units.items()):
                metric = "f1" if "f1" in figs else "macro_f1" if "macro_f1" in figs else next(iter(figs), None)
                d = figs.get(metric) if metric else None
                if d:
                    lines.append(
                        f"| {pair} | {t} | {key} | {metric} | {d['diff']:+.2f} "
                        f"[{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] | "
                        f"{d['p_not_better']:.3f} |"
                    )
    return lines if len(lines) > 2 else []


def setting_notes(results: dict, ec: EvaluateConfig) -> list[str]:
    """Per task: the rows scored, the shot pool, the protocols, and how that differs from the
    published setting."""
    out = []
    for t, v in results["tasks"].items():
        tc = ec.tasks[t]
        rej = sum(v["rejects"].values())
        draws = len(v.get("shots") or [])
        how = (
            f" ({draws} draws of shots, each the same for every row)"
            if draws > 1
            else " (every row its own shots)"
            if tc.shot_mode == "per_row" and tc.shots and v["kind"] != "squad"
            else ""
        )
        base = (
            f"- **{t}**: {v['rows']} rows scored, shot pool {v['pool_rows']} rows, {tc.shots}-shot{how}, "
            f"protocols {', '.join(tc.protocols)}, prompt wordings {tc.prompts or 'all'}"
            + (f", {rej} rejects {v['rejects']}" if rej else "")
            + "."
        )
        if v["kind"] == "squad" and v["rows"] < FULL_SQUAD_IT_TEST:
            base += (
                f" Differs from the published setting: {v['rows']} questions of `{os.path.basename(tc.path)}` "
                f"(the shared file holds the test set's first 6 articles), not the {FULL_SQUAD_IT_TEST:,} "
                "of the full test set."
            )
        elif v["kind"] == "sentipolc":
            base += (
                " Differs from the published setting, as far as it is known: only the `test` rows are scored "
                "(the `train` rows are the shot pool); the seed reports no split."
            )
        elif v["kind"] in ("ami2020", "ironita"):
            base += (
                f" Differs from the published setting: {v['pool_rows']} rows are held out as the shot pool, "
                "so not every row of the file is scored."
            )
        out.append(base)
    return out


def _file_name(path: str) -> str:
    """A file's name without its compression suffix: ``squad.json`` for ``s3://b/x/squad.json.gz``."""
    name = posixpath.basename(path.rstrip("/"))
    stem, ext = posixpath.splitext(name)
    return stem if ext.lower() in COMPRESSION_SUFFIXES else name


def contamination_table(results: dict, ec: EvaluateConfig) -> list[str]:
    """Per model trained by cerbero-ray (its card or its run's ``summary.json`` says what its data
    was checked against, ``data.decontaminate.paths``: :func:`cerbero_ray.tracking.training_data_of`),
    per task: whether the task's file (by its contents' :func:`cerbero_ray.inputs.digest`), or a file
    of its name, was among them, and how many training documents it cost. A figure of a model whose
    data was not checked may count test items it memorised."""
    records = results.get("training_data") or {}
    if not records:
        return []
    tasks = list(results["tasks"])
    rows = ["| Model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for model, data in records.items():
        dedup = data.get("dedup") or {}
        sets, hashes = dedup.get("evaluation_sets") or {}, dedup.get("evaluation_sha256") or {}
        by_hash = {hashes[p]: n for p, n in sets.items() if p in hashes}
        by_name = {_file_name(p): (n, hashes.get(p)) for p, n in sets.items()}
        cells = []
        for t in tasks:
            mine = results["tasks"][t].get("file_sha256")
            named = by_name.get(_file_name(ec.tasks[t].path)) if t in ec.tasks else None
            if mine and mine in by_hash:
                cells.append(f"checked ({by_hash[mine]:,} dropped)")
            elif named is None:
                cells.append("not checked")
            elif named[1] and mine:  # the same name, other contents: another version of the set
                cells.append(f"another {_file_name(ec.tasks[t].path)} checked ({named[0]:,} dropped)")
            else:  # a record without hashes: by name
                cells.append(f"checked, by name ({named[0]:,} dropped)")
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return [
        *rows,
        "",
        '"checked": the model\'s training data was checked against this very file (the same contents, '
        "compressed or not: the data stage's `data.decontaminate.paths`); its documents sharing a passage with the "
        "test set (`data.decontaminate.ngram` words, 13 by default), or holding one of its short texts whole, were "
        'dropped before training. "another … checked": a file of that name with other contents (another version '
        'of the set). "not checked": the figure may count test items the model memorised. Models without a '
        "cerbero-ray training record (a base model, a file made elsewhere) are not listed.",
    ]


def markdown(results: dict, ec: EvaluateConfig) -> str:
    published = ec.published
    out = ["# Evaluation", ""]
    kinds = results.get("model_kinds", {})
    if kinds:
        out += ["Models: " + ", ".join(f"{m} ({k})" for m, k in kinds.items()) + ".", ""]
    sq = squad_table(results, published)
    if sq:
        out += ["## SQuAD-it (greedy; EM/F1 as the official SQuAD v1.1 script, %; 95% bootstrap interval)", "", *sq, ""]
    for metric, title in TITLES.items():
        ev = evalita_table(results, published, metric)
        if len(ev) > 2:
            out += [f"## EVALITA ({title}, %; first prompt wording, 95% bootstrap interval)", "", *ev, ""]
    for title, table in (
        ("Training data and these test sets", contamination_table(results, ec)),
        ("Answers not read as a label, and prompts cut to fit", counts_table(results)),
        ("Prompt sensitivity (over the shipped wordings)", prompts_table(results)),
        ("Shot draws (first wording: each draw's shots and figure)", draws_table(results)),
        ("Each model against the first (paired bootstrap, same rows)", paired_table(results)),
    ):
        if table:
            out += [f"## {title}", "", *table, ""]
    out += ["## What was scored", "", *setting_notes(results, ec), ""]
    if results["skipped_tasks"]:
        out += [f"Skipped (no file): {', '.join(results['skipped_tasks'])}.", ""]
    out += [
        "Protocols: `generate` and `score` are ours (README, Evaluation): yes/no questions in the cerbero chat, "
        "the answer's first word read as si/no (`unparsed` when neither, then mapped to the nearest label), or the "
        "log-probability of si/no; `benchita` follows the authors' later public harness (upper-case labels, prefix "
        "matching, classification_report; SQuAD v2 metric on the first gold answer). The seed describes none of its "
        "protocols. Published rows are the seed's README figures; it does not say which F1 they are (mistral-7b's "
        "identical 34.16 on AMI 2020 and IronITA, two nearly balanced sets, reads like the macro-F1 of a near-constant "
        "predictor), so they stand beside both F1 tables. Intervals: 95% percentile bootstrap over the scored rows, "
        f"{results.get('bootstrap', 0)} resamples, seed {results['seed']}.",
        "",
    ]
    return "\n".join(out)


def chart(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bars = []
    for model, res in results["results"].items():
        for t, units in res.items():
            for proto in PROTOCOLS:
                u = _first(units, proto)
                if u is not None:
                    metric = "f1" if u.get("f1") is not None else "macro_f1"
                    ci = (u.get("ci") or {}).get(metric)
                    bars.append((t, f"{model} ({proto})", u.get(metric), ci))
    tasks = list(dict.fromkeys(b[0] for b in bars))
    series = list(dict.fromkeys(b[1] for b in bars))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(tasks) + 2), 4), dpi=120)
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        vals = [next((b for b in bars if b[0] == t and b[1] == s), (t, s, 0, None)) for t in tasks]
        heights = [v[2] or 0 for v in vals]
        err = np.array([[h - v[3][0], v[3][1] - h] if v[3] else [0, 0] for h, v in zip(heights, vals)]).T
        ax.bar(np.arange(len(tasks)) + i * width, heights, width, label=s, yerr=err, capsize=2)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(series) - 1) / 2, tasks)
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=6)
    ax.set_title("evaluation: F1 per task, 95% intervals (EVALITA benchita: macro-F1)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


HEADLINE = {"squad": (("generate", "f1"),), "evalita": (("score", "macro_f1"), ("generate", "macro_f1"))}
SHORT = {"f1": "F1", "macro_f1": "macro-F1"}


def headline(results: dict, md_path: str) -> str:
    """What the console shows: one row per model, the main figure of each task (SQuAD-it: F1 of
    ``generate``; EVALITA: macro-F1 of ``score``, else ``generate``) on the first wording with its
    interval, and where every table is."""
    cols = []  # (task, protocol, metric) of the first model that has one
    for t, info in results["tasks"].items():
        for proto, metric in HEADLINE["squad" if info["kind"] == "squad" else "evalita"]:
            if any(_first(r.get(t, {}), proto) for r in results["results"].values()):
                cols.append((t, proto, metric))
                break
    lines = [
        "[evaluate] main figures (first prompt wording, %, 95% bootstrap interval):",
        "| Model | " + " | ".join(f"{t} {SHORT[m]} ({p})" for t, p, m in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for model, res in results["results"].items():
        lines.append(f"| {model} | " + " | ".join(_ci(_first(res.get(t, {}), p), m) for t, p, m in cols) + " |")
    return "\n".join(lines + [f"[evaluate] every table (protocols, wordings, baselines, published rows): {md_path}"])


def write_report(results: dict, ec: EvaluateConfig) -> dict:
    """``results.md`` and ``results.png`` under ``evaluate.output_dir``; prints the headline table."""
    out = ec.output_dir
    md = markdown(results, ec)
    storage.write_bytes(storage.join(out, "results.md"), md.encode())
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "results.png")
        chart(results, local)
        storage.upload_file(local, storage.join(out, "results.png"))
    log.info(headline(results, storage.join(out, "results.md")))
    return {
        "results_md": storage.join(out, "results.md"),
        "results_png": storage.join(out, "results.png"),
        "results_json": storage.join(out, "results.json"),
    }

"""The evaluation report: ``results.json`` -> Markdown table and PNG plots.

``write(results, out_dir)`` writes ``results.json``, ``report.md``, ``pareto.png`` (forget
efficacy against utility, the Pareto front drawn through the configurations no other beats
on both) and ``latency.png`` (TTFT and TPOT per configuration); given a run's results (which
carry the per-sample log under :data:`SAMPLES_KEY`) also ``samples.jsonl`` (one JSON line
per generated answer, like lm-evaluation-harness's ``--log_samples``) and
``TOFU_SUMMARY.json`` (per configuration, the figures open-unlearning also reports, under
its names: :data:`OPEN_UNLEARNING_KEYS`, :func:`tofu_summary`). ``markdown(results)`` is the
table alone, which the README embeds, with its notes: a figure a configuration reports as
not applicable (None, its reason in the row's ``not_applicable``) reads ``n/a [k]``, the
reason as note k under the table, followed by the items each configuration's teacher-forced
figures left out (``excluded_rows``: the token filter bans their answer; ``skipped_rows``:
an answer longer than the scoring length).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = (  # (key, header, kind)
    ("forget_accuracy", "forget acc", "pct"),
    ("paraphrase_accuracy", "paraphrase acc", "pct"),
    ("leak_rate", "leak rate (all probes)", "pct"),
    ("retain_accuracy", "retain acc", "pct"),
    ("world_accuracy", "world acc", "pct"),
    ("retain_attack_accuracy", "retain acc under attack", "pct"),
    ("rougeL_recall_forget", "ROUGE-L forget", "num"),
    ("fluency_forget", "fluency forget", "num"),
    ("fluency_retain", "fluency retain", "num"),
    ("truth_ratio_forget", "truth ratio forget", "num"),
    ("forget_quality", "forget quality", "sci"),
    ("model_utility", "model utility", "num"),
    ("ttft_ms", "TTFT ms", "ms"),
    ("tpot_ms", "TPOT ms", "ms"),
    ("too_long_skipped", "probes too long", "int"),
)


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "int":
        return str(v)
    if kind == "ms":
        return f"{v:.1f}"
    if kind == "sci":
        return f"{v:.2g}"
    return f"{v:.3f}"


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats on both coordinates (higher is better)."""
    front = []
    for name, (x, y) in points.items():
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for n2, (x2, y2) in points.items() if n2 != name):
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def _efficacy(r: dict) -> float | None:
    v = r.get("leak_rate")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        v = r.get("forget_accuracy")
    return None if v is None else 1.0 - v


def _ratio(r: dict, ref: dict | None, key: str) -> str:
    """A configuration's latency as a multiple of the unguarded model's, measured in the same run."""
    if not ref or not r.get(key) or not ref.get(key):
        return "–"
    return f"{r[key] / ref[key]:.2f}×"


def _cell(r: dict, key: str, kind: str, notes: dict[str, list[str]]) -> str:
    """The formatted figure, or ``n/a [k]`` for a figure the row reports as not applicable
    (``k`` numbers its reason in ``notes``: reason -> where it applies)."""
    reason = (r.get("not_applicable") or {}).get(key)
    if r.get(key) is not None or not reason:
        return _fmt(r.get(key), kind)
    notes.setdefault(reason, [])
    return f"n/a [{list(notes).index(reason) + 1}]"


def _cells(name: str, r: dict, columns, notes: dict[str, list[str]]) -> list[str]:
    """The row's figures for ``columns``, each n/a one recorded in ``notes`` (reason -> where)."""
    cells = []
    for key, header, kind in columns:
        cells.append(_cell(r, key, kind, notes))
        if cells[-1].startswith("n/a"):
            notes[r["not_applicable"][key]].append(f"`{name}` {header}")
    return cells


def _row_counts(configs: dict, field: str) -> list[str]:
    """``config: figure n, ...`` for every configuration with a nonzero count in ``field``."""
    out = []
    for name, r in configs.items():
        counts = {k: v for k, v in (r.get(field) or {}).items() if v}
        if counts:
            out.append(f"`{name}`: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return out


def markdown(results: dict) -> str:
    configs = results["configs"]
    ref = configs.get("none")
    lines = ["| configuration | " + " | ".join(h for _, h, _ in COLUMNS) + " | TTFT ÷ none | TPOT ÷ none |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    notes: dict[str, list[str]] = {}
    for name, r in configs.items():
        cells = _cells(name, r, COLUMNS, notes)
        lines.append(f"| `{name}` | " + " | ".join(cells)
                     + f" | {_ratio(r, ref, 'ttft_ms')} | {_ratio(r, ref, 'tpot_ms')} |")
    if notes:
        lines += ["", "Not applicable (n/a):", ""]
        lines += [f"- [{i}] {reason} ({', '.join(where)})." for i, (reason, where) in enumerate(notes.items(), start=1)]
    excluded, skipped = _row_counts(configs, "excluded_rows"), _row_counts(configs, "skipped_rows")
    if excluded:
        lines += ["", "Items left out of teacher-forced figures because the token filter bans their answer "
                      "(probability 0 by construction): " + "; ".join(excluded) + "."]
    if skipped:
        lines += ["", "Items not scored teacher-forced because an answer alone is longer than the scoring length: "
                  + "; ".join(skipped) + "."]
    kinds = sorted({k for r in configs.values() for k in (r.get("leak_by_kind") or {})},
                   key=lambda k: (k not in ("direct", "paraphrase"), k))
    if kinds:
        lines += ["", "Leak rate by probe kind:", "",
                  "| kind | " + " | ".join(f"`{n}`" for n in configs) + " |",
                  "|---|" + "---|" * len(configs)]
        for k in kinds:
            lines.append(f"| {k} | " + " | ".join(_fmt((r.get("leak_by_kind") or {}).get(k), "pct")
                                                 for r in configs.values()) + " |")
    extra = [t for t in (adapter_markdown(results), relearn_markdown(results), mia_markdown(results),
                         overlap_markdown(results), sequential_markdown(results),
                         sequential_adapters_markdown(results)) if t]
    return "\n".join(lines) + "".join(f"\n\n{t}" for t in extra)


def relearn_markdown(results: dict) -> str:
    """Relearning, on weights and in context, in one table: for adapters, forget accuracy on the
    test rows before and after fine-tuning the merged model on the other forget rows (the retain
    model's row is the floor: what the fine-tuning alone teaches); for every configuration, the
    leak rate of the many-shot probes (the facts given back in the prompt). Empty when the run
    did no weight relearning."""
    meta = results.get("meta", {}).get("relearn")
    if not meta:
        return ""
    lines = [f"Relearning: weights (the adapter merged, then {meta['steps']} steps of full fine-tuning, lr "
             f"{meta['lr']:g}, on every {meta['share']}th forget row; forget accuracy on the other rows before and "
             "after) and in context (leak rate of the many-shot probes):", "",
             "| model | forget acc before | after relearning | many-shot leak |", "|---|---|---|---|"]
    ref = meta.get("retain_model")
    if ref:
        lines.append(f"| retain model | {_fmt(ref['forget_accuracy_before'], 'pct')} | "
                     f"{_fmt(ref['forget_accuracy_after'], 'pct')} | – |")
    for name, r in results["configs"].items():
        w = r.get("relearn") or {}
        lines.append(f"| `{name}` | {_fmt(w.get('forget_accuracy_before'), 'pct')} | "
                     f"{_fmt(w.get('forget_accuracy_after'), 'pct')} | "
                     f"{_fmt((r.get('leak_by_kind') or {}).get('many_shot'), 'pct')} |")
    return "\n".join(lines)


def overlap_markdown(results: dict) -> str:
    """The overlap queries (a forget person and a retain person or world fact in one question):
    both halves per configuration, or "" when the run asked none."""
    rows = {n: r["overlap"] for n, r in results["configs"].items() if r.get("overlap")}
    if not rows:
        return ""
    n = next(iter(rows.values()))["queries"]
    lines = [f"Overlapping forget and retain ({n} questions that ask about a forget person and, in the same message, "
             "a retain person or a world fact, both orders): the share of answers that state the forget fact, and of "
             "those that state the other one (÷ none: as a share of the unguarded figure):", "",
             "| configuration | forget-half leak | retain-half accuracy | ÷ none |", "|---|---|---|---|"]
    for name, o in rows.items():
        lines.append(f"| `{name}` | {_fmt(o.get('forget_half_leak'), 'pct')} | {_fmt(o.get('retain_half_accuracy'), 'pct')} | "
                     f"{_fmt(o.get('retain_half_accuracy_ratio'), 'pct')} |")
    return "\n".join(lines)


MIA_NAMES = {"loss": "LOSS", "zlib": "Zlib", "min_k": "Min-K%", "min_k_plus_plus": "Min-K%++"}


def mia_markdown(results: dict) -> str:
    """The membership-inference table (AUC per attack, forget texts against held-out texts),
    the retain model's row first: the figure an unlearned model should match. Empty when the
    run had no texts for it."""
    meta = results.get("meta", {}).get("mia")
    if not meta:
        return ""
    methods = list(MIA_NAMES)
    lines = [f"Membership inference (ROC AUC, {meta['members']} forget texts against {meta['nonmembers']} held-out "
             "texts; 0.5 = chance; an unlearned model should match the retain model; `refused`: the share of "
             "forget / held-out prompts the guard refuses to score):", "",
             "| model | " + " | ".join(MIA_NAMES[m] for m in methods) + " | refused |",
             "|---" * (len(methods) + 2) + "|"]
    ref = meta.get("retain_model_auc")
    if ref:
        lines.append("| retain model | " + " | ".join(_fmt(ref.get(m), "num") for m in methods) + " | – |")
    for name, r in results["configs"].items():
        if "mia_refused" not in r:
            continue
        auc, refused = r.get("mia") or {}, r["mia_refused"]
        cells = [_fmt(auc.get(m), "num") if auc else "n/a" for m in methods]
        lines.append(f"| `{name}` | " + " | ".join(cells)
                     + f" | {refused['members']:.0%} / {refused['nonmembers']:.0%} |")
    return "\n".join(lines)


def adapter_markdown(results: dict) -> str:
    """The adapter rows' training time and quantization attack, or "" when there are none."""
    rows = {n: r for n, r in results["configs"].items() if n.startswith("adapter:")}
    if not rows:
        return ""
    bits = sorted({int(k[len("forget_accuracy_"):-3]) for r in rows.values() for k in (r.get("quantization") or {})
                   if k.startswith("forget_accuracy_") and k.endswith("bit")}, reverse=True)
    head = ["adapter", "train time", "forget acc (merged)"] + [f"forget acc {b}-bit" for b in bits] \
        + [f"forgetting kept {b}-bit" for b in bits]
    lines = ["Adapters: training time and the quantization attack (the adapter merged into the weights, rounded "
             "per output channel, asked the forget questions again; forgetting kept = the drop below the base "
             "model's forget accuracy that survives rounding):", "",
             "| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for name, r in rows.items():
        q = r.get("quantization") or {}
        t = r.get("train_seconds")
        cells = [f"`{name}`", "–" if t is None else f"{t:.0f} s", _fmt(q.get("forget_accuracy_merged"), "pct")]
        cells += [_fmt(q.get(f"forget_accuracy_{b}bit"), "pct") for b in bits]
        cells += [_fmt(q.get(f"forgetting_kept_{b}bit"), "pct") for b in bits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(results: dict) -> str:
    meta = results.get("meta", {})
    points = {n: (_efficacy(r), r.get("retain_accuracy")) for n, r in results["configs"].items()
              if _efficacy(r) is not None and r.get("retain_accuracy") is not None}
    probes = meta.get("forget_probes") or {}
    head = [
        "# guardserve evaluation",
        "",
        f"Dataset `{meta.get('dataset')}`, model `{meta.get('model')}`"
        + (f", retain model `{meta['retain_model']}`" if meta.get("retain_model") else "") + ".",
        f"{meta.get('forget_items')} forget, {meta.get('retain_items')} retain and {meta.get('world_items')} "
        f"world-fact questions; {sum(probes.values())} forget probes over {len(probes)} attack kinds, plus the direct "
        f"and paraphrased questions; {meta.get('retain_probes')} retain probes. Greedy, {meta.get('max_tokens')} new "
        f"tokens. Latency: {meta.get('latency', {}).get('requests')} requests one at a time, "
        f"{meta.get('latency', {}).get('tokens')} tokens each, on {meta.get('machine')}.",
        "",
        "Forget accuracy, leak rate: lower is better. Retain/world accuracy, model utility, forget quality: "
        "higher is better. `fluency`: generation entropy of the answers (bits; ROME/RWKU), lower than `none`'s "
        "when a guard makes the model repeat itself. `retain acc under attack`: retain facts asked through the attack templates. "
        "`probes too long`: probes that no longer fit the model's context once the configuration rewrote them "
        "(ICUL adds an instruction and demonstrations); a server answers those with HTTP 400, and they are left "
        "out of the rates. `n/a`: not applicable, the reason in the note it points to (a probability-based figure "
        "over items whose answer the token filter bans would be the filter's penalty, not a measurement).",
        "",
        markdown(results),
        "",
        "Pareto front (forget efficacy = 1 − leak rate vs retain accuracy): "
        + ", ".join(f"`{n}`" for n in pareto_front(points)) + ".",
        "",
        "![forget vs utility](pareto.png)",
        "![latency](latency.png)",
    ]
    return "\n".join(head) + "\n"


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    written = []
    points = {n: (_efficacy(r), r.get("retain_accuracy")) for n, r in configs.items()
              if _efficacy(r) is not None and r.get("retain_accuracy") is not None}
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    groups: dict[tuple, list[str]] = {}
    for n, xy in points.items():
        groups.setdefault((round(xy[0], 3), round(xy[1], 3)), []).append(n)
    markers = "osD^v<>pPX*h"
    for i, ((x, y), names) in enumerate(sorted(groups.items())):
        # Coincident configurations share one marker; the legend names them.
        ax.scatter(x, y, s=50, marker=markers[i % len(markers)], label=", ".join(names), zorder=3)
    front = pareto_front(points)
    if len({points[n] for n in front}) > 1:
        ax.plot([points[n][0] for n in front], [points[n][1] for n in front], "k--", lw=1, label="Pareto front")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    ax.set_xlabel("forget efficacy (1 − leak rate over all probes)")
    ax.set_ylabel("retain accuracy")
    ax.set_title("Forgetting vs utility")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    written.append(out / "pareto.png")

    names = [n for n, r in configs.items() if r.get("tpot_ms") is not None]
    if names:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [configs[n]["ttft_ms"] for n in names], 0.4, label="TTFT (ms)")
        ax.bar([x + 0.2 for x in xs], [configs[n]["tpot_ms"] for n in names], 0.4, label="TPOT (ms)")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("milliseconds")
        ax.set_title("Latency per configuration (one request at a time)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=120)
        plt.close(fig)
        written.append(out / "latency.png")

    steps = (results.get("sequential") or {}).get("steps") or []
    if steps:
        fig, (acc, cost) = plt.subplots(1, 2, figsize=(10, 4))

        def panel(ax, series, ylabel):
            for key, label in series:
                pts = [(s["targets"], s[key]) for s in steps if s.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
            ax.set_xscale("log")
            ax.set_xlabel("targets registered")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)

        panel(acc, (("forget_accuracy", "forget (registered)"), ("pending_forget_accuracy", "forget (not yet)"),
                    ("retain_accuracy", "retain"), ("world_accuracy", "world facts")), "accuracy")
        acc.set_ylim(-0.05, 1.05)
        panel(cost, (("tpot_ms", "TPOT"), ("ttft_ms", "TTFT"), ("detect_ms", "detection")), "milliseconds")
        fig.suptitle(f"Sequential deletions through `{results['sequential']['config']}`")
        fig.tight_layout()
        fig.savefig(out / "sequential.png", dpi=120)
        plt.close(fig)
        written.append(out / "sequential.png")
    return written


def sequential_markdown(results: dict) -> str:
    """The sequential deletions, one row per step, or "" when the run did none."""
    seq = results.get("sequential")
    if not seq or not seq.get("steps"):
        return ""
    lines = [f"Sequential deletions through `{seq['config']}` (the data's targets registered first, then made-up "
             "ones; after each step, forget accuracy of the registered targets and of those not registered yet, "
             "retain and world accuracy, latency one request at a time):", "",
             "| targets | forget acc (registered) | forget acc (not yet) | retain acc | world acc | TPOT ms | TTFT ms "
             "| detect ms | register s |", "|---" * 9 + "|"]
    for s in seq["steps"]:
        lines.append(f"| {s['targets']:,} | {_fmt(s.get('forget_accuracy'), 'pct')} | "
                     f"{_fmt(s.get('pending_forget_accuracy'), 'pct')} | {_fmt(s.get('retain_accuracy'), 'pct')} | "
                     f"{_fmt(s.get('world_accuracy'), 'pct')} | {_fmt(s.get('tpot_ms'), 'ms')} | "
                     f"{_fmt(s.get('ttft_ms'), 'ms')} | {_fmt(s.get('detect_ms'), 'ms')} | {_fmt(s.get('register_s'), 'ms')} |")
    lines += ["", "![sequential deletions](sequential.png)"]
    return "\n".join(lines)


def sequential_adapters_markdown(results: dict) -> str:
    """Adapters after each deletion request, one request at a time against the union, or ""."""
    seq = results.get("sequential_adapters")
    if not seq or not seq.get("steps"):
        return ""
    lines = [f"Sequential deletions with `{seq['method']}` adapters ({seq['requests']} requests of forget people; "
             "`one at a time`: each request trained alone on the model the earlier ones left, merged; `union`: "
             "retrained from the base model on every request so far; forget accuracy over every request so far, "
             f"retain accuracy over {seq.get('retain_probe', '–')} retain questions):", "",
             "| requests | forget rows | forget acc: one at a time / union | retain acc: one at a time / union "
             "| world acc: one at a time / union | train s: one at a time / union |", "|---" * 6 + "|"]
    for s in seq["steps"]:
        one, union = s["sequential"], s["union"]
        cells = [" / ".join(_fmt(r.get(key), "pct") for r in (one, union))
                 for key in ("forget_accuracy", "retain_accuracy", "world_accuracy")]
        cells.append(f"{one['train_s']:.0f} / {union['train_s']:.0f}")
        lines.append(f"| {s['requests']} | {s['forget_rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


README_BEGIN = "<!-- eval:begin -->"
README_END = "<!-- eval:end -->"


def readme_markers(results: dict) -> tuple[str, str]:
    """README's markers for a results document: ``eval`` for the default demo model (and any
    model of your own), ``eval-<variant>`` for another demo variant (``meta.demo_variant``)."""
    variant = results.get("meta", {}).get("demo_variant")
    if variant in (None, "bpe4k"):
        return README_BEGIN, README_END
    return f"<!-- eval-{variant}:begin -->", f"<!-- eval-{variant}:end -->"
README_COLUMNS = (  # (key, header, kind): the README's short table; report.md has every column
    ("forget_accuracy", "forget acc", "pct"),
    ("paraphrase_accuracy", "paraphrase acc", "pct"),
    ("leak_rate", "leak rate", "pct"),
    ("retain_accuracy", "retain acc", "pct"),
    ("world_accuracy", "world acc", "pct"),
    ("model_utility", "model utility", "num"),
)


def readme_section(results: dict, source: str = "docs/eval/demo/results.json") -> str:
    """README's evaluation table, from a results document: the body between
    :data:`README_BEGIN` and :data:`README_END`."""
    configs = results["configs"]
    ref = configs.get("none")
    n_probes = sum((results["meta"].get("forget_probes") or {}).values()) + 2 * results["meta"]["forget_items"]
    notes: dict[str, list[str]] = {}
    lines = [f"<!-- generated from {source} by `guardserve eval --readme` (or `python -m guardserve.eval.report "
             f"DIR --readme README.md`): edit guardserve/eval/report.py, not this text -->",
             "| configuration | " + " | ".join(h if k != "leak_rate" else f"{h} ({n_probes:,} probes)"
                                            for k, h, _ in README_COLUMNS)
             + " | fluency forget / retain | TTFT ms (÷ none) | TPOT ms (÷ none) |",
             "|---|" + "---|" * (len(README_COLUMNS) + 3)]
    for name, r in configs.items():
        cells = _cells(name, r, README_COLUMNS, notes)
        cells.append(" / ".join("–" if r.get(k) is None else f"{r[k]:.2f}" for k in ("fluency_forget", "fluency_retain")))
        for key in ("ttft_ms", "tpot_ms"):
            cells.append(f"{_fmt(r.get(key), 'ms')} ({_ratio(r, ref, key)})")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"[{i}] n/a: {reason} ({', '.join(where)})."
                         for i, (reason, where) in enumerate(notes.items(), start=1)]
    adapters = adapter_markdown(results)
    if adapters:
        lines += ["", adapters]
    return "\n".join(lines) + "\n"


def update_readme(readme: str | Path, results: dict, source: str = "docs/eval/demo/results.json") -> bool:
    """Write :func:`readme_section` into ``readme`` between the results' markers
    (:func:`readme_markers`); returns whether the file changed."""
    from guardserve.readme import update_between_markers

    return update_between_markers(Path(readme), readme_section(results, source), *readme_markers(results))


# The per-sample log in the document ``runner.run`` returns; never written into results.json.
SAMPLES_KEY = "_samples"
SAMPLES_FILE = "samples.jsonl"
# Named as open-unlearning names its evaluator's summary (``<benchmark>_SUMMARY.json``).
SUMMARY_FILE = "TOFU_SUMMARY.json"

# open-unlearning's TOFU metric keys (the names its TOFU_SUMMARY.json uses) -> where a
# results.json row holds the guardserve figure of the same meaning. The world-fact
# probability is ``wf_Q_A_Prob_normalised`` where it was normalised over the wrong options
# (the world items have perturbed answers, so the row also has ``world_truth_ratio``), else
# ``wf_Q_A_Prob``. Keys guardserve does not compute are not written (docs/evaluation.md
# lists them).
OPEN_UNLEARNING_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("forget_quality", ("forget_quality",)),
    ("forget_truth_ratio", ("truth_ratio_forget",)),
    ("forget_Q_A_ROUGE", ("rougeL_recall_forget",)),
    ("model_utility", ("model_utility",)),
    ("retain_Q_A_Prob", ("utility", "retain_probability")),
    ("retain_Q_A_ROUGE", ("utility", "retain_rougeL")),
    ("retain_Truth_Ratio", ("utility", "retain_truth_ratio")),
    ("wf_Q_A_Prob", ("utility", "world_probability")),
    ("wf_Q_A_Prob_normalised", ("utility", "world_probability")),
    ("wf_Q_A_ROUGE", ("utility", "world_rougeL")),
    ("wf_Truth_Ratio", ("utility", "world_truth_ratio")),
    ("ra_Q_A_Prob", ("utility", "real_authors_probability")),
    ("ra_Q_A_Prob_normalised", ("utility", "real_authors_probability")),
    ("ra_Q_A_ROUGE", ("utility", "real_authors_rougeL")),
    ("ra_Truth_Ratio", ("utility", "real_authors_truth_ratio")),
)


def _lookup(row: dict, path: tuple[str, ...]):
    for key in path:
        row = row.get(key) if isinstance(row, dict) else None
    return row


def tofu_summary(results: dict) -> dict[str, dict[str, float]]:
    """Per configuration, ``{open-unlearning key: value}`` (the content of open-unlearning's
    ``TOFU_SUMMARY.json`` for one model), values as results.json has them. A figure that is
    null (not applicable) or NaN is left out, as open-unlearning leaves out a metric without
    a value; keys sorted, as it writes them."""
    out: dict[str, dict[str, float]] = {}
    for name, row in results["configs"].items():
        utility = row.get("utility") or {}
        # The probability open-unlearning names "_normalised" where it is normalised over the
        # wrong options (the items have perturbed answers, so the row has their truth ratio).
        skip = {("wf_Q_A_Prob" if "world_truth_ratio" in utility else "wf_Q_A_Prob_normalised"),
                ("ra_Q_A_Prob" if "real_authors_truth_ratio" in utility else "ra_Q_A_Prob_normalised")}
        summary = {}
        for key, path in OPEN_UNLEARNING_KEYS:
            if key in skip:
                continue
            v = _lookup(row, path)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                summary[key] = v
        out[name] = dict(sorted(summary.items()))
    return out


def write_summary(results: dict, out: str | Path) -> Path:
    """``out/TOFU_SUMMARY.json``: :func:`tofu_summary` of ``results``."""
    path = Path(out) / SUMMARY_FILE
    path.write_text(json.dumps(tofu_summary(results), indent=2) + "\n")
    return path


def write_samples(samples, path: str | Path) -> Path:
    """One JSON object per line, written as it goes (a reader can stream it line by line)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for record in samples:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write(results: dict, out: str | Path) -> list[Path]:
    """results.json, report.md and the plots; for a run's results (those carrying the
    per-sample log under :data:`SAMPLES_KEY`, which results.json leaves out) also
    samples.jsonl and TOFU_SUMMARY.json. ``results`` itself is not changed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = results.get(SAMPLES_KEY)
    results = {k: v for k, v in results.items() if k != SAMPLES_KEY}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(results))
    paths = [out / "results.json", out / "report.md", *plots(results, out)]
    if samples is not None:
        paths += [write_samples(samples, out / SAMPLES_FILE), write_summary(results, out)]
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m guardserve.eval.report DIR [--readme README.md]``: render DIR/report.md, the
    plots and DIR/TOFU_SUMMARY.json again from DIR/results.json (DIR/samples.jsonl, which
    results.json does not hold, stays as the run wrote it), and README's evaluation table
    with ``--readme``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m guardserve.eval.report", description=main.__doc__)
    p.add_argument("dir", help="a folder holding results.json (what `guardserve eval --out DIR` wrote)")
    p.add_argument("--readme", metavar="PATH", default=None, help="also write README's evaluation table into PATH")
    args = p.parse_args(argv)
    src = Path(args.dir) / "results.json"
    if not src.is_file():
        p.error(f"no results.json in {args.dir}")
    results = json.loads(src.read_text())
    for path in [*write(results, args.dir), write_summary(results, args.dir)]:
        print(f"wrote {path}")
    if args.readme:
        changed = update_readme(args.readme, results, str(src))
        print(f"{'updated' if changed else 'unchanged'}: {args.readme} (evaluation table)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


"""Markdown from the benchmarks' JSON: one renderer per result file, the report, and the
README's generated performance section.

Each renderer takes the JSON a benchmark wrote and returns Markdown: the key ratios
first (a bullet list), then the table. Standard library only, so that rendering needs
neither torch nor vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from guardserve import readme

README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"


@dataclass
class Section:
    title: str
    key: list[str] = field(default_factory=list)  # the headline ratios, one bullet each
    tables: list[str] = field(default_factory=list)
    note: str = ""

    def markdown(self, level: int = 2, tables: bool = True) -> str:
        out = [f"{'#' * level} {self.title}", ""]
        if self.note:
            out += [self.note, ""]
        out += [f"- {k}" for k in self.key]
        if tables:
            for t in self.tables:
                out += ["", t]
        return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- formatting
def _x(v: float | None) -> str:
    """A ratio: 0.18, 6.7, 122, 11,593."""
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _n(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{round(100 * v + 1e-9, 1):.1f}%"  # 0.6375 → 63.8%, not 63.7%


def _range(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return f"{_x(lo)}×" if _x(lo) == _x(hi) else f"{_x(lo)}–{_x(hi)}×"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "|".join("---" for _ in header)
    lines = ["| " + " | ".join(header) + " |", "|" + align + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _when(meta: dict | None) -> str:
    meta = meta or {}
    parts = []
    if meta.get("date"):
        parts.append(f"run {meta['date']}")
    if "quick" in meta:
        parts.append("`--quick` (CI size)" if meta["quick"] else "full size")
    if meta.get("cpus"):
        parts.append(f"{meta['cpus']} CPUs")
    load = meta.get("load_avg_end") or meta.get("loadavg_at_end") or meta.get("load_avg")
    if load:
        parts.append(f"load average at the end {load[0]:.1f}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- renderers
def render_logits(d: dict) -> Section:
    """guardserve.benchmarks.logits: guardserve's per-step cost vs vLLM bad_words and transformers NoBadWords."""
    cases = d["cases"]
    sizes = sorted({c["sequences"] for c in cases})
    lo, hi = sizes[0], sizes[-1]
    at = lambda n, key: [c[key] for c in cases if c["sequences"] == n]  # noqa: E731
    key = [
        f"Speed-up over vLLM `bad_words` (its µs/step ÷ guardserve's): {_range(at(lo, 'ratio_vs_vllm'))} at "
        f"{lo:,} sequences, {_range(at(hi, 'ratio_vs_vllm'))} at {hi:,} (all vocabularies and batch sizes).",
        f"Speed-up over transformers `NoBadWords`: {_range(at(lo, 'ratio_vs_transformers'))} at {lo:,} sequences, "
        f"{_range(at(hi, 'ratio_vs_transformers'))} at {hi:,}.",
    ]
    g1, g2 = d.get("growth_max_over_min_sequences") or {}, d.get("growth_one_pass") or {}
    if g1:
        key.append(f"guardserve's own cost at {hi:,} sequences ÷ at {lo:,}: {_range(list(g1.values()))} "
                   f"(default CPU path), {_range(list(g2.values()))} (one-pass kernel path).")
    if any(c.get("same_bans_as_vllm") is False for c in cases):
        key.append("**Ban sets differed from vLLM's in some cases** (`same_bans_as_vllm` false).")
    rows = [[c["vocab"], f"{c['sequences']:,}", c["batch"], _n(c["guardserve_us"]), _n(c["vllm_bad_words_us"]),
             _x(c["ratio_vs_vllm"]), _n(c["transformers_nobadwords_us"]), _x(c["ratio_vs_transformers"])]
            for c in cases]
    table = _table(["vocab", "sequences", "batch", "guardserve µs/step", "vLLM `bad_words` µs/step", "×",
                    "transformers `NoBadWords` µs/step", "×"], rows, "---|---:|---:|---:|---:|---:|---:|---:")
    meta = d.get("meta") or {}
    note = f"`python -m guardserve.benchmarks.logits` ({_when(meta)}; {meta.get('device', 'cpu')}). × = the other's time ÷ guardserve's."
    return Section("Logit filter: cost per decoding step", key, [table], note)


def render_detection(d: dict) -> Section:
    """guardserve.benchmarks.detection: detection latency and recall vs number of targets."""
    runs = sorted(d["runs"], key=lambda r: r["targets"])
    lo, hi = runs[0], runs[-1]
    key = []
    if len(runs) > 1:
        a, b = lo["latency_ms"], hi["latency_ms"]
        key.append(f"p50 latency per conversation at {hi['targets']:,} targets ÷ at {lo['targets']:,}: "
                   f"{b['p50'] / a['p50']:.2f}× ({a['p50']:.1f} → {b['p50']:.1f} ms); p99 {b['p99'] / a['p99']:.2f}×.")
    rec = [min(r["summary"]["forget_recall"], r["summary"]["paraphrase_recall"], r["summary"]["adversarial_recall"])
           for r in runs]
    fp = [max(r["summary"]["retain_fp_rate"], r["summary"]["world_facts_fp_rate"]) for r in runs]
    key.append(f"Lowest recall over forget, paraphrase and adversarial probes: {min(rec):.3f}; "
               f"highest false-positive rate (retain, world facts): {max(fp):.4f}.")
    if hi.get("throughput"):
        key.append(f"At {hi['targets']:,} targets, threads detecting at once (concurrent requests' embeddings "
                   "batched together): " + ", ".join(
                       f"{t['concurrency']}: {t['conversations_per_s']:,.0f} conversations/s, p50 {t['p50_ms']:.1f} ms"
                       for t in hi["throughput"]) + ".")
    peer = hi.get("peer")
    if peer:
        ps, own = peer["summary"], d.get("embedder_backend", "served")
        key.append(f"Same run, at {hi['targets']:,} targets, the {own} reader ÷ the {peer['embedder_backend']} reader: "
                   f"p50 {hi['latency_ms']['p50'] / peer['latency_ms']['p50']:.2f}× "
                   f"({peer['latency_ms']['p50']:.1f} → {hi['latency_ms']['p50']:.1f} ms); conversations/s " + ", ".join(
                       f"{t['concurrency']} threads {t['conversations_per_s'] / q['conversations_per_s']:.2f}×"
                       for t, q in zip(hi.get("throughput") or [], peer.get("throughput") or []))
                   + f"; {peer['embedder_backend']}'s lowest recall "
                   f"{min(ps['forget_recall'], ps['paraphrase_recall'], ps['adversarial_recall']):.3f}, "
                   f"highest false-positive rate {max(ps['retain_fp_rate'], ps['world_facts_fp_rate']):.4f}.")
    rows = []
    for r in runs:
        s, lat, sets = r["summary"], r["latency_ms"], r.get("sets", {})
        n_ret = (sets.get("retain", {}).get("n", 0) + sets.get("retain_paraphrase", {}).get("n", 0)) or None
        rows.append([f"{r['targets']:,}", f"{s['forget_recall']:.3f}", f"{s['paraphrase_recall']:.3f}",
                     f"{s['adversarial_recall']:.3f}",
                     f"{s['retain_fp_rate']:.4f}" + (f" ({n_ret:,})" if n_ret else ""), f"{s['world_facts_fp_rate']:.4f}",
                     f"{lat['p50']:.1f} / {lat['p99']:.1f}",
                     "IVF (approx.)" if r.get("approximate_index") else ("flat" if r.get("embeddings") else "lexical only")])
    table = _table(["targets", "forget recall", "paraphrase recall", "adversarial recall", "retain FP", "world-facts FP",
                    "p50 / p99 ms", "index"], rows)
    machine = d.get("machine") or {}
    note = f"`python -m guardserve.benchmarks.detection` ({_when(machine)})."
    return Section("Detection: latency and recall vs number of targets", key, [table], note)


def render_serving(d: dict) -> Section:
    """guardserve.benchmarks.serving: TTFT/TPOT of the guarded server vs plain vLLM."""
    meta = d["meta"]
    key = []
    labels = {"retain": "no target triggered (retain questions)",
              "forget": "target triggered (forget questions: detection + ICUL + filter)",
              "forget_first": "first request about each target (its filter is compiled)",
              "forget_vs_icul": "target triggered, against plain vLLM given the same ICUL prompts (the guard's "
                                "cost beyond the longer prompt that in-context unlearning writes)"}
    for case, label in labels.items():
        rs = [r for r in d["ratios"] if r["set"] == case]
        if not rs:
            continue
        parts = [f"c={r['concurrency']}: " + ", ".join(f"{m.upper()} p50 {_x(r[m + '_p50'])}×" for m in ("ttft", "tpot")
                                                         if r.get(m + "_p50") is not None) for r in rs]
        key.append(("Guarded" if case == "forget_vs_icul" else "Guarded ÷ plain vLLM") + f", {label}: "
                   + "; ".join(parts) + ".")
    tokens = {}
    for c in d["cells"]:
        if c.get("prompt_tokens_mean") is not None and c["set"] in ("forget", "forget_icul"):
            tokens.setdefault((c["server"], c["set"]), []).append(c["prompt_tokens_mean"])
    if ("plain", "forget_icul") in tokens:
        mean = {k: sum(v) / len(v) for k, v in tokens.items()}
        key.append("Prompt tokens per triggered request, as the engine saw them (full answers): plain vLLM "
                   f"{_n(mean.get(('plain', 'forget')), 0)}, guarded {_n(mean.get(('guarded', 'forget')), 0)}, "
                   f"plain vLLM given the ICUL prompts {_n(mean[('plain', 'forget_icul')], 0)}.")
    errors = sum(c["errors"] for c in d["cells"])
    if errors:
        key.append(f"**{errors} requests failed** (see `error_examples` in the JSON).")
    g = [c for c in d["cells"] if c["server"] == "guarded" and c["set"].startswith("forget")]
    trig = {}
    for s in d.get("servers", {}).get("guarded", []):
        for k, v in (s.get("triggered") or {}).items():
            trig[k] = trig.get(k, 0) + v
    if any(c.get("answer_accuracy") is not None for c in g):
        acc = [c["answer_accuracy"] for c in g if c["answer_accuracy"] is not None]
        plain = [c["answer_accuracy"] for c in d["cells"] if c["server"] == "plain" and c["set"].startswith("forget")
                 and c["answer_accuracy"] is not None]
        n_forget = sum(c["requests"] for c in g)
        n_retain = sum(c["requests"] for c in d["cells"] if c["server"] == "guarded" and c["set"] == "retain")
        t_forget = sum(v for k, v in trig.items() if k.startswith("forget"))
        key.append(f"Forget answers stating the fact: guarded {_pct(max(acc))} at most, plain vLLM {_pct(min(plain))} "
                   f"at least"
                   + (f"; detection (dry run afterwards) flags {t_forget} of {n_forget} forget questions and "
                      f"{trig.get('retain', 0)} of {n_retain} retain questions" if trig else "") + ".")

    def three(m: dict, digits: int) -> str:
        return f"{_n(m['p50'], digits)} / {_n(m['p90'], digits)} / {_n(m['mean'], digits)}"

    rows = []
    order = {"retain": 0, "forget": 1, "forget_icul": 2, "forget_vs_icul": 2, "forget_first": 3}
    for c in sorted(d["cells"], key=lambda c: (c["concurrency"], order.get(c["set"], 3), c["server"] != "plain")):
        name = "plain vLLM" if c["server"] == "plain" else "guarded"
        rows.append([name, c["set"], c["concurrency"], three(c["ttft_ms"], 1), three(c["tpot_ms"], 2),
                     three(c["latency_ms"], 0), _n(c["output_tokens_per_s"]), _pct(c["answer_accuracy"]),
                     f"{c['one_token_requests']} + {c['full_requests']}" if "full_requests" in c else c["requests"]])
    cells = _table(["server", "questions", "concurrency", "TTFT p50 / p90 / mean ms", "TPOT p50 / p90 / mean ms",
                    "latency p50 / p90 / mean ms", "output tok/s", "answers with the fact", "requests (one-token + full)"], rows,
                   "---|---|---:|---:|---:|---:|---:|---:|---:")

    def ratio3(r: dict, m: str) -> str:
        return f"{_x(r[m + '_p50'])} / {_x(r[m + '_p90'])} / {_x(r[m + '_mean'])}"

    rrows = [[r["case"], r["concurrency"], ratio3(r, "ttft"), ratio3(r, "tpot"), ratio3(r, "latency")]
             for r in sorted(d["ratios"], key=lambda r: (order.get(r["set"], 3), r["concurrency"]))]
    ratios = _table(["guarded ÷ plain", "concurrency", "TTFT × p50 / p90 / mean", "TPOT × p50 / p90 / mean",
                     "latency × p50 / p90 / mean"], rrows, "---|---:|---:|---:|---:")
    tables = [ratios]
    if d.get("ratios_per_round"):
        per = "; ".join(
            f"round {i + 1}: " + ", ".join(f"{r['set']} c={r['concurrency']} TTFT {_x(r['ttft_p50'])}×"
                                           + (f" TPOT {_x(r['tpot_p50'])}×" if r.get("tpot_p50") is not None else "")
                                           for r in rs)
            for i, rs in enumerate(d["ratios_per_round"]))
        tables.append(f"Guarded ÷ plain per round (p50), to judge the noise: {per}.")
    note = (f"`python -m guardserve.benchmarks.serving` ({_when(meta)}): the demo model, streaming chat completions, "
            f"{meta['requests_per_cell']} requests per cell, {meta['max_tokens']} tokens each, "
            f"{meta['rounds']} round(s) alternating plain and guarded servers with the same engine arguments "
            f"(one server at a time). TTFT: client side, on one-token answers; TPOT: vLLM's per-request time per "
            f"output token from its metrics (engine timestamps; on this tiny model the API server sends tokens in "
            f"bursts, so the client cannot time them); latency: client side, full answers. Ratios above 1 mean the "
            f"guarded server is slower.")
    return Section("Serving: guarded server vs plain vLLM", key, [*tables, cells], note)


def render_steering(d: dict) -> Section:
    """guardserve.benchmarks.steering: SAE steering quality, and decode cost in vLLM when measured."""
    base = d["unguarded"]
    key = []
    for r in d["steering"]:
        key.append(f"N={r['n']}, clamp {r['clamp']:g}: forget accuracy {_pct(base['forget_accuracy'])} → "
                   f"{_pct(r['forget_accuracy'])} ({_pct(r['forget_drop_relative'])} relative drop); retain accuracy "
                   f"when wrongly steered {_pct(r['retain_accuracy_false_trigger'])} (unsteered {_pct(base['retain_accuracy'])}); "
                   f"retain perplexity {r['retain_perplexity_false_trigger'] / base['retain_perplexity']:.2f}× when wrongly steered.")
    vq = (d.get("vllm") or {}).get("steering")
    if vq and vq.get("forget_accuracy") is not None:
        key.append(f"Through vLLM (N={d['vllm'].get('n')}, clamp {d['vllm'].get('clamp')}): forget accuracy "
                   f"{_pct(vq['forget_accuracy'])}" + (f", retain accuracy when wrongly steered "
                                                       f"{_pct(vq['retain_accuracy_false_trigger'])}"
                                                       if vq.get("retain_accuracy_false_trigger") is not None else "") + ".")
    tp = d.get("tpot")
    rows_tp = []
    if tp:
        by = tp.get("by_concurrency") or {str(tp.get("requests", "?")): tp}
        for conc, cell in by.items():
            st, un = (cell.get("steered") or {}).get("tpot_ms"), (cell.get("unsteered") or {}).get("tpot_ms")
            ref = tp.get("baseline")
            bt = (cell.get(ref) or {}).get("tpot_ms") if ref else None
            if st and un:
                key.append(f"vLLM decode cost, {conc} request(s) at once: TPOT every request steered ÷ none flagged "
                           f"{st / un:.2f}× ({un:.2f} → {st:.2f} ms)"
                           + (f"; steering on but unused ÷ `{ref}` {un / bt:.2f}×" if bt else "") + ".")
            for name in ("off", "off_eager", "unsteered", "steered"):
                if isinstance(cell.get(name), dict) and cell[name].get("tpot_ms") is not None:
                    rows_tp.append([conc, name, _n(cell[name]["tpot_ms"], 2), _n(cell[name].get("tokens_per_s"), 0)])
    if not rows_tp:
        key.append("vLLM decode cost not measured in this run (`--no-vllm`).")
    rows = [["none", "–", _pct(base["forget_accuracy"]), "–", _pct(base["paraphrase_accuracy"]), _pct(base["retain_accuracy"]),
             "–", "–", _n(base["retain_perplexity"], 3), "–"]]
    for r in d["steering"]:
        rows.append([f"N={r['n']}, clamp {r['clamp']:g}", r["layer"], _pct(r["forget_accuracy"]), _pct(r["forget_drop_relative"]),
                     _pct(r["paraphrase_accuracy"]), _pct(r["retain_accuracy_false_trigger"]), _pct(r["forget_accuracy_always"]),
                     _pct(r["retain_accuracy_always"]), _n(r["retain_perplexity_false_trigger"], 3),
                     _n(r["retain_perplexity_always"], 3)])
    table = _table(["steering", "layer", "forget acc.", "relative drop", "paraphrase acc.", "retain acc. (false trigger)",
                    "forget acc. (always)", "retain acc. (always)", "retain ppl (false trigger)", "retain ppl (always)"], rows)
    tables = [table]
    if rows_tp:
        tables.append(_table(["requests at once", "engine", "TPOT ms", "tokens/s"], rows_tp, "---:|---|---:|---:"))
    sae = d.get("sae") or {}
    note = (f"`python -m guardserve.benchmarks.steering`, transformers hook on the demo model (SAE: layer {sae.get('layer')}, "
            f"{sae.get('architecture')}, {sae.get('d_sae')} features, explained variance {sae.get('explained_variance')}).")
    return Section("SAE steering", key, tables, note)


def render_load(d: dict) -> Section:
    """guardserve.benchmarks.load_test: streaming clients while the policy changes."""
    key = [f"{d['requests']:,} requests from {d['clients']} streaming clients in {d['duration_s']} s "
           f"({d['requests_per_s']} req/s): {d['status_5xx']} 5xx, {d['leaks']} leaks in {d['forget_answers']:,} forget "
           f"answers, retain accuracy {_pct(d['retain_accuracy'])}.",
           f"TTFT p50 / p99 {_n(d['ttft_p50_ms'])} / {_n(d['ttft_p99_ms'])} ms; latency p50 / p99 "
           f"{_n(d['latency_p50_ms'])} / {_n(d['latency_p99_ms'])} ms; policy change p50 {_n(d.get('policy_change_p50_ms'))} ms "
           f"({d['policy_changes']} changes)."]
    if d.get("bulk_targets"):
        key.append(f"{d['bulk_targets']:,} targets registered in one call in {d['bulk_register_s']} s before the load.")
    rows = [[k, v] for k, v in d.items() if not k.endswith("_examples")]
    return Section("Load test" + (" with bulk registration" if d.get("bulk_targets") else ""), key,
                   [_table(["metric", "value"], rows)], "`python -m guardserve.benchmarks.load_test` (not run by `guardserve bench`).")


def render_unlearn(d: dict) -> Section:
    """guardserve.benchmarks.unlearn: training-based unlearning methods into LoRA adapters."""
    cfg = d["configs"]
    base = cfg.get("base", {})
    methods = {k: v for k, v in cfg.items() if k.startswith("adapter:")}
    key = []
    meets = [k.split(":", 1)[1] for k, v in methods.items() if v.get("meets_issue_target")]
    if methods:
        best = min(methods, key=lambda k: methods[k]["forget_accuracy"])
        b = methods[best]
        key.append(f"Lowest forget accuracy: {best.split(':', 1)[1]}, {_pct(b['forget_accuracy'])} of questions "
                   f"({b['forget_accuracy'] / base['forget_accuracy']:.2f}× the base model's) with retain accuracy "
                   f"{_pct(b['retain_accuracy'])}; forgetting kept after 4-bit: {_pct(b.get('forgetting_kept_4bit'))}.")
    key.append("Meet the issue's bar (forget ≤ 30% of base, retain ≥ 90%, ≥ 80% kept after 4-bit): "
               + (", ".join(meets) if meets else "none") + ".")
    rows = [[k.split(":", 1)[1], _pct(v["forget_accuracy"]), _n(v.get("rougeL_recall_forget"), 2), _pct(v["retain_accuracy"]),
             _pct(v.get("forgetting_kept_4bit")), _n(v.get("train_seconds"))] for k, v in methods.items()]
    table = _table(["method", "forget accuracy", "ROUGE-L recall", "retain accuracy", "forgetting kept after 4-bit",
                    "train s"], rows)
    return Section("Unlearning adapters" + (" (GU variants)" if all("+GU" in k for k in methods) and methods else ""),
                   key, [table], f"`python -m guardserve.benchmarks.unlearn`, {d.get('people')} forget people "
                                 f"(not run by `guardserve bench`).")


# file name (without .json) → renderer; the order of the report.
RENDERERS: dict[str, Callable[[dict], Section]] = {
    "serving": render_serving,
    "logits": render_logits,
    "detection": render_detection,
    "steering": render_steering,
    "load": render_load,
    "load_bulk": render_load,
    "unlearn": render_unlearn,
    "unlearn_gu": render_unlearn,
}
# What `guardserve bench` runs and the README section shows.
README_BENCHES = ("serving", "logits", "detection", "steering")


def load_results(results_dir: Path) -> dict[str, dict]:
    out = {}
    for name in RENDERERS:
        p = Path(results_dir) / f"{name}.json"
        if p.is_file():
            out[name] = json.loads(p.read_text())
    return out


def render_sections(results: dict[str, dict], names=None) -> dict[str, Section]:
    out = {}
    for name, fn in RENDERERS.items():
        if name in results and (names is None or name in names):
            out[name] = fn(results[name])
    return out


def render_report(results: dict[str, dict], failed: dict[str, str] | None = None, header: str = "") -> str:
    """bench/results/REPORT.md: one section per result file, key ratios first, then tables."""
    out = ["# guardserve benchmarks", ""]
    if header:
        out += [header, ""]
    for name, msg in (failed or {}).items():
        out += [f"- **{name} failed in this run**: {msg}"]
    if failed:
        out.append("")
    for sec in render_sections(results).values():
        out += [sec.markdown(level=2), ""]
    return "\n".join(out).rstrip() + "\n"


def render_readme_section(results: dict[str, dict], report_path: str = "bench/results/REPORT.md") -> str:
    """The body between README's markers: key ratios of each benchmark, the serving and detection tables."""
    folder = report_path.rsplit("/", 1)[0] if "/" in report_path else "."
    out = [f"<!-- generated by `guardserve bench` from {folder}/*.json: edit guardserve/benchmarks/report.py, "
           f"not this text -->",
           f"`make bench` (`guardserve bench [--quick] [--only serving,logits,detection,steering]`) runs the "
           f"benchmarks, writes their JSON and the full tables ([{report_path}]({report_path})), and regenerates "
           f"this section. Each benchmark's ratios come from one run of it, on a shared 2-core CPU machine.", ""]
    for name, sec in render_sections(results, README_BENCHES).items():
        out += [f"**{sec.title}** — {sec.note}", ""]
        out += [f"- {k}" for k in sec.key]
        out.append("")
        if name in ("serving", "detection"):
            out += [sec.tables[0], ""]
    return "\n".join(out).rstrip() + "\n"


def replace_between_markers(text: str, body: str, begin: str = README_BEGIN, end: str = README_END) -> str:
    """``guardserve.readme.replace_between_markers``, README's performance markers by default."""
    return readme.replace_between_markers(text, body, begin, end)


def update_readme(path: Path, body: str) -> bool:
    """Splice ``body`` into README's performance section; returns whether the file changed."""
    return readme.update_between_markers(path, body, README_BEGIN, README_END)

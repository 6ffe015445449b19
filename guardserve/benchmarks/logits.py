"""Per-step cost of guardserve's logits filter vs vLLM's ``bad_words`` op and
transformers' ``NoBadWordsLogitsProcessor``, on the same work.

Same work: the same forbidden token sequences (random, 1-4 tokens, seeded), the same
batch histories, the same logits; each guard bans a sequence's last token where the
history ends with the rest of it (``bad_words`` semantics; guardserve compiled with
``compile_token_sequences``). vLLM caps ``bad_words`` at 128 sequences per request, so
its op is called directly, as its sampler calls it (``apply_bad_words``).

A step = one new token per row, then one call that bans. Vocabularies are Mistral's
32k (SentencePiece ``tokenizer.model.v1``) and 131k (``tekken_240911.json``) from
``mistral_common``. Also: compile time per target (real phrases through
``compile_phrases``) and memory of the compiled automaton.

    python -m guardserve.benchmarks.logits            # full: about 4-5 min on 2 cores
    python -m guardserve.benchmarks.logits --quick    # CI size: about 20 s

Prints a Markdown table; writes ``bench/results/logits.json`` of the repository (``--out FILE``
elsewhere). ``guardserve bench`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from guardserve.benchmarks.cli import default_out
from guardserve.logits_processors.compile import (
    as_tokenizer_view,
    compile_phrases,
    compile_token_sequences,
)
from guardserve.logits_processors.core import GuardBatch

VOCABS = {"mistral-32k": "tokenizer.model.v1", "mistral-131k": "tekken_240911.json"}
TARGET = ["Ada Lovelace", "Augusta Ada King", "Countess of Lovelace", "Analytical Engine",
          "Charles Babbage", "Lord Byron", "Bernoulli numbers", "1843"]


def tokenizer(name: str):
    import mistral_common
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = Path(mistral_common.__file__).parent / "data" / VOCABS[name]
    return as_tokenizer_view(MistralTokenizer.from_file(str(path)))


def make_sequences(n: int, V: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(V) for _ in range(rng.randint(1, 4))] for _ in range(n)]


class Workload:
    """Histories that walk into forbidden prefixes half of the time, so guards see
    partial matches, not only misses."""

    def __init__(self, seqs, B: int, V: int, seed: int):
        self.rng = random.Random(seed)
        self.seqs, self.V = seqs, V
        self.prompts = [[self.rng.randrange(V) for _ in range(32)] for _ in range(B)]
        self.outputs = [[] for _ in range(B)]
        self.walk = [None] * B

    def next_tokens(self):
        for r, out in enumerate(self.outputs):
            w = self.walk[r]
            if w is None and self.rng.random() < 0.5:
                w = [self.rng.choice(self.seqs), 0]
            if w is not None and w[1] < len(w[0]) - 1:
                out.append(w[0][w[1]])
                w[1] += 1
                self.walk[r] = w
            else:
                out.append(self.rng.randrange(self.V))
                self.walk[r] = None

    def history(self, r):
        return self.prompts[r] + self.outputs[r]


def timed(fn, min_reps: int, max_reps: int, budget_s: float) -> tuple[float, int]:
    """Median seconds per call, and the number of calls made."""
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def bench_case(V, seqs, B, quick, slow_budget):
    from transformers import NoBadWordsLogitsProcessor
    from vllm.v1.sample.ops.bad_words import apply_bad_words

    wl = Workload(seqs, B, V, seed=B)
    logits = torch.randn(B, V)

    # guardserve: compile once (outside the step), then advance + apply per step.
    t0 = time.perf_counter()
    filt = compile_token_sequences(seqs, V)
    compile_s = time.perf_counter() - t0
    batch = GuardBatch("cpu")
    for r in range(B):
        batch.add(r, filt, wl.prompts[r], wl.outputs[r])
    batch.apply(logits)  # builds the bank (once per set of filters)

    def ours():
        wl.next_tokens()
        batch.apply(logits)

    ours_s, ours_n = timed(ours, 5, 200, 0.5 if quick else 1.5)
    # The same with every ban mask applied as one pass over the vocabulary (what the
    # Triton kernel does on GPU): the CPU reference otherwise writes small ban sets as
    # token lists, which makes small workloads cheaper still.
    sparse = batch._bank.masks_sparse
    batch._bank.masks_sparse = None
    dense_s, _ = timed(ours, 5, 200, 0.5 if quick else 1.5)
    batch._bank.masks_sparse = sparse

    # Same work check: after the same history, the same banned tokens.
    a = torch.zeros(B, V)
    batch.apply(a)
    b = torch.zeros(B, V)
    apply_bad_words(b, {r: seqs for r in range(B)}, [wl.history(r) for r in range(B)])
    same = bool(torch.equal(a, b))

    bad_ids = {r: seqs for r in range(B)}

    def vllm_bad_words():
        # As vLLM's sampler calls it: the live output lists (bad_words never reads
        # the prompt), one dict entry per request.
        wl.next_tokens()
        apply_bad_words(logits, bad_ids, wl.outputs)

    vllm_s, vllm_n = timed(vllm_bad_words, 1, 20, slow_budget)

    t0 = time.perf_counter()
    nbw = NoBadWordsLogitsProcessor(bad_words_ids=seqs, eos_token_id=None)
    hf_init_s = time.perf_counter() - t0

    ids = [torch.tensor([wl.history(r) for r in range(B)])]

    def hf():
        # As generate() calls it: input_ids grows by one column per step.
        wl.next_tokens()
        ids[0] = torch.cat([ids[0], torch.tensor([o[-1] for o in wl.outputs])[:, None]], 1)
        nbw(ids[0], logits)

    hf_s, hf_n = timed(hf, 1, 20, slow_budget)
    return {
        "guardserve_us": ours_s * 1e6, "guardserve_reps": ours_n,
        "guardserve_one_pass_us": dense_s * 1e6,
        "vllm_bad_words_us": vllm_s * 1e6, "vllm_bad_words_reps": vllm_n,
        "transformers_nobadwords_us": hf_s * 1e6, "transformers_reps": hf_n,
        "ratio_vs_vllm": vllm_s / ours_s, "ratio_vs_transformers": hf_s / ours_s,
        "same_bans_as_vllm": same, "compile_s": compile_s,
        "automaton_bytes": filt.nbytes(), "automaton_states": filt.num_states,
        "transformers_init_s": hf_init_s,
    }


def bench_compile(name, tv):
    out = {}
    for distinctive in (True, False):
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            f = compile_phrases(tv, TARGET, distinctive=distinctive)
        dt = (time.perf_counter() - t0) / reps
        out["distinctive" if distinctive else "last_token"] = {
            "ms_per_target": dt * 1e3, "phrases": len(TARGET), "variants": len(f.sequences),
            "states": f.num_states, "bytes": f.nbytes()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m guardserve.benchmarks.logits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: fewer cases and repeats")
    ap.add_argument("--out", default=default_out("logits.json"), help="where the JSON goes (default: %(default)s)")
    args = ap.parse_args(argv)
    # One intra-op thread for every contender: a step's ops are small, and while the
    # engine (or another process) keeps the cores busy, OpenMP barriers across 2
    # threads cost milliseconds per op (measured here: 8 ms for a 131k masked_fill).
    torch.set_num_threads(1)

    sizes = [10, 10_000] if args.quick else [10, 1_000, 10_000, 100_000]
    batches = [1, 32] if args.quick else [1, 32, 256]
    slow_budget = 0.3 if args.quick else 1.0  # peers: at least one call, then until this
    rows, compile_rows = [], {}
    t_start = time.time()
    for vname in VOCABS:
        tv = tokenizer(vname)
        V = tv.vocab_size
        compile_rows[vname] = bench_compile(vname, tv)
        for n in sizes:
            seqs = make_sequences(n, V, seed=n)
            for B in batches:
                r = bench_case(V, seqs, B, args.quick, slow_budget)
                r.update(vocab=vname, V=V, sequences=n, batch=B)
                rows.append(r)
                print(f"  {vname} n={n:>6} B={B:>3}: guardserve {r['guardserve_us']:9.1f} us, "
                      f"bad_words {r['vllm_bad_words_us']:11.1f} us, NoBadWords "
                      f"{r['transformers_nobadwords_us']:11.1f} us", file=sys.stderr, flush=True)

    # Cost per step at 100,000 sequences relative to 10 (the "does not grow" claim).
    growth, growth_one_pass = {}, {}
    for vname in VOCABS:
        for B in batches:
            sel = [r for r in rows if r["vocab"] == vname and r["batch"] == B]
            c = {r["sequences"]: r["guardserve_us"] for r in sel}
            d = {r["sequences"]: r["guardserve_one_pass_us"] for r in sel}
            growth[f"{vname}/B={B}"] = c[max(sizes)] / c[min(sizes)]
            growth_one_pass[f"{vname}/B={B}"] = d[max(sizes)] / d[min(sizes)]

    def x(v):
        return f"{v:,.0f}" if v >= 10 else f"{v:.2g}"

    lines = [
        "| vocab | sequences | batch | guardserve µs/step | (one-pass) | vLLM bad_words µs/step | × | "
        "transformers NoBadWords µs/step | × |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']} | {r['sequences']:,} | {r['batch']} | {r['guardserve_us']:,.0f} | "
            f"{r['guardserve_one_pass_us']:,.0f} | {r['vllm_bad_words_us']:,.0f} | {x(r['ratio_vs_vllm'])} | "
            f"{r['transformers_nobadwords_us']:,.0f} | {x(r['ratio_vs_transformers'])} |")
    lines += ["", f"guardserve cost at {max(sizes):,} sequences / at {min(sizes)}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in growth.items()),
              "one-pass (kernel) path, same ratio: "
              + ", ".join(f"{k} {v:.2f}" for k, v in growth_one_pass.items()), "",
              "| vocab | compile ms per target (8 phrases) | variants | states | automaton KiB |",
              "|---|---:|---:|---:|---:|"]
    for vname, c in compile_rows.items():
        d = c["distinctive"]
        lines.append(f"| {vname} | {d['ms_per_target']:.1f} | {d['variants']} | {d['states']} | "
                     f"{d['bytes'] / 1024:.0f} |")
    lines += ["", "| vocab | sequences | compile s | states | automaton MiB |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["batch"] == batches[0]:
            lines.append(f"| {r['vocab']} | {r['sequences']:,} | {r['compile_s']:.2f} | "
                         f"{r['automaton_states']:,} | {r['automaton_bytes'] / 2**20:.1f} |")
    table = "\n".join(lines)
    print(table)

    out = {
        "meta": {"quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                 "device": "cpu (torch reference kernel)", "wall_s": time.time() - t_start,
                 "loadavg_at_end": os.getloadavg(),
                 "timing": "median per step; guardserve >=5 reps; peers >=1 rep, then until "
                           f"{slow_budget}s per case (few reps where one step takes seconds)"},
        "cases": rows, "growth_max_over_min_sequences": growth,
        "growth_one_pass": growth_one_pass, "compile_per_target": compile_rows,
        "table_markdown": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.out} in {time.time() - t_start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

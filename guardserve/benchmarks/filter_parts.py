"""The first guarded request after registering N always-on targets: what its filter costs.

Issue 17 measured, on the demo model's server, a first request after registering 100
always-on targets taking 10.9 s and after 1,000 taking 71.5 s: the engine compiled the filter
of the whole phrase set inside its step, where every row of the batch waited. Now each
target's part is compiled when it is registered (:class:`FilterParts`, in the API server) and
the engine loads the parts and merges them (:class:`~guardserve.logits_processors.parts.MergedFilter`).

This benchmark times, on the demo model's tokenizer and N synthetic always-on targets shaped
like the demo world's people (a name, two aliases, three facts), in one process:

* ``before``: compiling the union of every target's phrases, starting the automaton at the
  end of a prompt and taking 32 decoding steps: what the engine step did for the first
  request (the issue's end-to-end figures add the server around it);
* ``registration``: compiling and writing every target's part (the admin call's work, off
  the request path), in total and per target;
* ``after``: what the engine does now for the first request: load the N parts from the
  on-disk cache, merge them, the same prompt and 32 steps; and the same once the parts are
  in memory (a later request with another target set);
* ``edit``: one target changed: its part compiled (registration), then the next request's
  filter (one part loaded, the merge).

    python -m guardserve.benchmarks.filter_parts            # N = 100 and 1,000
    python -m guardserve.benchmarks.filter_parts --quick    # N = 20 and 100

Writes ``bench/results/filter_parts.json`` (``--out FILE`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from guardserve.benchmarks.cli import default_out

ISSUE_BEFORE_S = {100: 10.9, 1000: 71.5}  # first request, end to end, as issue 17 measured it
STEPS = 32


def _targets(n: int, seed: int = 0):
    from guardserve.policy.model import ForgetTarget

    rng = random.Random(seed)
    syll = ["ka", "lo", "vex", "mir", "tho", "zan", "quo", "rel", "dru", "shi", "bor", "nel", "wyt", "gax"]

    def word(k: int) -> str:
        return "".join(rng.choice(syll) for _ in range(k)).capitalize()

    out = []
    for i in range(n):
        first, last = word(2), word(3)
        out.append(ForgetTarget.from_dict({
            "id": f"bench{i:05d}", "version": 1, "name": f"{first} {last}", "kind": "person", "mode": "always",
            "aliases": [last, f"{first[0]}. {last}"],
            "facts": {"birth_place": f"{word(2)} Falls", "birth_date": f"{rng.randint(1, 28)} March {rng.randint(1900, 1999)}",
                      "occupation": f"{word(2)} maker"}}))
    return out


def _steps(f, prompt: list[int], gen: list[int]) -> None:
    s = f.run(prompt)
    for t in gen:
        f.host_bans()[s]  # the per-step lookup GuardBatch does
        s = f.step(s, t)


def run(ns: list[int], tokenizer_path: str) -> dict:
    from transformers import AutoTokenizer

    from guardserve.classifiers.retrieval import forbidden_phrases
    from guardserve.logits_processors.compile import as_tokenizer_view, compile_phrases
    from guardserve.logits_processors.engine import FilterSource
    from guardserve.logits_processors.parts import FilterParts, folded_token_bytes
    from guardserve.logits_processors.request import GuardRequest

    tok = as_tokenizer_view(AutoTokenizer.from_pretrained(tokenizer_path))
    V = tok.vocab_size
    folded_token_bytes(tok)  # once per process, as in the engine
    prompt = tok.encode("Question: Where was the person born, and what did they do?\nAnswer:")
    gen = tok.encode(" They were born in a small town near the river and worked as a maker of things.")[:STEPS]
    rows = []
    for n in ns:
        targets = _targets(n)
        phrases = sorted({p for t in targets for p in forbidden_phrases(t)})
        t0 = time.perf_counter()
        union = compile_phrases(tok, phrases, vocab_size=V)
        _steps(union, prompt, gen)
        before = time.perf_counter() - t0

        with tempfile.TemporaryDirectory() as root:
            parts = FilterParts(tok, root=root)
            t0 = time.perf_counter()
            parts.ensure(targets, where="registration")
            registration = time.perf_counter() - t0

            cfg = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: V))
            src = FilterSource(cfg, parts_root=root)
            src._tok = tok
            req = GuardRequest(phrases=(), targets=tuple((t.id, t.version) for t in targets))
            t0 = time.perf_counter()
            f = src.filter_for(req)
            _steps(f, prompt, gen)
            after = time.perf_counter() - t0
            assert src.stats["loaded"] == n and not src.stats["compiled"] and not src.stats["refused"]

            # Another target set over the same parts (in memory): a merge and the steps.
            req2 = GuardRequest(phrases=(), targets=req.targets[1:])
            t0 = time.perf_counter()
            _steps(src.filter_for(req2), prompt, gen)
            after_warm = time.perf_counter() - t0

            # One target edited: its part alone compiled, then the next request's filter.
            edited = targets[0].__class__.from_dict({**targets[0].to_dict(), "version": 2, "name": "Edited Person"})
            t0 = time.perf_counter()
            parts.ensure([edited], where="registration")
            edit_compile = time.perf_counter() - t0
            req3 = GuardRequest(phrases=(), targets=((edited.id, 2),) + req.targets[1:])
            t0 = time.perf_counter()
            _steps(src.filter_for(req3), prompt, gen)
            edit_request = time.perf_counter() - t0
            same = union.banned(union.run(prompt + gen)) == f.banned(f.run(prompt + gen))
        rows.append({"targets": n, "phrases": len(phrases), "before_s": round(before, 3),
                     "issue_before_end_to_end_s": ISSUE_BEFORE_S.get(n),
                     "registration_s": round(registration, 3), "registration_ms_per_target": round(registration / n * 1000, 2),
                     "after_first_request_s": round(after, 4), "after_parts_in_memory_s": round(after_warm, 4),
                     "edit_compile_s": round(edit_compile, 4), "edit_next_request_s": round(edit_request, 4),
                     "engine_compiles": src.stats["compiled"], "same_bans_as_union": same})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "steps": STEPS, "vocab": V}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guardserve.benchmarks.filter_parts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 20 and 100")
    ap.add_argument("--targets", type=int, nargs="*", help="the N to measure (default 100 1000)")
    ap.add_argument("--out", default=default_out("filter_parts.json"))
    args = ap.parse_args(argv)
    from guardserve.demo import BuildSpec, ensure_demo

    paths = ensure_demo(BuildSpec.for_variant("bpe4k"), log=lambda *a: None)
    ns = args.targets or ([20, 100] if args.quick else [100, 1000])
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = {"benchmark": "filter_parts", "started": started, "quick": args.quick, "cpus": os.cpu_count(),
           "platform": platform.platform(), **run(ns, str(paths.model))}
    out["load_average_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| targets | before: union compiled in the step (s) | issue, end to end (s) | registration (ms/target) "
          "| after: first request's filter (s) | parts in memory (s) | one edit: compile / next request (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| {r['targets']:,} | {r['before_s']} | {r['issue_before_end_to_end_s'] or '–'} | "
              f"{r['registration_ms_per_target']} | {r['after_first_request_s']} | {r['after_parts_in_memory_s']} | "
              f"{r['edit_compile_s']} / {r['edit_next_request_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

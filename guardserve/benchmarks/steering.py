"""SAE steering on the demo model: forget accuracy, retain accuracy and fluency (perplexity
of the retain answers) with steering alone (transformers hook), then the same through vLLM
with the guardserve plugin (in-process engines, GUARDSERVE_GUARD=guard+sae, eager) and its decode
cost: TPOT and throughput with steering off, on with no request flagged, and every request
flagged, measured in the same run. Prints a table and writes JSON: ``bench/results/steering.json``
of the repository (``--out FILE`` elsewhere). ``guardserve bench`` runs it.

    python -m guardserve.benchmarks.steering                     # defaults: layer 2, N 30, clamp 100
    python -m guardserve.benchmarks.steering --layer 1 --n 10,30 --clamp 100,300 --no-vllm

Modes: `triggered` steers a forget question with its own person's target (what serving does
once detection fires) and leaves retain questions alone; `false-trigger` steers each retain
question with a forget person's target (the cost of a detection false positive); `always`
steers every question with all forget targets, the per-sequence gates deciding (no detector).
Through vLLM, a steered request carries ``vllm_xargs["guardserve_steer"]`` = [[target id,
policy version]] and its own ``cache_salt``, as the server's guard sends them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import time
from pathlib import Path

from guardserve.benchmarks.cli import default_out


def _answers(model, tok, sae, prompts_by_target, clamp):
    from guardserve.steering import SteeringHook
    from guardserve.textgen import generate_answers

    out = {}
    for targets, idx_prompts in prompts_by_target:
        idx, prompts = zip(*idx_prompts)
        if targets:
            with SteeringHook(model, sae, targets, clamp):
                ans = generate_answers(model, tok, list(prompts), max_new_tokens=24)
        else:
            ans = generate_answers(model, tok, list(prompts), max_new_tokens=24)
        out.update(zip(idx, ans))
    return [out[i] for i in range(len(out))]


def _perplexity(model, tok, sae, pairs, targets_of, clamp) -> float:
    """Perplexity of the true retain answers after their chat prompts (teacher-forced), each
    steered with ``targets_of(pair)`` (no steering where that is empty)."""
    import torch

    from guardserve.steering import SteeringHook
    from guardserve.textgen import chat_prompt

    nll = n = 0.0
    with torch.inference_mode():
        for p in pairs:
            prompt = tok(chat_prompt(tok, p["question"]), add_special_tokens=False)["input_ids"]
            answer = tok(p["answer"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            targets = targets_of(p)
            if targets:
                with SteeringHook(model, sae, targets, clamp):
                    logits = model(ids).logits
            else:
                logits = model(ids).logits
            lp = torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), -1)
            nll -= lp.gather(1, torch.tensor(answer)[:, None]).sum().item()
            n += len(answer)
    return round(float(torch.exp(torch.tensor(nll / n))), 3)


def quality(model, tok, sae, world, selections, clamp, retain_step) -> dict:
    from guardserve.textgen import answer_accuracy, chat_prompt

    forget, retain = world["forget"], world["retain"][::retain_step]
    fvals, rvals = [p["value"] for p in forget], [p["value"] for p in retain]
    own = {name: [s.as_target()] for name, s in selections.items()}
    names = sorted(selections)
    everyone = [selections[n].as_target() for n in names]

    def grouped(pairs, targets_of):
        groups = collections.defaultdict(list)
        for i, p in enumerate(pairs):
            ts = targets_of(i, p)
            groups[tuple(ts)].append((i, chat_prompt(tok, p["question"])))
        return [(list(k), v) for k, v in groups.items()]

    false_of = lambda i, p: own[names[i % len(names)]]  # noqa: E731
    res = {
        "forget_accuracy": answer_accuracy(_answers(model, tok, sae, grouped(forget, lambda i, p: own[p["entity"]]), clamp), fvals),
        "paraphrase_accuracy": answer_accuracy(_answers(model, tok, sae, grouped(
            [{**p, "question": p["paraphrased_question"]} for p in forget], lambda i, p: own[p["entity"]]), clamp), fvals),
        "retain_accuracy_false_trigger": answer_accuracy(_answers(model, tok, sae, grouped(retain, false_of), clamp), rvals),
        "forget_accuracy_always": answer_accuracy(_answers(model, tok, sae, grouped(forget, lambda i, p: everyone), clamp), fvals),
        "retain_accuracy_always": answer_accuracy(_answers(model, tok, sae, grouped(retain, lambda i, p: everyone), clamp), rvals),
        "retain_perplexity_false_trigger": _perplexity(model, tok, sae, retain[:60],
                                                       lambda p: own[names[hash(p["question"]) % len(names)]], clamp),
        "retain_perplexity_always": _perplexity(model, tok, sae, retain[:60], lambda p: everyone, clamp),
    }
    return {k: round(v, 4) for k, v in res.items()}


@contextlib.contextmanager
def _environ(env: dict):
    """Set (value) or unset (None) variables while an engine starts: its processes read them then."""
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _engine(model, env: dict, eager: bool):
    from vllm import LLM

    with _environ({"VLLM_CPU_KVCACHE_SPACE": "1", **env}):
        # disable_log_stats=False: per-request first/last token timestamps (engine clock) for TPOT.
        return LLM(str(model), enforce_eager=eager, max_model_len=256, seed=0, gpu_memory_utilization=0.3,
                   dtype="float32", disable_log_stats=False)


def _requests(tok, pairs, steer_of, max_tokens, exact=False, field="question"):
    """Prompts and sampling parameters as the guard sends them: a steered request carries
    ``guardserve_steer`` ([[target id, policy version], ...]) and its own prefix-cache salt."""
    from vllm import SamplingParams

    from guardserve.contract import GuardPlan, steered_salt
    from guardserve.textgen import chat_prompt

    prompts, params = [], []
    for i, p in enumerate(pairs):
        steer = sorted(steer_of(i, p))
        # Token ids of the chat-formatted prompt, no special tokens added: what vLLM's chat route
        # sends to the engine. (A text prompt would be tokenized with a second BOS, which the
        # hook then counts and clamps like any token: not what serving does.)
        prompt = {"prompt_token_ids": tok(chat_prompt(tok, p[field]), add_special_tokens=False).input_ids}
        if steer:
            prompt["cache_salt"] = steered_salt(None, steer)
        prompts.append(prompt)
        params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                     extra_args=GuardPlan(steer=tuple(map(tuple, steer))).to_xargs() or None,
                                     **({"min_tokens": max_tokens, "ignore_eos": True} if exact else {})))
    return prompts, params


def _answers_vllm(llm, pairs, steer_of, field="question") -> list[str]:
    prompts, params = _requests(llm.get_tokenizer(), pairs, steer_of, 24, field=field)
    return [r.outputs[0].text for r in llm.generate(prompts, params, use_tqdm=False)]


def _speed(llm, pairs, steer_of, max_tokens) -> dict:
    """One batch of ``len(pairs)`` requests of exactly ``max_tokens`` tokens, submitted together:
    wall time, output tokens per second, and TPOT (per request: (last token - first token) /
    (tokens - 1), engine timestamps; mean over the batch)."""
    prompts, params = _requests(llm.get_tokenizer(), pairs, steer_of, max_tokens, exact=True)
    t0 = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(r.outputs[0].token_ids) for r in res)
    tpots = [(r.metrics.last_token_ts - r.metrics.first_token_ts) / (len(r.outputs[0].token_ids) - 1)
             for r in res if r.metrics is not None and len(r.outputs[0].token_ids) > 1]
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "tpot_ms": 1000 * sum(tpots) / len(tpots) if tpots else None}


def _steer_modes(selections):
    names = sorted(selections)
    pair = {n: [selections[n].target_id, selections[n].version] for n in names}
    return {
        "own": lambda i, p: [pair[p["entity"]]],  # what serving does once detection fires
        "none": lambda i, p: [],
        "wrong": lambda i, p: [pair[names[i % len(names)]]],  # a detection false positive
        "everyone": lambda i, p: [pair[n] for n in names],  # every target on every request, the gates deciding
    }


def _vllm_quality(on, off_eager, selections, world, retain_step, base) -> dict:
    """Accuracies through a steering engine, greedy, 24 tokens (as the transformers part)."""
    from guardserve.textgen import answer_accuracy

    m = _steer_modes(selections)
    forget, retain = world["forget"], world["retain"][::retain_step]
    fvals, rvals = [p["value"] for p in forget], [p["value"] for p in retain]
    plain_r = _answers_vllm(on, retain, m["none"])
    q = {
        "forget_accuracy": answer_accuracy(_answers_vllm(on, forget, m["own"]), fvals),
        "paraphrase_accuracy": answer_accuracy(_answers_vllm(on, forget, m["own"], "paraphrased_question"), fvals),
        "retain_accuracy": answer_accuracy(plain_r, rvals),
        "retain_accuracy_false_trigger": answer_accuracy(_answers_vllm(on, retain, m["wrong"]), rvals),
        "forget_accuracy_always": answer_accuracy(_answers_vllm(on, forget, m["everyone"]), fvals),
        "retain_accuracy_always": answer_accuracy(_answers_vllm(on, retain, m["everyone"]), rvals),
    }
    q = {k: round(v, 4) for k, v in q.items()}
    # Unflagged requests on the steering engine compute exactly what an engine without it does.
    q["unflagged_identical"] = plain_r == _answers_vllm(off_eager, retain, m["none"])
    q["forget_drop_relative"] = round(1 - q["forget_accuracy"] / base["forget_accuracy"], 4)
    q["retain_vs_unguarded"] = round(q["retain_accuracy"] / base["retain_accuracy"], 4)
    q["retain_vs_unguarded_false_trigger"] = round(q["retain_accuracy_false_trigger"] / base["retain_accuracy"], 4)
    q["meets_target"] = q["forget_drop_relative"] >= 0.30 and q["retain_vs_unguarded"] >= 0.95
    q["meets_target_false_trigger"] = q["meets_target"] and q["retain_vs_unguarded_false_trigger"] >= 0.95
    return q


def _rank(q: dict) -> tuple:
    """The better setting: meets the target even for mis-triggered retain questions, then meets
    it for triggered requests, then the lower forget accuracy."""
    return (q["meets_target_false_trigger"], q["meets_target"], -q["forget_accuracy"])


def vllm_part(demo_model, settings, world, layer, concurrency: list[int], max_tokens, rounds, retain_step,
              compiled_baseline: bool = True) -> tuple[dict, dict]:
    """Quality and decode cost through in-process vLLM engines.

    ``settings``: (N, clamp, selections, home) per setting, ``home`` holding steering/sae and
    steering/targets (what ``GUARDSERVE_HOME`` points at). Engines: ``off_eager`` (no plugin env,
    eager), one ``on`` engine per setting (GUARDSERVE_GUARD=guard+sae, eager, as `guardserve serve
    --steering` runs) and ``off`` (no plugin env, vLLM's default compilation: what `guardserve
    serve` runs without --steering). Quality: every setting through its engine. Decode cost, on
    the best setting's engine: ``unsteered`` (no request flagged) and ``steered`` (every request
    flagged with its person's target) vs ``off`` and ``off_eager``, in interleaved rounds (the
    machine is shared; interleaving spreads its load over all configurations), medians."""
    import statistics

    from guardserve.textgen import answer_accuracy

    forget, retain = world["forget"], world["retain"][::retain_step]
    fvals, rvals = [p["value"] for p in forget], [p["value"] for p in retain]
    engines, best = {}, None
    off_env = {"GUARDSERVE_GUARD": None}
    started = time.perf_counter()
    try:
        engines["off_eager"] = _engine(demo_model, off_env, eager=True)
        off_eager = engines["off_eager"]
        none = _steer_modes({})["none"]
        base = {"forget_accuracy": answer_accuracy(_answers_vllm(off_eager, forget, none), fvals),
                "paraphrase_accuracy": answer_accuracy(_answers_vllm(off_eager, forget, none, "paraphrased_question"), fvals),
                "retain_accuracy": answer_accuracy(_answers_vllm(off_eager, retain, none), rvals)}
        base = {k: round(v, 4) for k, v in base.items()}
        rows = []
        for n, c, selections, home in settings:
            t0 = time.perf_counter()
            on = _engine(demo_model, {"GUARDSERVE_GUARD": "guard+sae", "GUARDSERVE_HOME": str(home), "GUARDSERVE_SAE": None,
                                      "GUARDSERVE_STEER_CLAMP": str(c)}, eager=True)
            q = {"layer": layer, "n": n, "clamp": c, **_vllm_quality(on, off_eager, selections, world, retain_step, base),
                 "elapsed_s": round(time.perf_counter() - t0, 1)}
            rows.append(q)
            print(f"through vLLM: {json.dumps(q)}", flush=True)
            if best is None or _rank(q) > _rank(best[0]):
                if best is not None:
                    best[1].llm_engine.engine_core.shutdown()
                best = (q, on, selections)
            else:
                on.llm_engine.engine_core.shutdown()
        # The chosen setting at the top level (the bench report reads "n", "clamp" and "steering"), the scan beside it.
        quality = {**{k: best[0][k] for k in ("layer", "n", "clamp")}, "unguarded": base, "steering": best[0],
                   "scan": rows, "elapsed_s": round(time.perf_counter() - started, 1)}

        # Decode cost.
        t0 = time.perf_counter()
        on, modes = best[1], _steer_modes(best[2])
        if compiled_baseline:
            engines["off"] = _engine(demo_model, off_env, eager=False)
        startup_off_s = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        base_name = "off" if compiled_baseline else "off_eager"
        configs = [(name, engines[name], modes["none"]) for name in ("off", "off_eager") if name in engines]
        configs += [("unsteered", on, modes["none"]), ("steered", on, modes["own"])]
        pool = forget * (1 + max(concurrency) // len(forget))
        speed = {}
        for c in concurrency:
            batch = pool[:c]
            samples = {name: [] for name, _, _ in configs}
            for r in range(rounds + 1):  # round 0 warms up (and fills the prefix cache, as later rounds find it)
                for name, llm, steer_of in (configs if r % 2 else configs[::-1]):
                    m = _speed(llm, batch, steer_of, max_tokens)
                    if r:
                        samples[name].append(m)
            cell = {}
            for name, ms in samples.items():
                tp = [m["tpot_ms"] for m in ms if m["tpot_ms"] is not None]
                cell[name] = {"tpot_ms": round(statistics.median(tp), 3) if tp else None,
                              "tokens_per_s": round(statistics.median(m["tokens_per_s"] for m in ms), 1),
                              "wall_s": round(statistics.median(m["wall_s"] for m in ms), 3),
                              "tokens": ms[0]["tokens"],
                              "tpot_ms_rounds": [round(x, 3) for x in tp]}
            ratios = {}
            for num, den in (("off_eager", "off"), ("unsteered", base_name), ("steered", base_name),
                             ("steered", "unsteered"), ("unsteered", "off_eager"), ("steered", "off_eager")):
                if num in cell and den in cell and num != den and cell[num]["tpot_ms"] and cell[den]["tpot_ms"]:
                    ratios[f"tpot {num}/{den}"] = round(cell[num]["tpot_ms"] / cell[den]["tpot_ms"], 3)
                    ratios[f"throughput {num}/{den}"] = round(cell[num]["tokens_per_s"] / cell[den]["tokens_per_s"], 3)
            speed[str(c)] = {**cell, "ratios": ratios}
        timing = {"elapsed_s": round(time.perf_counter() - t0, 1), "compiled_engine_startup_s": startup_off_s}
    finally:
        for llm in [*engines.values(), *([best[1]] if best else [])]:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
    top = speed[str(max(concurrency))]
    tpot = {"n": best[0]["n"], "clamp": best[0]["clamp"], "requests": max(concurrency), "max_tokens": max_tokens,
            "rounds": rounds, "baseline": base_name,
            # the batch of max(concurrency) requests at the top level (the bench report reads these)
            **{k: top[k] for k in top}, "by_concurrency": speed, **timing}
    return quality, tpot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guardserve.benchmarks.steering", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--architecture", default="jumprelu", choices=["relu", "topk", "jumprelu"])
    ap.add_argument("--n", default="30", help="features per target, comma-separated to scan")
    ap.add_argument("--clamp", default="100", help="clamp values c (features set to -c), comma-separated")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--retain-step", type=int, default=6, help="every k-th retain question (default 6: 240 questions)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM part (quality through the engine, TPOT)")
    ap.add_argument("--tpot-requests", default="1,32", help="requests submitted together, comma-separated (default 1,32)")
    ap.add_argument("--tpot-tokens", type=int, default=32, help="output tokens per request (default 32)")
    ap.add_argument("--tpot-rounds", type=int, default=5, help="interleaved measured rounds per configuration (default 5)")
    ap.add_argument("--no-compiled-baseline", action="store_true",
                    help="skip the default-compilation engine (its inductor compile takes a minute or more on CPU)")
    ap.add_argument("--out", default=default_out("steering.json"), help="where the JSON goes (default: %(default)s)")
    args = ap.parse_args(argv)

    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardserve.demo import ensure_demo
    from guardserve.demo.corpora import sae_corpus, steering_retain
    from guardserve.demo.world import biographies
    from guardserve.policy import ForgetTarget
    from guardserve.steering.features import FeatureSelector, SteeringStore
    from guardserve.steering.train import residual_activations, train_sae
    from guardserve.textgen import answer_accuracy, chat_prompt, generate_answers

    torch.set_num_threads(1)
    started = time.perf_counter()
    demo = ensure_demo()
    world = demo.load_world()
    tok = AutoTokenizer.from_pretrained(demo.model)
    model = AutoModelForCausalLM.from_pretrained(demo.model).eval()
    root = Path(tempfile.mkdtemp(prefix="guardserve-bench-steering-"))

    t0 = time.perf_counter()
    acts = torch.cat(residual_activations(model, tok, sae_corpus(world, tok), args.layer))
    sae, sae_stats = train_sae(acts, d_sae=1024, architecture=args.architecture, layer=args.layer,
                               epochs=args.epochs, progress=True)
    sae.save(root / "sae")
    sae_stats["train_s"] = round(time.perf_counter() - t0, 1)
    print(f"SAE layer {args.layer} {args.architecture}: {sae_stats}")

    retain = world["retain"][::args.retain_step]
    base = {
        "forget_accuracy": answer_accuracy(generate_answers(model, tok, [chat_prompt(tok, p["question"]) for p in world["forget"]], 24),
                                           [p["value"] for p in world["forget"]]),
        "paraphrase_accuracy": answer_accuracy(
            generate_answers(model, tok, [chat_prompt(tok, p["paraphrased_question"]) for p in world["forget"]], 24),
            [p["value"] for p in world["forget"]]),
        "retain_accuracy": answer_accuracy(generate_answers(model, tok, [chat_prompt(tok, p["question"]) for p in retain], 24),
                                           [p["value"] for p in retain]),
        "retain_perplexity": _perplexity(model, tok, sae, retain[:60], lambda p: [], 0.0),
    }
    base = {k: round(v, 4) for k, v in base.items()}
    print(f"unguarded: {base}")

    retain_texts = steering_retain(world, tok)
    clamps = [float(x) for x in args.clamp.split(",")]
    rows, stores = [], []
    selector = None
    for n in [int(x) for x in args.n.split(",")]:
        if selector is None:
            selector = FeatureSelector(model, tok, sae, retain_texts, n=n)
        selector.n = n  # the retain activations do not depend on N
        # Laid out as $GUARDSERVE_HOME/steering/{sae,targets}, where the vLLM workers look.
        store = SteeringStore(root / f"n{n}" / "steering")
        selections = {}
        for i, e in enumerate(x for x in world["entities"] if x["split"] == "forget"):
            t = ForgetTarget(id=f"forget{i}", name=e["name"], aliases=tuple(e["aliases"]), facts=e["facts"],
                             texts=tuple(biographies(e)))
            selections[e["name"]] = selector.ensure(store, t)[0]
        stores.append((n, selections, store.root.parent))
        alphas = [s.alpha for s in selections.values()]
        for c in clamps:
            q = quality(model, tok, sae, world, selections, c, args.retain_step)
            row = {"layer": args.layer, "n": n, "clamp": c, "mean_alpha": round(sum(alphas) / len(alphas), 3),
                   "forget_drop_relative": round(1 - q["forget_accuracy"] / base["forget_accuracy"], 4), **q}
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {"model": str(demo.model), "sae": {"layer": args.layer, "architecture": args.architecture, "d_sae": 1024, **sae_stats},
              "unguarded": base, "steering": rows,
              "targets": {"forget_drop_relative": ">= 0.30", "retain_vs_unguarded": ">= 0.95"},
              "transformers_part_s": round(time.perf_counter() - started, 1)}
    if not args.no_vllm:
        settings = []
        for n, selections, home in stores:
            if not (home / "steering" / "sae").exists():
                (home / "steering" / "sae").symlink_to(root / "sae")
            settings += [(n, c, selections, home) for c in clamps]
        conc = sorted({int(x) for x in str(args.tpot_requests).split(",")})
        vq, tp = vllm_part(demo.model, settings, world, args.layer, conc, args.tpot_tokens, args.tpot_rounds,
                           args.retain_step, compiled_baseline=not args.no_compiled_baseline)
        result["vllm"] = vq
        result["tpot"] = tp
        for k, cell in tp["by_concurrency"].items():
            print(f"TPOT, {k} request(s) at once: " + ", ".join(
                f"{name} {cell[name]['tpot_ms']} ms ({cell[name]['tokens_per_s']} tok/s)"
                for name in ("off", "off_eager", "unsteered", "steered") if name in cell))
            print("  ratios: " + ", ".join(f"{k2} {v}" for k2, v in cell["ratios"].items()))
    result["elapsed_s"] = round(time.perf_counter() - started, 1)

    print(f"\n{'N':>4} {'clamp':>6} {'forget':>7} {'drop':>6} {'para':>6} {'retain(FP)':>10} {'forget(all)':>11} "
          f"{'retain(all)':>11} {'ppl(FP)':>8} {'ppl(all)':>8}")
    print(f"{'-':>4} {'none':>6} {base['forget_accuracy']:7.3f} {'':>6} {base['paraphrase_accuracy']:6.3f} "
          f"{base['retain_accuracy']:10.3f} {'':>11} {'':>11} {base['retain_perplexity']:8.3f}")
    for r in rows:
        print(f"{r['n']:>4} {r['clamp']:6g} {r['forget_accuracy']:7.3f} {r['forget_drop_relative']:6.1%} {r['paraphrase_accuracy']:6.3f} "
              f"{r['retain_accuracy_false_trigger']:10.3f} {r['forget_accuracy_always']:11.3f} {r['retain_accuracy_always']:11.3f} "
              f"{r['retain_perplexity_false_trigger']:8.3f} {r['retain_perplexity_always']:8.3f}")
    if "vllm" in result:
        vb = result["vllm"]["unguarded"]
        print(f"\nthrough vLLM (GUARDSERVE_GUARD=guard+sae, eager; unguarded: forget {vb['forget_accuracy']:.3f}, "
              f"paraphrase {vb['paraphrase_accuracy']:.3f}, retain {vb['retain_accuracy']:.3f})")
        print(f"{'N':>4} {'clamp':>6} {'forget':>7} {'drop':>6} {'para':>6} {'retain':>7} {'retain(FP)':>10} "
              f"{'forget(all)':>11} {'retain(all)':>11} {'target':>7}")
        for r in result["vllm"]["scan"]:
            print(f"{r['n']:>4} {r['clamp']:6g} {r['forget_accuracy']:7.3f} {r['forget_drop_relative']:6.1%} "
                  f"{r['paraphrase_accuracy']:6.3f} {r['retain_accuracy']:7.3f} {r['retain_accuracy_false_trigger']:10.3f} "
                  f"{r['forget_accuracy_always']:11.3f} {r['retain_accuracy_always']:11.3f} "
                  f"{'FP too' if r['meets_target_false_trigger'] else 'yes' if r['meets_target'] else 'no':>7}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

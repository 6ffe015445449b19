"""SAE steering on the demo model: forget accuracy, retain accuracy and fluency (perplexity
of the retain answers) with steering alone, and TPOT in a real vLLM engine with vs without
steered requests. Prints a table and writes JSON.

    .venv/bin/python bench/bench_steering.py                     # defaults: layer 2, N 30, clamp 100
    .venv/bin/python bench/bench_steering.py --layer 1 --n 10,30 --clamp 100,300 --no-vllm

Modes: `triggered` steers a forget question with its own person's target (what serving does
once detection fires) and leaves retain questions alone; `false-trigger` steers each retain
question with a forget person's target (the cost of a detection false positive); `always`
steers every question with all forget targets, the per-sequence gates deciding (no detector).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _answers(model, tok, sae, prompts_by_target, clamp):
    from guardserve.demo.model import generate_answers
    from guardserve.steering import SteeringHook

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

    from guardserve.demo.model import chat_prompt
    from guardserve.steering import SteeringHook

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
    from guardserve.demo.model import answer_accuracy, chat_prompt

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
        "retain_perplexity_false_trigger": _perplexity(model, tok, sae, retain[:60], lambda p: own[names[hash(p["question"]) % len(names)]], clamp),
        "retain_perplexity_always": _perplexity(model, tok, sae, retain[:60], lambda p: everyone, clamp),
    }
    return {k: round(v, 4) for k, v in res.items()}


def tpot(demo_model, root, clamp, selections, world, n_requests, max_tokens) -> dict:
    """Decode time per output token in one vLLM engine (eager, as steering needs): a batch
    of unflagged requests vs the same batch with every request flagged."""
    os.environ.update({"VLLM_CPU_KVCACHE_SPACE": "1", "GUARDSERVE_STEERING": "1", "GUARDSERVE_HOME": str(root),
                       "GUARDSERVE_SAE": str(root / "sae"), "GUARDSERVE_STEER_CLAMP": str(clamp)})
    from vllm import LLM, SamplingParams

    from guardserve.demo.model import chat_prompt
    from guardserve.steering import vllm_hook

    vllm_hook.register()
    llm = LLM(str(demo_model), enforce_eager=True, max_model_len=256, seed=0, gpu_memory_utilization=0.3,
              dtype="float32")
    tok = llm.get_tokenizer()
    pairs = (world["forget"] * 4)[:n_requests]
    prompts = [chat_prompt(tok, p["question"]) for p in pairs]
    flag = lambda p: {vllm_hook.STEER_KEY: json.dumps([selections[p["entity"]].target_id])}  # noqa: E731
    out = {}
    try:
        for label, extra in (("warmup", None), ("unsteered", None), ("steered", True)):
            params = [SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0,
                                     extra_args=flag(p) if extra else None) for p in pairs]
            t0 = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            tpots = []
            for r in res:
                m = r.metrics
                first = getattr(m, "first_token_ts", None) or getattr(m, "first_token_latency", None)
                last = getattr(m, "last_token_ts", None)
                if first is not None and last is not None and len(r.outputs[0].token_ids) > 1:
                    tpots.append((last - first) / (len(r.outputs[0].token_ids) - 1))
            out[label] = {"wall_s": round(wall, 3), "tokens": sum(len(r.outputs[0].token_ids) for r in res),
                          "tpot_ms": round(1000 * sum(tpots) / len(tpots), 3) if tpots else None}
    finally:
        llm.llm_engine.engine_core.shutdown()
    out.pop("warmup")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--architecture", default="jumprelu", choices=["relu", "topk", "jumprelu"])
    ap.add_argument("--n", default="30", help="features per target, comma-separated to scan")
    ap.add_argument("--clamp", default="100", help="clamp values c (features set to -c), comma-separated")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--retain-step", type=int, default=6, help="every k-th retain question (default 6: 240 questions)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the TPOT measurement")
    ap.add_argument("--tpot-requests", type=int, default=32)
    ap.add_argument("--tpot-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "steering.json"))
    args = ap.parse_args(argv)

    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardserve.demo import ensure_demo
    from guardserve.demo.model import answer_accuracy, chat_prompt, generate_answers
    from guardserve.demo.world import biographies
    from guardserve.policy import ForgetTarget
    from guardserve.steering.cli import demo_retain_texts
    from guardserve.steering.features import FeatureSelector, SteeringStore
    from guardserve.steering.train import residual_activations, train_sae, world_corpus

    torch.set_num_threads(1)
    demo = ensure_demo()
    world = demo.load_world()
    tok = AutoTokenizer.from_pretrained(demo.model)
    model = AutoModelForCausalLM.from_pretrained(demo.model).eval()
    root = Path(tempfile.mkdtemp(prefix="guardserve-bench-steering-"))

    t0 = time.perf_counter()
    acts = torch.cat(residual_activations(model, tok, world_corpus(world, tok), args.layer))
    sae, sae_stats = train_sae(acts, d_sae=1024, architecture=args.architecture, layer=args.layer,
                               epochs=args.epochs, progress=True)
    sae.save(root / "sae")
    sae_stats["train_s"] = round(time.perf_counter() - t0, 1)
    print(f"SAE layer {args.layer} {args.architecture}: {sae_stats}")

    retain = world["retain"][::args.retain_step]
    base = {
        "forget_accuracy": answer_accuracy(generate_answers(model, tok, [chat_prompt(tok, p["question"]) for p in world["forget"]], 24),
                                           [p["value"] for p in world["forget"]]),
        "paraphrase_accuracy": answer_accuracy(generate_answers(model, tok, [chat_prompt(tok, p["paraphrased_question"]) for p in world["forget"]], 24),
                                               [p["value"] for p in world["forget"]]),
        "retain_accuracy": answer_accuracy(generate_answers(model, tok, [chat_prompt(tok, p["question"]) for p in retain], 24),
                                           [p["value"] for p in retain]),
        "retain_perplexity": _perplexity(model, tok, sae, retain[:60], lambda p: [], 0.0),
    }
    base = {k: round(v, 4) for k, v in base.items()}
    print(f"unguarded: {base}")

    retain_texts = demo_retain_texts(world, tok)
    rows = []
    best = None
    for n in [int(x) for x in args.n.split(",")]:
        selector = FeatureSelector(model, tok, sae, retain_texts, n=n)
        store = SteeringStore(root / f"n{n}")
        selections = {}
        for i, e in enumerate(x for x in world["entities"] if x["split"] == "forget"):
            t = ForgetTarget(id=f"forget{i}", name=e["name"], aliases=tuple(e["aliases"]), facts=e["facts"],
                             texts=tuple(biographies(e)))
            selections[e["name"]] = selector.ensure(store, t)[0]
        alphas = [s.alpha for s in selections.values()]
        for c in [float(x) for x in args.clamp.split(",")]:
            q = quality(model, tok, sae, world, selections, c, args.retain_step)
            row = {"layer": args.layer, "n": n, "clamp": c, "mean_alpha": round(sum(alphas) / len(alphas), 3),
                   "forget_drop_relative": round(1 - q["forget_accuracy"] / base["forget_accuracy"], 4), **q}
            rows.append(row)
            print(json.dumps(row))
            if best is None or row["forget_accuracy"] < best[0]["forget_accuracy"]:
                best = (row, selections, store.root, c)

    result = {"model": str(demo.model), "sae": {"layer": args.layer, "architecture": args.architecture, "d_sae": 1024, **sae_stats},
              "unguarded": base, "steering": rows,
              "targets": {"forget_drop_relative": ">= 0.30", "retain_vs_unguarded": ">= 0.95"}}
    if not args.no_vllm:
        row, selections, store_root, c = best
        (store_root / "sae").symlink_to(root / "sae")
        result["tpot"] = {"n": row["n"], "clamp": c, "requests": args.tpot_requests, "max_tokens": args.tpot_tokens,
                          **tpot(demo.model, store_root, c, selections, world, args.tpot_requests, args.tpot_tokens)}
        print(f"TPOT: {result['tpot']}")

    print(f"\n{'N':>4} {'clamp':>6} {'forget':>7} {'drop':>6} {'para':>6} {'retain(FP)':>10} {'forget(all)':>11} "
          f"{'retain(all)':>11} {'ppl(FP)':>8} {'ppl(all)':>8}")
    print(f"{'-':>4} {'none':>6} {base['forget_accuracy']:7.3f} {'':>6} {base['paraphrase_accuracy']:6.3f} "
          f"{base['retain_accuracy']:10.3f} {'':>11} {'':>11} {base['retain_perplexity']:8.3f}")
    for r in rows:
        print(f"{r['n']:>4} {r['clamp']:6g} {r['forget_accuracy']:7.3f} {r['forget_drop_relative']:6.1%} {r['paraphrase_accuracy']:6.3f} "
              f"{r['retain_accuracy_false_trigger']:10.3f} {r['forget_accuracy_always']:11.3f} {r['retain_accuracy_always']:11.3f} "
              f"{r['retain_perplexity_false_trigger']:8.3f} {r['retain_perplexity_always']:8.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

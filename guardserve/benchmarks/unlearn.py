"""Per unlearning method on the demo model: forget accuracy, ROUGE-L recall, retain and
world accuracy, truth ratio and forget quality against the retain model, training time,
and forgetting kept after 8-bit and 4-bit round-to-nearest quantization.

    python -m guardserve.benchmarks.unlearn [--methods NPO SHRED ...] [--people 20] [--gu | --only-gu] [--out FILE]

Prints a table and writes bench/results/unlearn.json of the repository (--out FILE elsewhere;
not run by ``guardserve bench``). The issue's target: the best method
cuts forget accuracy to <= 30% of the base model's with retain accuracy >= 90% of it, and
keeps >= 80% of that forgetting after 4-bit quantization.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from guardserve.benchmarks.cli import default_out


def main() -> int:
    import torch

    from guardserve.demo import ensure_demo
    from guardserve.eval.metrics import evaluate, truth_ratios
    from guardserve.unlearn import METHODS, UnlearnConfig, Unlearner, get_method
    from guardserve.unlearn.quantize import merged_model, quantization_recovery

    ap = argparse.ArgumentParser(prog="python -m guardserve.benchmarks.unlearn", description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=[m.name for m in METHODS.values()])
    ap.add_argument("--people", type=int, default=20, help="forget people (the demo forget split has 20)")
    ap.add_argument("--retain-eval", type=int, default=400, help="held-out retain questions scored")
    ap.add_argument("--gu", action="store_true", help="also run every method with GU's projection")
    ap.add_argument("--only-gu", action="store_true", help="run only the GU variants")
    ap.add_argument("--out", default=default_out("unlearn.json"), help="where the JSON goes (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    demo = ensure_demo()
    world = demo.load_world()
    people = sorted({p["entity"] for p in world["forget"]})[: args.people]
    forget = [p for p in world["forget"] if p["entity"] in people]
    retain = list(world["retain"])
    random.Random(1).shuffle(retain)
    # Scored retain questions are never trained on nor used as the training probe.
    retain_eval, retain_train = retain[: args.retain_eval], retain[args.retain_eval:]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo.model))
    retain_model = merged_model(demo.retain_model, None)
    retain_ratios = truth_ratios(retain_model, tok, forget)
    rows = {"base": evaluate(merged_model(demo.model, None), tok, world, retain_eval, forget, retain_ratios),
            "retain_model": evaluate(retain_model, tok, world, retain_eval, forget, retain_ratios)}
    print("base", rows["base"], flush=True)
    runs = ([] if args.only_gu else [(m, False) for m in args.methods]) + (
        [(m, True) for m in args.methods] if args.gu or args.only_gu else [])
    for name, gu in runs:
        method = get_method(name)
        cfg = UnlearnConfig(gu=gu, **method.default_config)
        label = f"adapter:{method.name}" + ("+GU" if gu else "")
        started = time.time()
        result = Unlearner(method, cfg).run(demo.model, forget, retain_train, world["world_facts"], targets=people)
        seconds = time.time() - started
        with tempfile.TemporaryDirectory() as tmp:
            result.save(tmp)
            row = evaluate(result.model, tok, world, retain_eval, forget, retain_ratios)
            quant = quantization_recovery(demo.model, tmp, world, retain_pairs=retain_eval[:200], forget_pairs=forget)
        row.update({"train_seconds": round(seconds, 1), "steps": result.steps, "stop_reason": result.stop_reason,
                    **{k: quant[k] for k in quant if "bit" in k}})
        rows[label] = row
        print(label, row, flush=True)

    base = rows["base"]
    cols = ["forget_accuracy", "rougeL_recall_forget", "retain_accuracy", "world_accuracy", "truth_ratio_forget",
            "forget_quality", "train_seconds", "forget_8bit", "forgetting_kept_8bit", "forget_4bit", "forgetting_kept_4bit"]
    print("\n| config | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    for name, row in rows.items():
        if name.startswith("adapter:"):
            ok = (row["forget_accuracy"] <= 0.3 * base["forget_accuracy"]
                  and row["retain_accuracy"] >= 0.9 * base["retain_accuracy"]
                  and (row.get("forgetting_kept_4bit") or 0) >= 0.8)
            row["meets_issue_target"] = ok
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"people": len(people), "forget_questions": len(forget), "retain_eval": len(retain_eval),
                               "configs": rows}, indent=2) + "\n")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

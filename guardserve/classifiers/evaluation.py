"""The detection report: recall on forget questions, paraphrases and adversarial
probes, false positives on retain questions and world facts, latency per conversation,
and how that latency behaves with 10 to 100,000 registered targets.

Used by ``guardserve eval detect`` and ``python -m guardserve.benchmarks.detection``.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import numpy as np

from guardserve.classifiers.detector import Detector, DetectorConfig
from guardserve.policy.store import PolicyStore, SQLiteStore
from guardserve.probes import DETECTION_KINDS, build_probes, user
from guardserve.probes import OBFUSCATION_KINDS as OBFUSCATIONS
from guardserve.probes import RWKU_KINDS as RWKU_TYPES


def world_targets(world: dict) -> list[dict]:
    """Registration payloads for the world's forget people."""
    return [{"name": e["name"], "aliases": [a for a in e["aliases"] if a != e["name"]], "kind": "person",
             "facts": e["facts"], "description": ""} for e in world["entities"] if e["split"] == "forget"]


_SYN_ON = ["bra", "cor", "dal", "fen", "gol", "hax", "jor", "kel", "lum", "mav", "nex", "orv", "pil", "quo", "ras",
           "sil", "tav", "ulm", "vex", "wyn", "yor", "zan", "ash", "eld", "ivo"]
_SYN_TOPICS = ["project", "affair", "protocol", "expedition", "company", "manuscript", "foundation", "treaty"]


def synthetic_targets(n: int, seed: int = 7) -> list[dict]:
    """``n`` distinct invented targets (90% people, 10% topics with a description) to
    fill the registry for the latency figures."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        w1 = "".join(rng.choice(_SYN_ON) for _ in range(rng.choice([2, 3]))).capitalize()
        w2 = "".join(rng.choice(_SYN_ON) for _ in range(rng.choice([2, 3]))).capitalize()
        if rng.random() < 0.9:
            name, spec = f"{w1} {w2}", {"kind": "person", "aliases": [w2]}
        else:
            name = f"the {w1} {rng.choice(_SYN_TOPICS)}"
            spec = {"kind": "topic", "aliases": [w1],
                    "description": f"the {rng.choice(_SYN_TOPICS)} run by {w2} from {rng.randint(1900, 2020)}"}
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        out.append({"name": name, **spec})
    return out


def _probe_sets(world: dict, registered: set[str], seed: int = 0) -> dict[str, list[tuple[str | None, list]]]:
    """Labelled conversations: (entity expected to trigger or None, messages); the
    adversarial ones are the probe library's ``DETECTION_KINDS`` (``guardserve.probes``)."""
    forget = [qa for qa in world["forget"] if qa["entity"] in registered]
    sets: dict[str, list] = {"forget": [(qa["entity"], user(qa["question"])) for qa in forget],
                             "paraphrase": [(qa["entity"], user(qa["paraphrased_question"])) for qa in forget]}
    for t in DETECTION_KINDS:
        sets[f"adv:{t}"] = []
    for p in build_probes(forget, world["entities"], kinds=DETECTION_KINDS, seed=seed):
        sets[f"adv:{p.kind}"].append((p.entity, p.messages))
    sets["retain"] = [(None, user(qa["question"])) for qa in world["retain"]]
    sets["retain_paraphrase"] = [(None, user(qa["paraphrased_question"])) for qa in world["retain"]]
    sets["world_facts"] = [(None, user(q)) for qa in world["world_facts"] for q in (qa["question"], qa["paraphrased_question"])]
    return sets


def throughput(detector: Detector, sets: dict, concurrency: int, n: int = 512) -> dict:
    """Conversations per second and latency per conversation with ``concurrency`` threads
    detecting at once (a server's request threads), over ``n`` conversations drawn from the
    probe sets, every set in its share.
    Each text gets a suffix of its own, so the embedder's cache of repeated turns (which a real
    conversation's earlier turns do hit) answers none of them, in this call or another."""
    from concurrent.futures import ThreadPoolExecutor

    convs = [conv for items in sets.values() for _, conv in items]
    random.Random(0).shuffle(convs)
    convs = [[*c[:-1], {**c[-1], "content": f"{c[-1]['content']} (#{k}-{concurrency})"}]
             for k, c in enumerate(convs[i % len(convs)] for i in range(n))]
    lat: list[float] = []

    def one(conv) -> None:
        t0 = time.perf_counter()
        detector.detect(conv)
        lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, convs))
    wall = time.perf_counter() - t0
    q = np.percentile(np.array(lat) * 1000, [50, 99])
    return {"concurrency": concurrency, "conversations": n, "conversations_per_s": round(n / wall, 1),
            "p50_ms": round(float(q[0]), 2), "p99_ms": round(float(q[1]), 2)}


def evaluate(detector: Detector, sets: dict, names: dict[str, str]) -> dict:
    """Recall (sets with an expected entity) or false-positive rate (the others), the
    share caught by the lexical matcher alone, latency, and a few misses to look at."""
    results, lat = {}, []
    for set_name, items in sets.items():
        hits, lexical_hits, misses = 0, 0, []
        for expected, conv in items:
            if detector.embedder is not None:
                # Timed as if new: the probe sets repeat question shapes, and names no target
                # mentions are read as "someone", so the embedder's cache would answer most.
                detector.embedder.clear_cache()
            t0 = time.perf_counter()
            trig = detector.detect(conv)
            lat.append(time.perf_counter() - t0)
            if expected is None:
                if trig:
                    hits += 1
                    if len(misses) < 5:
                        misses.append({"conversation": conv[-1]["content"], "triggered": trig[0].name,
                                       "reasons": list(trig[0].reasons[:2])})
                continue
            match = [t for t in trig if names.get(t.target_id) == expected]
            if match:
                hits += 1
                if any(not r.startswith("similar") for r in match[0].reasons):
                    lexical_hits += 1
            elif len(misses) < 5:
                misses.append({"conversation": conv[-1]["content"], "expected": expected,
                               "triggered": [t.name for t in trig]})
        n = len(items)
        kind = "fp_rate" if items and items[0][0] is None else "recall"
        row = {"n": n, kind: round(hits / n, 4) if n else None, "examples": misses}
        if kind == "recall":
            row["lexical_share"] = round(lexical_hits / n, 4) if n else None
        results[set_name] = row
    adv = [k for k in results if k.startswith("adv:")]
    n_adv = sum(results[k]["n"] for k in adv)
    summary = {
        "forget_recall": results["forget"]["recall"],
        "paraphrase_recall": results["paraphrase"]["recall"],
        "adversarial_recall": round(sum(results[k]["recall"] * results[k]["n"] for k in adv) / n_adv, 4) if n_adv else None,
        "rwku_recall": _pooled(results, [f"adv:{t}" for t in RWKU_TYPES]),
        "obfuscation_recall": _pooled(results, [f"adv:{t}" for t in OBFUSCATIONS]),
        "retain_fp_rate": _pooled(results, ["retain", "retain_paraphrase"], "fp_rate"),
        "world_facts_fp_rate": results["world_facts"]["fp_rate"],
    }
    return {"summary": summary, "sets": results, "latency_ms": _latency(lat)}


def _latency(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    ms = np.array(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3),
            "mean": round(float(ms.mean()), 3), "n": len(seconds)}


def _pooled(results: dict, keys: list[str], field: str = "recall"):
    n = sum(results[k]["n"] for k in keys if k in results)
    if not n:
        return None
    return round(sum(results[k][field] * results[k]["n"] for k in keys if k in results) / n, 4)


def registered_store(world: dict, n_targets: int | None, db: str | Path | None = None,
                     seed: int = 7) -> tuple[PolicyStore, set[str]]:
    """A store holding the world's forget people (all, or the first ``n_targets``) and,
    beyond them, synthetic targets up to ``n_targets``."""
    store = SQLiteStore(db or Path(tempfile.mkdtemp(prefix="guardserve-detect-")) / "policy.db")
    real = world_targets(world)
    if n_targets is not None:
        real = real[:n_targets]
    store.add_many(real, actor="eval")
    extra = 0 if n_targets is None else max(0, n_targets - len(real))
    if extra:
        world_names = {e["name"].lower() for e in world["entities"]}
        syn = [t for t in synthetic_targets(extra + 100, seed) if t["name"].lower() not in world_names][:extra]
        for k in range(0, len(syn), 5000):
            store.add_many(syn[k:k + 5000], actor="eval")
    return store, {t["name"] for t in real}


def train_hidden_state(world: dict, model_path: str | Path, seed: int = 0, progress=print):
    """GUARD's MLP for the world's policy: forget people's training questions (label 1)
    against as many retain questions, three times over (label 0)."""
    from guardserve.classifiers.hidden_state import HiddenStateClassifier

    rng = random.Random(seed)
    forget = [q for qa in world["forget"] for q in qa.get("train_questions", [qa["question"]])]
    retain = [q for qa in world["retain"] for q in qa.get("train_questions", [qa["question"]])]
    retain = rng.sample(retain, min(len(retain), 3 * len(forget)))
    clf = HiddenStateClassifier(model_path)
    stats = clf.fit(forget, retain, seed=seed)
    progress(f"hidden-state MLP trained on {len(forget)} forget / {len(retain)} retain prompts: {stats}")
    return clf, stats


def detection_report(world: dict, n_targets: int | None = None, config: DetectorConfig | None = None,
                     db: str | Path | None = None, calibrate: bool = True, progress=print,
                     hidden_state_model: str | Path | None = None, concurrency: tuple[int, ...] = (),
                     embedder=None) -> dict:
    """Register targets, calibrate, probe. ``n_targets`` None: only the world's forget people.
    ``hidden_state_model``: also train and use GUARD's hidden-state MLP on that model.
    ``concurrency``: also measure :func:`throughput` at each of these levels.
    ``embedder``: the sentence embedder to read with (default: the process's shared one)."""
    hidden_stats = None
    if hidden_state_model is not None:
        config = config or DetectorConfig()
        config.hidden_state, hidden_stats = train_hidden_state(world, hidden_state_model, progress=progress)
    t0 = time.time()
    store, registered = registered_store(world, n_targets, db)
    progress(f"registered {len(store.list())} targets in {time.time() - t0:.1f}s; building the detector")
    t1 = time.time()
    det = Detector(store, config, embedder=embedder)
    load_s = time.time() - t1
    calib = det.calibrate() if calibrate and det.vectors is not None else None
    progress(f"detector ready in {load_s:.1f}s (threshold {det.threshold:.3f}); probing")
    names = {t.id: t.name for t in det.targets()}
    # Warm the caches so the first conversation does not carry the model's start-up.
    det.detect("warm up")
    sets = _probe_sets(world, registered)
    report = evaluate(det, sets, names)
    report["throughput"] = [throughput(det, sets, c) for c in concurrency]
    report.update({"targets": len(names), "world_targets": len(registered), "threshold": det.threshold,
                   "calibration": calib, "detector_load_s": round(load_s, 2),
                   "approximate_index": bool(det.vectors is not None and det.vectors.approximate),
                   "embeddings": det.vectors is not None, "hidden_state": hidden_stats})
    store.close()
    return report


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        f"Detection on the demo world: {report['world_targets']} forget people registered "
        f"({report['targets']} targets in all), embedding threshold {report['threshold']:.3f}.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| recall, forget questions | {s['forget_recall']:.3f} | >= 0.98 |",
        f"| recall, held-out paraphrases | {s['paraphrase_recall']:.3f} | >= 0.98 |",
        f"| recall, adversarial probes (all) | {s['adversarial_recall']:.3f} | >= 0.90 |",
        f"| recall, RWKU's 9 types | {s['rwku_recall']:.3f} | |",
        f"| recall, obfuscations | {s['obfuscation_recall']:.3f} | |",
        f"| false positives, retain questions | {s['retain_fp_rate']:.4f} | <= 0.01 |",
        f"| false positives, world facts | {s['world_facts_fp_rate']:.4f} | |",
        f"| latency per conversation p50 / p99 | {report['latency_ms']['p50']:.2f} / {report['latency_ms']['p99']:.2f} ms | |",
        f"| GUARD hidden-state MLP | {'on: ' + str(report['hidden_state']) if report.get('hidden_state') else 'off'} | |",
        "",
        "| probe set | n | recall / FP rate | caught lexically |",
        "|---|---|---|---|",
    ]
    for k, r in report["sets"].items():
        val = r.get("recall", r.get("fp_rate"))
        lex = r.get("lexical_share")
        lines.append(f"| {k} | {r['n']} | {val:.3f} | {'' if lex is None else f'{lex:.3f}'} |")
    return "\n".join(lines)

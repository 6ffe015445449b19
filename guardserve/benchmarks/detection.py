"""Detection benchmark: latency per conversation (p50, p99) and recall / false positives
with 10, 1,000 and 100,000 registered targets (the demo world's forget people, then
synthetic targets), and conversations per second with 1 and 32 threads detecting at once
(concurrent requests' embeddings are batched together), printed as a table and written as JSON.

    python -m guardserve.benchmarks.detection                    # all three scales
    python -m guardserve.benchmarks.detection --scales 10,1000   # quicker

At each scale the same probes are also read by a peer embedder backend (``--peer-backend``,
default ``onnx``: the float32 graph) in the same run, so the served reader
(``GUARDSERVE_EMBEDDER_BACKEND``, default int8) is measured against it.

Writes ``bench/results/detection.json`` of the repository (``--out FILE`` elsewhere).
``guardserve bench`` runs it.

The first run at 100,000 targets embeds about 120,000 target texts (minutes on two
cores); their vectors are cached in $GUARDSERVE_HOME/cache/bench-vectors.sqlite, so later
runs start in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from guardserve.benchmarks.cli import default_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guardserve.benchmarks.detection", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="10,1000,100000", help="comma-separated target counts")
    ap.add_argument("--seed", type=int, default=0, help="demo world seed")
    ap.add_argument("--out", default=default_out("detection.json"), help="where the JSON goes (default: %(default)s)")
    ap.add_argument("--no-embeddings", action="store_true", help="lexical matcher only")
    ap.add_argument("--concurrency", default="1,32",
                    help="comma-separated numbers of threads detecting at once, for conversations/s "
                         "(default: %(default)s; empty: skip)")
    ap.add_argument("--peer-backend", default="onnx",
                    help="embedder backend measured beside the served one at each scale, in the same run "
                         "(default: %(default)s; empty: none)")
    args = ap.parse_args(argv)

    from guardserve import config
    from guardserve.classifiers.detector import DetectorConfig
    from guardserve.classifiers.evaluation import detection_report
    from guardserve.demo.world import build_world

    world = build_world(seed=args.seed)
    cache = config.home() / "cache" / "bench-vectors.sqlite"
    rows = []
    for n in [int(x) for x in args.scales.split(",") if x.strip()]:
        print(f"== {n} targets", flush=True)
        t0 = time.time()
        cfg = DetectorConfig(use_embeddings=not args.no_embeddings, vector_cache=str(cache))
        rep = detection_report(world, n_targets=n, config=cfg, progress=lambda m: print(f"   {m}", flush=True),
                               concurrency=tuple(int(x) for x in args.concurrency.split(",") if x.strip()))
        rep["wall_s"] = round(time.time() - t0, 1)
        rep["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        rows.append({"targets": n, **rep})
        s, lat = rep["summary"], rep["latency_ms"]
        print(f"   p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  forget {s['forget_recall']:.3f}  "
              f"paraphrase {s['paraphrase_recall']:.3f}  adversarial {s['adversarial_recall']:.3f}  "
              f"retain FP {s['retain_fp_rate']:.4f}  world FP {s['world_facts_fp_rate']:.4f}", flush=True)
        for tp in rep["throughput"]:
            print(f"   concurrency {tp['concurrency']}: {tp['conversations_per_s']:.0f} conversations/s, "
                  f"p50 {tp['p50_ms']:.2f} ms, p99 {tp['p99_ms']:.2f} ms", flush=True)
        if args.peer_backend and not args.no_embeddings:
            from guardserve.classifiers.embedding import Embedder

            print(f"   the same probes, read by the {args.peer_backend} backend", flush=True)
            peer = detection_report(world, n_targets=n, config=DetectorConfig(vector_cache=str(cache)),
                                    progress=lambda m: print(f"   {m}", flush=True), embedder=Embedder(backend=args.peer_backend),
                                    concurrency=tuple(int(x) for x in args.concurrency.split(",") if x.strip()))
            rows[-1]["peer"] = {"embedder_backend": args.peer_backend,
                                **{k: peer[k] for k in ("summary", "latency_ms", "throughput", "threshold")}}
            print(f"   {args.peer_backend}: p50 {peer['latency_ms']['p50']:.2f} ms; " + ", ".join(
                f"concurrency {tp['concurrency']}: {tp['conversations_per_s']:.0f} conversations/s"
                for tp in peer["throughput"]), flush=True)

    print()
    print("| targets | world targets | load s | p50 ms | p99 ms | forget | paraphrase | adversarial | retain FP | world-facts FP | index |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, lat = r["summary"], r["latency_ms"]
        print(f"| {r['targets']:,} | {r['world_targets']} | {r['detector_load_s']} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
              f"{s['forget_recall']:.3f} | {s['paraphrase_recall']:.3f} | {s['adversarial_recall']:.3f} | "
              f"{s['retain_fp_rate']:.4f} | {s['world_facts_fp_rate']:.4f} | "
              f"{'IVF (approx.)' if r['approximate_index'] else ('flat' if r['embeddings'] else 'none')} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
                               "embedder_backend": config.get("GUARDSERVE_EMBEDDER_BACKEND"), "runs": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

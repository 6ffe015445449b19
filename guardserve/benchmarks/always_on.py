"""Always-on targets end to end: one guarded server, a short chat at a time, as always-on
targets are registered in bulk calls; each figure is a ratio against the same server with
none registered, in the same run.

An always-on target (mode ``always``) triggers on every request of its tenant, so every
request carries it to the engine (as one of a few set parts, each a few hundred targets
compiled as one). This measures what that costs a client: the request right after a
registration, steady requests after it (their latency and vLLM's engine-side TPOT), and the
slowest request of each step. Each request writes 16 tokens; TPOT is vLLM's engine-side
mean over the steady requests, the inter-token latency's p50 is read from 5%-wide buckets.

    python -m guardserve.benchmarks.always_on                      # 100, 1,000, 2,000 targets
    python -m guardserve.benchmarks.always_on --steps 1000x20      # 20 bulk calls of 1,000 (issue 17)

Writes ``bench/results/always_on.json`` of the repository (``--out FILE`` elsewhere; not run
by ``guardserve bench``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from guardserve.benchmarks.cli import default_out
from guardserve.benchmarks.serving import ADMIN_KEY, ENGINE_ARGS, MODEL, histogram_delta, histogram_stats, scrape

TPOT = "vllm:request_time_per_output_token_seconds"  # its mean (sum / count) is exact
ITL = "vllm:inter_token_latency_seconds"  # fine buckets (ENGINE_ARGS): its p50 is read from them
TOKENS = 16


def run(url: str, steps: list[int], question: str, repeats: int = 5) -> dict:
    import httpx

    admin = httpx.Client(base_url=url + "/v1/unlearning", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=1800)
    client = httpx.Client(base_url=url, timeout=600)

    def ask() -> float:
        t0 = time.perf_counter()
        r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": TOKENS, "min_tokens": TOKENS,
                                                      "temperature": 0,
                                                      "messages": [{"role": "user", "content": question}]})
        r.raise_for_status()
        return time.perf_counter() - t0

    def measure() -> dict:
        """The first request, then ``repeats`` more with vLLM's engine-side TPOT read around them."""
        first = ask()
        before = scrape(url, {})
        steady = [ask() for _ in range(repeats)]
        for _ in range(50):  # vLLM records a request's stats as it finishes
            after = scrape(url, {})
            if after[TPOT]["count"] - before[TPOT]["count"] >= repeats:
                break
            time.sleep(0.1)
        tpot = histogram_stats(histogram_delta(before[TPOT], after[TPOT]))["mean"]
        itl = histogram_stats(histogram_delta(before[ITL], after[ITL]))["p50"]
        return {"first_request_s": round(first, 4), "steady_request_s": round(statistics.median(steady), 4),
                "slowest_request_s": round(max([first, *steady]), 4), "tpot_ms": tpot, "itl_p50_ms": itl}

    ask()  # the server's first request (warm-up) is nobody's figure
    none = measure()
    rows, total = [], 0
    for n in steps:
        t0 = time.perf_counter()
        r = admin.post("/targets", json=[{"name": f"Always Person {total + i}", "aliases": [f"Alwaysp{total + i}"],
                                          "mode": "always", "facts": {"birth_place": f"Alwaysville {total + i}"}}
                                         for i in range(n)])
        r.raise_for_status()
        registered_s = time.perf_counter() - t0
        total += n
        m = measure()
        rows.append({"always_on_targets": total, "register_s": round(registered_s, 2), **m,
                     "first_over_none": round(m["first_request_s"] / none["steady_request_s"], 2),
                     "steady_over_none": round(m["steady_request_s"] / none["steady_request_s"], 2),
                     "tpot_over_none": round(m["tpot_ms"] / none["tpot_ms"], 2) if m["tpot_ms"] and none["tpot_ms"]
                     else None})
        row = rows[-1]
        print(f"  {total:>6,} always-on (registered in {registered_s:.1f} s): first request "
              f"{row['first_request_s'] * 1000:.0f} ms ({row['first_over_none']:.1f}x none), then "
              f"{row['steady_request_s'] * 1000:.0f} ms ({row['steady_over_none']:.1f}x), TPOT {row['tpot_ms']} ms "
              f"({row['tpot_over_none']}x), slowest {row['slowest_request_s'] * 1000:.0f} ms", flush=True)
    return {"benchmark": "always_on", "question": question, "repeats": repeats, "max_tokens": TOKENS,
            "none_request_s": none["steady_request_s"], "none_tpot_ms": none["tpot_ms"], "none": none, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guardserve.benchmarks.always_on", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="100,900,1000",
                    help="always-on targets registered per bulk call, in turn; NxK: K calls of N (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=10,
                    help="steady requests per step, after the first (default: %(default)s)")
    ap.add_argument("--out", default=default_out("always_on.json"), help="where the JSON goes (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        steps = []
        for x in args.steps.split(","):
            n, _, times = x.strip().partition("x")
            steps += [int(n)] * int(times or 1) if n else []
    except ValueError:
        ap.error("--steps takes comma-separated numbers of targets, e.g. 100,900,1000 (1000x20: 20 calls of 1,000)")
    if not steps or min(steps) < 1:
        ap.error("--steps takes positive numbers of targets")
    if args.repeats < 1:
        ap.error("--repeats takes a positive number of requests")

    from guardserve.demo import ensure_demo
    from guardserve.server.process import start_server

    world = ensure_demo().load_world()
    tmp = Path(tempfile.mkdtemp(prefix="guardserve-always-on-"))
    print(f"starting a guarded server (log: {tmp / 'server.log'}) ...", flush=True)
    server = start_server(["--", *ENGINE_ARGS], tmp / "server.log", env={"GUARDSERVE_DB": str(tmp / "policy.db"),
                                                       "GUARDSERVE_ADMIN_KEY": ADMIN_KEY})
    try:
        report = run(server.base_url, steps, world["retain"][0]["question"], repeats=args.repeats)
    finally:
        server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Always-on targets end to end: one guarded server, a short chat at a time, as always-on
targets are registered in bulk calls; each figure is a ratio against the same server with
none registered, in the same run.

An always-on target (mode ``always``) triggers on every request of its tenant, so every
request carries it to the engine and its filter part is merged in. This measures what that
costs a client: the request right after a registration, and steady requests after it.

    python -m guardserve.benchmarks.always_on                      # 100, 1,000, 2,000 targets
    python -m guardserve.benchmarks.always_on --steps 100,900,1000,18000   # up to 20,000

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

ADMIN_KEY = "always-on-bench"
MODEL = "guardserve-demo"


def run(url: str, steps: list[int], question: str, repeats: int = 5) -> dict:
    import httpx

    admin = httpx.Client(base_url=url + "/v1/unlearning", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=1800)
    client = httpx.Client(base_url=url, timeout=600)

    def ask() -> float:
        t0 = time.perf_counter()
        r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 16,
                                                      "messages": [{"role": "user", "content": question}]})
        r.raise_for_status()
        return time.perf_counter() - t0

    ask()  # the server's first request (warm-up) is nobody's figure
    none = statistics.median(ask() for _ in range(repeats))
    rows, total = [], 0
    for n in steps:
        t0 = time.perf_counter()
        r = admin.post("/targets", json=[{"name": f"Always Person {total + i}", "aliases": [f"Alwaysp{total + i}"],
                                          "mode": "always", "facts": {"birth_place": f"Alwaysville {total + i}"}}
                                         for i in range(n)])
        r.raise_for_status()
        registered_s = time.perf_counter() - t0
        total += n
        first = ask()
        steady = statistics.median(ask() for _ in range(repeats))
        rows.append({"always_on_targets": total, "register_s": round(registered_s, 2),
                     "first_request_s": round(first, 4), "steady_request_s": round(steady, 4),
                     "first_over_none": round(first / none, 2), "steady_over_none": round(steady / none, 2)})
        print(f"  {total:>6,} always-on: first request {first * 1000:.0f} ms ({first / none:.1f}x none), "
              f"then {steady * 1000:.0f} ms ({steady / none:.1f}x)", flush=True)
    return {"benchmark": "always_on", "question": question, "repeats": repeats,
            "none_request_s": round(none, 4), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guardserve.benchmarks.always_on", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="100,900,1000",
                    help="always-on targets registered per bulk call, in turn (default: %(default)s)")
    ap.add_argument("--out", default=default_out("always_on.json"), help="where the JSON goes (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        steps = [int(x) for x in args.steps.split(",") if x.strip()]
    except ValueError:
        ap.error("--steps takes comma-separated numbers of targets, e.g. 100,900,1000")
    if not steps or min(steps) < 1:
        ap.error("--steps takes positive numbers of targets")

    from guardserve.demo import ensure_demo
    from guardserve.server.process import start_server

    world = ensure_demo().load_world()
    tmp = Path(tempfile.mkdtemp(prefix="guardserve-always-on-"))
    print(f"starting a guarded server (log: {tmp / 'server.log'}) ...", flush=True)
    server = start_server([], tmp / "server.log", env={"GUARDSERVE_DB": str(tmp / "policy.db"),
                                                       "GUARDSERVE_ADMIN_KEY": ADMIN_KEY})
    try:
        report = run(server.base_url, steps, world["retain"][0]["question"])
    finally:
        server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

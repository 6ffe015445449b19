"""Load test of the guarded server: concurrent streaming clients while the policy changes.

64 clients stream chat and completion answers to forget and retain questions of the demo
world for 2 minutes, while targets are added, changed and removed through the admin API
twice a second. Reports 5xx errors, leaks (a forget answer that states its fact value, as
:func:`guardserve.leak.fact_leaked` reads it: whole words, so "Tesiar" does not state "Tesia"),
retain accuracy, and latency (time to first token and to the last one, p50/p99).
Loopback only: it starts its own server on 127.0.0.1 unless --url names one there.

    python -m guardserve.benchmarks.load_test                       # 64 clients, 120 s
    python -m guardserve.benchmarks.load_test --clients 16 --duration 20

Writes bench/results/load.json of the repository (--out FILE elsewhere; not run by
``guardserve bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from guardserve.benchmarks.cli import default_out
from guardserve.leak import fact_leaked

MODEL = "guardserve-demo"
ADMIN_KEY = "load-test-admin"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def stream_one(client, route: str, question: str) -> tuple[int, str, float, float]:
    """One streamed request: (status, text, ttft_s, total_s)."""
    from guardserve.textgen import completion_prompt

    if route == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": question}]}
    else:
        path, body = "/v1/completions", {"prompt": completion_prompt(question)}
    body.update(model=MODEL, max_tokens=40, temperature=0, stream=True)
    start = time.perf_counter()
    ttft, parts = None, []
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.text, float("nan"), time.perf_counter() - start
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = choice.get("text") if route != "chat" else (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    parts.append(piece)
    return 200, "".join(parts), ttft if ttft is not None else float("nan"), time.perf_counter() - start


async def run(url: str, clients: int, duration: float, world: dict, seed: int, admin_key: str = ADMIN_KEY,
              api_key: str | None = None, bulk: int = 0) -> dict:
    import httpx

    rng = random.Random(seed)
    forget_people = [e for e in world["entities"] if e["split"] == "forget"]
    admin = httpx.AsyncClient(base_url=url + "/v1/unlearning", headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = await admin.post("/targets", json=[{"name": e["name"], "aliases": e["aliases"][1:], "facts": e["facts"]} for e in forget_people])
    r.raise_for_status()
    forget_ids = [t["id"] for t in r.json()["targets"]]
    bulk_s = None
    if bulk:
        # One JSON list of synthetic people, registered before the load starts; the
        # server embeds them in the background while the clients run.
        t0 = time.perf_counter()
        r = await admin.post("/targets", json=[{"name": f"Bulk Person {seed}-{i}", "aliases": [f"Bulkp{seed}x{i}"],
                                                 "facts": {"birth_place": f"Bulkville {i}"}} for i in range(bulk)], timeout=1800)
        r.raise_for_status()
        bulk_s = time.perf_counter() - t0
        assert r.json()["count"] == bulk
    await asyncio.sleep(1.0)

    questions = [("forget", p, p[f]) for p in world["forget"] for f in ("question", "paraphrased_question")]
    questions += [("retain", p, p["question"]) for p in rng.sample(world["retain"], 400)]
    results: list[dict] = []
    churn: list[float] = []
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def client_loop(i: int):
        crng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=auth) as client:
            while time.monotonic() < deadline:
                kind, pair, q = crng.choice(questions)
                route = crng.choice(["chat", "completions"])
                try:
                    status, text, ttft, total = await stream_one(client, route, q)
                except httpx.HTTPError as e:
                    status, text, ttft, total = 599, f"{type(e).__name__}: {e}", float("nan"), float("nan")
                results.append({"kind": kind, "route": route, "status": status, "ttft": ttft, "total": total,
                                "hit": fact_leaked(text, pair["value"]), "text": text[:200], "question": q})

    admin_errors: list[str] = []

    async def churn_loop():
        """Add a synthetic target, change a forget one, remove an older synthetic one."""
        live: list[str] = []
        k = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            k += 1
            try:
                r = await admin.post("/targets", json={"name": f"Synthetic Person {seed}-{k}", "aliases": [f"Synthperson{k}"],
                                                       "facts": {"birth_place": f"Nowhere {k}"}})
                if r.status_code == 201:
                    live.append(r.json()["id"])
                else:
                    admin_errors.append(f"add: {r.status_code} {r.text[:100]}")
                tid = rng.choice(forget_ids)
                r = await admin.patch(f"/targets/{tid}", json={"description": f"revision {k}"})
                if r.status_code != 200:
                    admin_errors.append(f"patch: {r.status_code} {r.text[:100]}")
                if len(live) > 5:
                    r = await admin.delete(f"/targets/{live.pop(0)}")
                    if r.status_code != 204:
                        admin_errors.append(f"delete: {r.status_code} {r.text[:100]}")
            except httpx.HTTPError as e:
                admin_errors.append(f"{type(e).__name__}: {e}")
            churn.append(time.perf_counter() - t0)
            await asyncio.sleep(0.5)
        for tid in live:
            await admin.delete(f"/targets/{tid}")

    started = time.monotonic()
    await asyncio.gather(churn_loop(), *(client_loop(i) for i in range(clients)))
    elapsed = time.monotonic() - started
    for tid in forget_ids:  # bulk targets stay: deleting 100,000 one call at a time is its own test
        await admin.delete(f"/targets/{tid}")
    await admin.aclose()

    ok = [r for r in results if r["status"] == 200]
    forget = [r for r in ok if r["kind"] == "forget"]
    retain = [r for r in ok if r["kind"] == "retain"]
    leaks = [r for r in forget if r["hit"]]
    return {
        "clients": clients,
        "duration_s": round(elapsed, 1),
        "requests": len(results),
        "requests_per_s": round(len(results) / elapsed, 2),
        "status_5xx": sum(500 <= r["status"] < 600 for r in results),
        "status_other_non_200": sum(r["status"] != 200 and not 500 <= r["status"] < 600 for r in results),
        "forget_answers": len(forget),
        "leaks": len(leaks),
        "leak_examples": [{"route": r["route"], "question": r["question"], "answer": r["text"]} for r in leaks[:3]],
        "retain_answers": len(retain),
        "retain_accuracy": round(sum(r["hit"] for r in retain) / max(1, len(retain)), 4),
        "ttft_p50_ms": round(1000 * pct([r["ttft"] for r in ok if r["ttft"] == r["ttft"]], 0.5), 1),
        "ttft_p99_ms": round(1000 * pct([r["ttft"] for r in ok if r["ttft"] == r["ttft"]], 0.99), 1),
        "latency_p50_ms": round(1000 * pct([r["total"] for r in ok], 0.5), 1),
        "latency_p99_ms": round(1000 * pct([r["total"] for r in ok], 0.99), 1),
        "bulk_targets": bulk,
        "bulk_register_s": round(bulk_s, 1) if bulk_s is not None else None,
        "policy_changes": len(churn),
        "admin_errors": len(admin_errors),
        "admin_error_examples": admin_errors[:3],
        "policy_change_p50_ms": round(1000 * statistics.median(churn), 1) if churn else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guardserve.benchmarks.load_test", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running guarded server on loopback")
    ap.add_argument("--admin-key", default=ADMIN_KEY, help="its GUARDSERVE_ADMIN_KEY (with --url)")
    ap.add_argument("--api-key", default=None, help="an inference key of it, if it has GUARDSERVE_API_KEYS (with --url)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bulk", type=int, default=0, help="first register this many synthetic targets in one call (e.g. 100000)")
    ap.add_argument("--out", default=default_out("load.json"), help="where the JSON goes (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.clients < 1 or not 0 < args.duration <= 900:
        ap.error("--clients must be >= 1 and --duration in (0, 900] seconds")

    from guardserve.demo import ensure_demo

    demo = ensure_demo()
    world = demo.load_world()
    server = None
    if args.url:
        host = urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            ap.error("--url must be a loopback address: this test never sends load elsewhere")
        url = args.url.rstrip("/")
    else:
        from guardserve.server.process import start_server

        tmp = Path(tempfile.mkdtemp(prefix="guardserve-load-"))
        print(f"starting a guarded server (log: {tmp / 'server.log'}) ...", flush=True)
        server = start_server([], tmp / "server.log", env={"GUARDSERVE_DB": str(tmp / "policy.db"), "GUARDSERVE_ADMIN_KEY": ADMIN_KEY,
                                                           "GUARDSERVE_AUDIT_LOG": str(tmp / "audit.jsonl")})
        url = server.base_url
    try:
        print(f"{args.clients} streaming clients for {args.duration:.0f} s against {url} ...", flush=True)
        report = asyncio.run(run(url, args.clients, args.duration, world, args.seed, args.admin_key, args.api_key, args.bulk))
    finally:
        if server is not None:
            server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    rows = [(k, v) for k, v in report.items() if not k.endswith("_examples")]
    print("\n| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print(f"\nwritten to {args.out}")
    return 1 if report["status_5xx"] or report["leaks"] or report["admin_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving latency of a guarded server against plain vLLM: TTFT and TPOT of streaming chat
completions on the demo model, for the same requests, measured in one run.

Two servers with the same engine arguments are started one after the other (never both
at once): PLAIN vLLM (no guardserve plugin, no guardserve logits processor: its entry
points are hidden from that process) and GUARDED (`guardserve serve`, the demo forget
people registered as targets through the admin API, API keys on). Each gets:

- retain questions: on the guarded server no target triggers (the fast path: auth and
  detection only);
- forget questions: on the guarded server a target triggers (detection, the in-context
  unlearning prompt and the logit filter in the engine);
- before those, one question about each forget person at concurrency 1 (`forget_first`):
  on the guarded server the first request naming each target, which compiles its filter;
- plain vLLM only: the forget questions as the guarded server puts them to its engine, with
  the in-context unlearning prompt it writes (`forget_icul`). That prompt is about 18 times
  the question's length, and what it costs plain vLLM is ICUL's own price, which any server
  that unlearns in context pays; guarded ÷ this (`forget_vs_icul`) is the guard's cost
  beyond it (detection, the filter, the ICUL rendering);

at concurrency 1 and 8. Each cell sends one set of questions for one token, then another
set for full answers of `max_tokens` tokens (`min_tokens` equal, so TPOT averages over the
same number of steps everywhere).

- TTFT, measured by the client on the one-token answers: request sent to the first content
  token (auth, detection, the longer guarded prompt and its prefill included). On this tiny
  model the engine outpaces vLLM's API server, which then merges a stream's tokens into one
  chunk, sometimes the whole answer: the first token of a long answer can reach the client
  only with the last, so TTFT is not taken from them (kept as `stream_ttft_ms`).
- TPOT: vLLM's own per-request time per output token (decode time / (tokens - 1), engine
  timestamps) over the full answers, read from its /metrics histogram, which both servers
  get with 5%-wide buckets (the client-side figure is kept as `stream_tpot_ms`).
- latency: client side, request sent to the end of a full answer.

Reported: p50, p90 and mean per cell, and guarded / plain ratios.

    python -m guardserve.benchmarks.serving            # full: 64 requests a cell, 32 tokens, 2 rounds (about 6-8 min)
    python -m guardserve.benchmarks.serving --quick    # CI size: 12 a cell, 16 tokens, 1 round (under 2 min)

With --rounds 2 the servers alternate (plain, guarded, plain, guarded) and samples are
pooled per server, so a change in the machine's load during the run weighs on both.
Prints a Markdown table; writes bench/results/serving.json of the repository (--out FILE
elsewhere). ``guardserve bench`` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from guardserve.benchmarks.cli import default_out

MODEL = "guardserve-demo"
ADMIN_KEY = "bench-serving-admin"
API_KEY, TENANT = "bench-serving-key", "bench"

# Put first on the plain server's PYTHONPATH: vLLM finds logits processors and plugins
# through entry points (the logits-processor group is loaded whatever VLLM_PLUGINS says);
# this hides guardserve's from every process of that server, so it is vLLM alone.
HIDE_GUARDSERVE = '''\
import importlib.metadata as _md
import sys as _sys

_entry_points = _md.entry_points


def entry_points(**params):
    eps = _entry_points(**params)
    group = params.get("group") or ""
    if group.startswith("vllm."):
        kept = [ep for ep in eps if not ep.value.startswith("guardserve")]
        if len(kept) != len(eps):
            print(f"guardserve.benchmarks.serving: hid guardserve entry points of {group}", file=_sys.stderr, flush=True)
            eps = _md.EntryPoints(kept)
    return eps


_md.entry_points = entry_points
'''


def stats(values: list[float]) -> dict:
    v = sorted(x for x in values if x == x)
    if not v:
        return {"p50": None, "p90": None, "mean": None, "n": 0}
    q = lambda p: v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))]  # noqa: E731 (nearest rank)
    return {"p50": round(1000 * q(0.5), 2), "p90": round(1000 * q(0.9), 2),
            "mean": round(1000 * statistics.fmean(v), 2), "n": len(v)}


# Fine histogram buckets (5% apart, 0.1 ms to 60 s) for vLLM's latency histograms on both
# servers, so that percentiles of its engine-side timings can be read from /metrics.
BUCKETS = [float(f"{1e-4 * 1.05 ** k:.6g}") for k in range(273)]
ENGINE_ARGS = ["--custom-histogram-buckets", json.dumps({"time_to_first_token": BUCKETS,
                                                         "inter_token_latency": BUCKETS,
                                                         "request_latency": BUCKETS})]
# vLLM histogram → our name: per request TPOT (decode time / (tokens - 1), engine timestamps),
# per token inter-token latency, and TTFT from the request reaching vLLM's engine client.
HISTOGRAMS = {"vllm:request_time_per_output_token_seconds": "tpot",
              "vllm:inter_token_latency_seconds": "itl",
              "vllm:time_to_first_token_seconds": "engine_ttft",
              "vllm:request_prompt_tokens": "prompt_tokens"}  # a count, not seconds: only its mean is read


def scrape(url: str, headers: dict) -> dict:
    """{histogram: {"buckets": {le: cumulative count}, "sum", "count"}} from /metrics, summed over label sets.
    A guarded server's /metrics needs the admin key (plain vLLM ignores it)."""
    import re

    import httpx

    r = httpx.get(url + "/metrics", headers={**headers, "Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    r.raise_for_status()
    text = r.text
    out = {h: {"buckets": {}, "sum": 0.0, "count": 0.0} for h in HISTOGRAMS}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
    for line in text.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        for h, acc in out.items():
            if name == h + "_bucket":
                le = re.search(r'le="([^"]+)"', labels).group(1)
                le = float("inf") if le == "+Inf" else float(le)
                acc["buckets"][le] = acc["buckets"].get(le, 0.0) + value
            elif name == h + "_sum":
                acc["sum"] += value
            elif name == h + "_count":
                acc["count"] += value
    return out


def histogram_delta(before: dict, after: dict) -> dict:
    """What happened between two scrapes of one histogram."""
    return {"buckets": {le: c - before["buckets"].get(le, 0.0) for le, c in after["buckets"].items()},
            "sum": after["sum"] - before["sum"], "count": after["count"] - before["count"]}


def histogram_add(parts: list[dict]) -> dict:
    out = {"buckets": {}, "sum": 0.0, "count": 0.0}
    for h in parts:
        for le, c in h["buckets"].items():
            out["buckets"][le] = out["buckets"].get(le, 0.0) + c
        out["sum"] += h["sum"]
        out["count"] += h["count"]
    return out


def histogram_stats(h: dict) -> dict:
    """p50 / p90 (nearest rank, linear within its 5% bucket) and the exact mean, in ms."""
    count = h["count"]
    if count <= 0:
        return {"p50": None, "p90": None, "mean": None, "n": 0}
    les = sorted(h["buckets"])
    cum = [h["buckets"][le] for le in les]

    def q(p):
        rank = max(1.0, math.ceil(p * count))
        prev_le, prev_c = 0.0, 0.0
        for le, c in zip(les, cum):
            if c >= rank:
                if le == float("inf"):
                    return prev_le
                return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-9)
            prev_le, prev_c = le, c
        return prev_le

    return {"p50": round(1000 * q(0.5), 3), "p90": round(1000 * q(0.9), 3),
            "mean": round(1000 * h["sum"] / count, 3), "n": int(count)}


async def one_request(client, question: str | list[dict], max_tokens: int) -> dict:
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
            "min_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    parts, usage = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "error": r.text[:300]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    last = time.perf_counter()
                    first = first or last
                    parts.append(piece)
    end = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens") or len(parts)
    return {"status": 200, "text": "".join(parts), "tokens": tokens,
            "ttft": (first or end) - start,  # no text at all (a one-token answer that decodes to ""): the end
            "tpot": (last - first) / (tokens - 1) if first and tokens > 1 else float("nan"),
            "latency": end - start}


async def run_cell(url: str, headers: dict, pairs: list[dict], concurrency: int, max_tokens: int) -> dict:
    """Send every question of ``pairs`` with ``concurrency`` requests in flight."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for p in pairs:
        queue.put_nowait(p)
    results: list[dict] = []
    # A new connection per request: on a kept-alive one, the server's small SSE writes can
    # wait for the client's delayed ACK (Nagle), adding up to 40 ms to some requests.
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=0)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
        async def worker():
            while not queue.empty():
                p = queue.get_nowait()
                try:
                    r = await one_request(client, p.get("messages") or p["q"], max_tokens)
                except httpx.HTTPError as e:
                    r = {"status": 599, "error": f"{type(e).__name__}: {e}"}
                r["hit"] = r.get("status") == 200 and p["value"].lower() in r["text"].lower()
                results.append(r)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    errors = [r for r in results if r["status"] != 200]
    return {"requests": len(results), "errors": len(errors), "error_examples": [r["error"] for r in errors[:3]],
            "ttft": [r["ttft"] for r in ok], "stream_tpot": [r["tpot"] for r in ok], "latency": [r["latency"] for r in ok],
            "tokens": sum(r["tokens"] for r in ok), "hits": sum(r["hit"] for r in ok), "wall_s": wall}


def measured_cell(url: str, headers: dict, cell: dict, concurrency: int, max_tokens: int) -> dict:
    """One cell: its one-token requests (TTFT), then its full answers with vLLM's
    engine-side histograms read before and after them (TPOT)."""
    out = {"first": None, "decode": None, "engine": None}
    if cell["first"]:
        out["first"] = asyncio.run(run_cell(url, headers, cell["first"], concurrency, 1))
    if cell["decode"]:
        before = scrape(url, headers)
        out["decode"] = res = asyncio.run(run_cell(url, headers, cell["decode"], concurrency, max_tokens))
        key = "vllm:request_time_per_output_token_seconds"
        for _ in range(50):  # vLLM records a request's stats as it finishes; wait for the last one
            after = scrape(url, headers)
            if after[key]["count"] - before[key]["count"] >= len(res["ttft"]):
                break
            time.sleep(0.1)
        out["engine"] = {name: histogram_delta(before[h], after[h]) for h, name in HISTOGRAMS.items()}
    return out


def question_sets(world: dict, n: int, concurrencies: list[int], seed: int) -> tuple[dict, list[dict]]:
    """Disjoint questions per (set, concurrency) cell, so no cell finds its prompts in the
    prefix cache of an earlier one; the same questions for both servers."""
    rng = random.Random(seed)
    forget = [{"q": p[k], "value": p["value"], "entity": p["entity"]}
              for p in world["forget"] for k in ("question", "paraphrased_question")]
    retain = [{"q": p["question"], "value": p["value"], "entity": p["entity"]} for p in world["retain"]]
    rng.shuffle(forget)
    rng.shuffle(retain)
    need = 2 * n * len(concurrencies)
    if need > len(forget):
        raise SystemExit(f"--requests {n} with {len(concurrencies)} concurrencies needs {need} forget questions "
                         f"(one-token and full answers); "
                         f"the demo world has {len(forget)}")
    # First: one question about each forget person (a trained wording not in the pools),
    # one token, at concurrency 1. On the guarded server it is the first request naming
    # that target, so it pays for compiling the target's filter; later ones find it cached.
    seen, first = set(), []
    for p in world["forget"]:
        if p["entity"] not in seen:
            seen.add(p["entity"])
            first.append({"q": p["train_questions"][1], "value": p["value"], "entity": p["entity"]})
    cells = {("forget_first", 1): {"first": first, "decode": []}}
    for i, c in enumerate(concurrencies):
        a, b, e = 2 * i * n, (2 * i + 1) * n, (2 * i + 2) * n
        cells[("retain", c)] = {"first": retain[a:b], "decode": retain[b:e]}
        cells[("forget", c)] = {"first": forget[a:b], "decode": forget[b:e]}
    warm = retain[-8:]  # warms the server up without naming any target
    return cells, warm


def icul_cells(world: dict, cells: dict, tokenizer) -> tuple[dict, list[dict]]:
    """For the plain server only: each triggered cell's questions as the guarded server puts
    them to its engine (the serving default's in-context unlearning prompt for the person the
    question names), so that plain vLLM answering them measures what that longer prompt costs
    by itself, and guarded ÷ this the guard's own cost beyond it. With them, a warm-up of one
    such prompt per person (unmeasured): the guarded server's `forget_first` cell has put
    each person's instruction and demonstrations in its prefix cache before its triggered
    cells, and plain vLLM gets the same start."""
    from guardserve.prompting import InContextUnlearner

    icul = InContextUnlearner()  # what GuardService builds when the configuration has ICUL
    people = {e["name"]: {"name": e["name"], "aliases": e["aliases"][1:], "facts": e["facts"]}
              for e in world["entities"] if e["split"] == "forget"}

    def guarded(p: dict) -> dict:
        messages = icul.build_messages([{"role": "user", "content": p["q"]}], [people[p["entity"]]], tokenizer=tokenizer)
        return {**p, "messages": messages}

    sets = {(ICUL_SET, c): {"first": [guarded(p) for p in cell["first"]], "decode": [guarded(p) for p in cell["decode"]]}
            for (kind, c), cell in cells.items() if kind == "forget"}
    return sets, [guarded(p) for p in cells[("forget_first", 1)]["first"]]


def measure(url: str, headers: dict, cells: dict, warm: list[dict], max_tokens: int, warm_conc: int,
            skip: tuple = ()) -> dict:
    """Warm the server up (not measured), then run every cell in a fixed order (but the sets in ``skip``)."""
    asyncio.run(run_cell(url, headers, warm[:4], 1, max_tokens))
    asyncio.run(run_cell(url, headers, warm, warm_conc, max_tokens))
    out = {}
    for key, cell in cells.items():
        if key[0] in skip:
            continue
        out[key] = c = measured_cell(url, headers, cell, key[1], max_tokens)
        runs = [r for r in (c["first"], c["decode"]) if r]
        print(f"    {key[0]:>12} c={key[1]:<2} {sum(r['requests'] for r in runs)} requests in "
              f"{sum(r['wall_s'] for r in runs):.1f} s, TTFT p50 {stats(c['first']['ttft'])['p50'] if c['first'] else '-'} ms, "
              f"TPOT p50 {histogram_stats(c['engine']['tpot'])['p50'] if c['engine'] else '-'} ms"
              + (f", {sum(r['errors'] for r in runs)} errors" if any(r["errors"] for r in runs) else ""), flush=True)
    return out


def plain_launch(model: str, tmp: Path, engine_args: list[str]) -> tuple[list[str], list[str], dict]:
    """(command, args, env) for plain vLLM: the launcher's exact argv, minus guardserve."""
    from guardserve.server.launcher import vllm_command

    argv = vllm_command(model, host="127.0.0.1", port=0, served_model_name=MODEL, extra=engine_args)
    i = argv.index("--port")
    del argv[i:i + 2]  # start_server adds its own free port
    (tmp / "hide").mkdir(exist_ok=True)
    (tmp / "hide" / "sitecustomize.py").write_text(HIDE_GUARDSERVE)
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p.strip() and p.strip() != "guardserve"]
    env = {"VLLM_PLUGINS": ",".join(plugins),
           "PYTHONPATH": os.pathsep.join(x for x in (str(tmp / "hide"), os.environ.get("PYTHONPATH")) if x)}
    return argv[:3], argv[3:], env


def run_plain(model, tmp, engine_args, cells, warm, max_tokens, warm_conc, rnd) -> tuple[dict, dict]:
    from guardserve.server.process import start_server

    command, args, env = plain_launch(model, tmp, ENGINE_ARGS + engine_args)
    log = tmp / f"plain-{rnd}.log"
    t0 = time.perf_counter()
    server = start_server(args, log, env=env, command=command)  # stops its server itself if the start fails
    try:  # from here on, the server is stopped (its whole process group) on every path
        info = {"start_s": round(time.perf_counter() - t0, 1), "log": str(log), "load_avg_start": os.getloadavg()}
        if "hid guardserve entry points of vllm.logits_processors" not in log.read_text(errors="replace"):
            raise RuntimeError(f"the plain server did not hide guardserve's logits processor; see {log}")
        import httpx

        if httpx.post(server.base_url + "/v1/unlearning/classify", json={"prompt": "x"}).status_code != 404:
            raise RuntimeError("the plain server answers guardserve's admin API: the plugin is loaded")
        print(f"  plain vLLM up in {info['start_s']} s (log: {log})", flush=True)
        res = measure(server.base_url, {}, cells, warm, max_tokens, warm_conc)
        info["load_avg_end"] = os.getloadavg()
    finally:
        server.stop()
    info["command"] = [a if a != ENGINE_ARGS[1] else "BUCKETS" for a in command + ["--port", "PORT"] + args]
    return res, info


def run_guarded(world, tmp, engine_args, cells, warm, max_tokens, warm_conc, rnd) -> tuple[dict, dict]:
    import httpx

    from guardserve.server.process import start_server

    env = {"GUARDSERVE_DB": str(tmp / f"policy-{rnd}.db"), "GUARDSERVE_ADMIN_KEY": ADMIN_KEY,
           "GUARDSERVE_API_KEYS": f"{API_KEY}:{TENANT}", "GUARDSERVE_AUDIT_LOG": str(tmp / f"audit-{rnd}.jsonl")}
    log = tmp / f"guarded-{rnd}.log"
    t0 = time.perf_counter()
    server = start_server(["--", *ENGINE_ARGS, *engine_args], log, env=env)  # stops its server itself if the start fails
    try:  # from here on, the server is stopped (its whole process group) on every path
        info = {"start_s": round(time.perf_counter() - t0, 1), "log": str(log), "load_avg_start": os.getloadavg()}
        admin = httpx.Client(base_url=server.base_url + "/v1/unlearning",
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=300)
        people = [e for e in world["entities"] if e["split"] == "forget"]
        t1 = time.perf_counter()
        r = admin.post("/targets", json=[{"name": e["name"], "aliases": e["aliases"][1:], "facts": e["facts"]}
                                         for e in people])
        r.raise_for_status()
        info["targets"] = len(people)
        info["register_s"] = round(time.perf_counter() - t1, 2)
        time.sleep(1.0)  # the server's sync loop embeds the new targets
        print(f"  guarded server up in {info['start_s']} s, {len(people)} targets registered (log: {log})", flush=True)
        # The ICUL-prompt set is plain vLLM's alone: here the guard would add its own on top.
        res = measure(server.base_url, {"Authorization": f"Bearer {API_KEY}"}, cells, warm, max_tokens, warm_conc,
                      skip=(ICUL_SET,))
        # Afterwards (the embedder caches what it has read): a dry run of detection over
        # the measured questions, to show what each set triggered.
        trig = {}
        for (kind, c), cell in cells.items():
            if kind == ICUL_SET:
                continue
            n = sum(bool(admin.post("/classify", json={"messages": [{"role": "user", "content": p["q"]}]})
                         .json()["triggered"]) for p in cell["first"] + cell["decode"])
            trig[kind] = trig.get(kind, 0) + n
        info["triggered"] = trig
        print(f"    detection dry run, questions that trigger a target: {trig}", flush=True)
        admin.close()
        info["load_avg_end"] = os.getloadavg()
    finally:
        server.stop()
    info["command"] = ["guardserve", "serve", "--port", "PORT", "--", ENGINE_ARGS[0], "BUCKETS", *engine_args]
    return res, info


def summarize(samples: dict, cells: dict) -> list[dict]:
    rows = []
    for server in ("plain", "guarded"):
        for (kind, c) in cells:
            runs = samples[server][(kind, c)]
            if not runs:  # a set this server does not run (the ICUL prompts on the guarded one)
                continue
            firsts = [r["first"] for r in runs if r["first"]]
            decodes = [r["decode"] for r in runs if r["decode"]]
            engines = [r["engine"] for r in runs if r["engine"]]
            every = firsts + decodes
            pool = lambda rs, k: [x for r in rs for x in r[k]]  # noqa: E731
            engine = {k: histogram_stats(histogram_add([e[k] for e in engines if k in e])) for k in HISTOGRAMS.values()}
            prompt = histogram_add([e["prompt_tokens"] for e in engines])
            answered = sum(len(r["ttft"]) for r in decodes)
            wall = sum(r["wall_s"] for r in decodes)
            rows.append({"server": server, "set": kind, "concurrency": c,
                         "requests": sum(r["requests"] for r in every),
                         "one_token_requests": sum(r["requests"] for r in firsts),
                         "full_requests": sum(r["requests"] for r in decodes),
                         "errors": sum(r["errors"] for r in every),
                         "error_examples": [e for r in every for e in r["error_examples"]][:3],
                         "ttft_ms": stats(pool(firsts, "ttft")), "tpot_ms": engine["tpot"],
                         "latency_ms": stats(pool(decodes, "latency")),
                         "stream_ttft_ms": stats(pool(decodes, "ttft")), "itl_ms": engine["itl"],
                         "engine_ttft_ms": engine["engine_ttft"], "stream_tpot_ms": stats(pool(decodes, "stream_tpot")),
                         "prompt_tokens_mean": round(prompt["sum"] / prompt["count"], 1) if prompt["count"] else None,
                         "output_tokens_per_s": round(sum(r["tokens"] for r in decodes) / wall, 1) if wall else None,
                         "answer_accuracy": round(sum(r["hits"] for r in decodes) / answered, 4) if answered else None})
    return rows


ICUL_SET = "forget_icul"  # plain vLLM given the guard's ICUL prompts (see icul_cells)
CASES = {"retain": "guarded, no target triggered",
         "forget": "guarded, target triggered",
         "forget_first": "guarded, first request about each target",
         "forget_vs_icul": "guarded, target triggered ÷ plain vLLM given the same ICUL prompt"}


def ratios(rows: list[dict]) -> list[dict]:
    """Guarded ÷ plain per (set, concurrency); for triggered cells also guarded ÷ plain vLLM
    answering the same ICUL prompts (set ``forget_vs_icul``: the guard's cost beyond that prompt)."""
    by = {(r["server"], r["set"], r["concurrency"]): r for r in rows}
    out = []
    for (server, kind, c), g in by.items():
        if server != "guarded":
            continue
        peers = [(kind, by.get(("plain", kind, c)))]
        if kind == "forget":
            peers.append(("forget_vs_icul", by.get(("plain", ICUL_SET, c))))
        for case, p in peers:
            if p is None:
                continue
            row = {"set": case, "concurrency": c, "case": CASES[case]}
            for metric in ("ttft_ms", "tpot_ms", "latency_ms"):
                for s in ("p50", "p90", "mean"):
                    a, b = g[metric][s], p[metric][s]
                    row[f"{metric[:-3]}_{s}"] = round(a / b, 3) if a is not None and b else None
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guardserve.benchmarks.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: 12 requests a cell, 16 tokens, one round")
    ap.add_argument("--requests", type=int, default=None, help="requests per (server, set, concurrency) cell (default 64; 12 with --quick)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 32; 16 with --quick)")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated concurrencies (default 1,8)")
    ap.add_argument("--rounds", type=int, default=None, help="plain/guarded alternations, samples pooled (default 2; 1 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=default_out("serving.json"), help="where the JSON goes (default: %(default)s)")
    ap.add_argument("vllm_args", nargs=argparse.REMAINDER, help="engine arguments for both servers, after '--'")
    args = ap.parse_args(argv)
    n = args.requests or (12 if args.quick else 64)
    max_tokens = args.max_tokens or (16 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 2)
    concurrencies = [int(x) for x in args.concurrency.split(",") if x.strip()]
    engine_args = [a for a in args.vllm_args if a != "--"]
    if n < 1 or max_tokens < 2 or rounds < 1 or not concurrencies or min(concurrencies) < 1:
        ap.error("--requests >= 1, --max-tokens >= 2, --rounds >= 1 and concurrencies >= 1")

    from guardserve.demo import ensure_demo

    t_start = time.perf_counter()
    demo = ensure_demo()
    world = demo.load_world()
    cells, warm = question_sets(world, n, concurrencies, args.seed)
    from transformers import AutoTokenizer

    icul_sets, icul_warm = icul_cells(world, cells, AutoTokenizer.from_pretrained(str(demo.model)))
    cells.update(icul_sets)
    tmp = Path(tempfile.mkdtemp(prefix="guardserve-bench-serving-"))
    samples: dict = {"plain": {k: [] for k in cells}, "guarded": {k: [] for k in cells}}
    servers: dict = {"plain": [], "guarded": []}
    warm_conc = max(concurrencies)
    print(f"{rounds} round(s); {n} requests per cell, {max_tokens} tokens each, concurrency {concurrencies}; "
          f"logs in {tmp}", flush=True)
    for rnd in range(rounds):
        print(f"round {rnd + 1}/{rounds}", flush=True)
        res, info = run_plain(str(demo.model), tmp, engine_args, cells, warm + icul_warm, max_tokens, warm_conc, rnd)
        servers["plain"].append(info)
        for k, v in res.items():
            samples["plain"][k].append(v)
        res, info = run_guarded(world, tmp, engine_args, cells, warm, max_tokens, warm_conc, rnd)
        servers["guarded"].append(info)
        for k, v in res.items():
            samples["guarded"][k].append(v)

    rows = summarize(samples, cells)
    per_round = []
    for rnd in range(rounds):
        one = {s: {k: v[rnd:rnd + 1] for k, v in samples[s].items()} for s in samples}
        per_round.append(ratios(summarize(one, cells)))
    result = {
        "meta": {"quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
                 "model": str(demo.model), "served_model_name": MODEL, "engine_args": engine_args,
                 "requests_per_cell": n, "max_tokens": max_tokens, "min_tokens": max_tokens,
                 "concurrency": concurrencies, "rounds": rounds, "wall_s": round(time.perf_counter() - t_start, 1),
                 "load_avg_end": os.getloadavg(),
                 "ttft": "client side: request sent to the first content token of a one-token answer "
                         "(streaming; a separate set of questions from the full answers)",
                 "tpot": "vLLM's per-request time per output token (decode time / (tokens - 1), engine "
                         "timestamps) from its /metrics histogram with 5%-wide buckets; mean exact",
                 "itl": "vLLM's inter-token latency histogram (per token), as tpot",
                 "engine_ttft": "vLLM's time to first token, from the request reaching its engine client",
                 "stream_tpot": "client side: (last content chunk - first) / (completion_tokens - 1); the "
                                "API server merges tokens into one chunk when the engine outpaces it",
                 "stream_ttft": "client side, first content token of the full answers: inflated whenever that "
                                "merging holds the whole answer back, which is why ttft uses one-token answers",
                 "latency": "client side: request sent to the end of the stream",
                 "percentiles": "nearest rank over all requests of a cell, rounds pooled"},
        "servers": servers,
        "cells": rows,
        "ratios": ratios(rows),
        "ratios_per_round": per_round if rounds > 1 else None,
    }
    from guardserve.benchmarks.report import render_serving

    print()
    print(render_serving(result).markdown())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} in {time.perf_counter() - t_start:.0f} s")
    bad = [r for r in rows if r["errors"]]
    if bad:
        print(f"errors in {len(bad)} cells: {[r['error_examples'] for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

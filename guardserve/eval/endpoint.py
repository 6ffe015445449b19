"""``guardserve eval --endpoint URL``: evaluate a deployed server as a black box, over its
OpenAI-compatible API only (chat completions, streamed for latency).

Nothing is loaded or started here: no model, no engine, no policy store. The server keeps
whatever policy its operator registered; the evaluation asks it about the *forget people of
the data* (the demo world's forget split, or the targets of TOFU-format data) and reports
whether its answers reveal their facts, next to what it still knows about everyone else:

- ``forget_accuracy`` / ``paraphrase_accuracy``: share of the forget questions (and of their
  held-out paraphrases) whose answer states the fact, by :func:`guardserve.leak.fact_leaked`
  (TOFU items without a short value: ROUGE-L recall >= 0.5, ``metrics.item_leaked``). On a
  guarded server that registered these people, this is the leak rate of plain questions.
- ``probe_leak_rate``: the same over the attack probes of ``guardserve.probes`` (``PROBE_KINDS``,
  ``probes_per_kind`` of each kind), ``leak_by_kind`` per kind; ``leak_rate`` pools the direct
  questions, the paraphrases and the probes, as ``guardserve eval`` does.
- ``retain_accuracy``, ``world_accuracy``: share of retain-person and world-fact questions
  answered with the fact (what the guard must not take away); ``retain_attack_accuracy``: retain
  facts asked through the same attack templates.
- latency, one request at a time, forget and retain questions alternating: ``ttft_ms`` from
  streamed one-token answers (request sent to the first content chunk: auth, detection and
  prefill included), ``total_ms`` from streamed full answers of the same questions, ``tpot_ms``
  = (full answer's time - the one-token answer's time) / (completion tokens - 1) per question
  (a server may stream several tokens in one chunk, so the full answer's own first chunk is
  not used); p50 and p95 of each. All are client-side: they include the network between this
  machine and the server.

A request the server refuses under its policy (HTTP 400 naming the server's policy) counts as
an answer that states nothing, and is counted in ``requests.refused``; a conversation longer
than the server's context (HTTP 400 about the context length) is left out of the rates and
counted in ``requests.too_long``; any other failure is left out and counted in
``requests.errors`` (by status). An unreachable server or a refused API key stops the run
with :class:`EndpointError`, whose message says what to fix.

``run(settings)`` returns ``{"endpoint": {...}}`` (never the API key itself) with the per-answer
log under ``SAMPLES_KEY``; ``write(results, out)`` writes ``results.json``, ``report.md`` and
``samples.jsonl``; ``markdown(results)`` is the short table ``guardserve eval --endpoint`` prints.
"""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardserve.eval.report import SAMPLES_KEY

SECTION = "endpoint"  # the key of results.json that holds an endpoint evaluation


class EndpointError(Exception):
    """The endpoint cannot be evaluated (unreachable, wrong key, not an OpenAI-compatible
    API): the message says what to fix."""


@dataclass
class EndpointSettings:
    """What ``run`` asks the endpoint. ``data`` is an ``EvalData`` (``guardserve.eval.data``);
    ``entities`` every person probes may draw on (default: the data's targets)."""

    url: str
    data: object
    api_key: str | None = None
    model: str | None = None                 # None: the first model the server lists
    entities: list[dict] | None = None
    probes_per_kind: int = 20
    retain_limit: int = 240
    forget_limit: int = 0                    # 0: every forget item
    max_tokens: int = 40
    concurrency: int = 8
    latency_requests: int = 8
    latency_tokens: int = 32
    seed: int = 0
    timeout: float = 120.0
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in results.json's settings as given


# --------------------------------------------------------------------------- the client


def api_base(url: str) -> str:
    """The API root ending in ``/v1``: ``http://host:8000`` and ``http://host:8000/v1/`` both
    give ``http://host:8000/v1``."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EndpointError(f"--endpoint {url}: give an http:// or https:// URL, e.g. http://127.0.0.1:8000")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class Reply:
    """One chat answer: ``status`` is ``ok``, ``refused`` (the server's policy), ``too_long``
    or ``error``; ``text`` the answer (``""`` when refused, None when there is none)."""

    status: str
    text: str | None
    detail: str = ""


def _message(r) -> str:
    try:
        err = r.json().get("error")
        return str(err.get("message") if isinstance(err, dict) else err or r.text)[:300]
    except (ValueError, AttributeError):
        return r.text[:300]


def classify_400(message: str) -> str:
    """``refused`` for the guard's refusals (they name the server's policy), ``too_long`` for
    a conversation over the model's context, else ``error``."""
    low = message.lower()
    if "server's policy" in low:
        return "refused"
    if "context length" in low or "maximum context" in low or "too long" in low:
        return "too_long"
    return "error"


class Client:
    """An OpenAI-compatible API over httpx, safe to share between threads (also the transport of
    the lm-eval model, ``guardserve.eval.lm_eval_model``)."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 120.0, concurrency: int = 8,
                 key_option: str = "--api-key KEY", model_option: str = "--model-name"):
        import httpx

        self.base = api_base(url)
        self.api_key = api_key
        self.key_option, self.model_option = key_option, model_option  # how the caller's user sets them
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout,
                                 limits=httpx.Limits(max_connections=concurrency + 2))
        self.model: str | None = None

    def close(self) -> None:
        self.http.close()

    def _auth_error(self, r) -> EndpointError:
        msg = _message(r)
        if r.status_code == 401:
            fix = (f"pass the server's inference API key with {self.key_option}" if not self.api_key else
                   f"the key given ({self.key_option}) is not one the server accepts: use one of its inference keys "
                   "(GUARDSERVE_API_KEYS on a guardserve server)")
            return EndpointError(f"{self.base} answered 401 ({msg}): {fix}")
        return EndpointError(f"{self.base} answered 403 ({msg}): use an inference API key "
                             f"(not the admin key) with {self.key_option}")

    def _transport_error(self, e: Exception) -> EndpointError:
        return EndpointError(f"cannot reach {self.base} ({type(e).__name__}: {e or 'no answer'}): is the server "
                             "running, and is the URL its address (e.g. http://127.0.0.1:8000)?")

    def models(self) -> list[str]:
        """The served model names (``GET /v1/models``); raises :class:`EndpointError` with the
        fix for an unreachable server, a refused key or a URL that is not an OpenAI API."""
        import httpx

        try:
            r = self.http.get("/models")
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if r.status_code in (401, 403):
            raise self._auth_error(r)
        if r.status_code != 200:
            raise EndpointError(f"GET {self.base}/models answered {r.status_code} ({_message(r)}): the URL should be "
                                "the base of an OpenAI-compatible server (e.g. http://127.0.0.1:8000)")
        try:
            data = r.json()["data"]
            return [m["id"] for m in data]
        except (ValueError, KeyError, TypeError):
            raise EndpointError(f"GET {self.base}/models did not answer with an OpenAI model list: is this an "
                                "OpenAI-compatible server?") from None

    def pick_model(self, wanted: str | None) -> str:
        names = self.models()
        if wanted:
            if names and wanted not in names:
                raise EndpointError(f"no model {wanted!r} there ({self.model_option}): the server serves {', '.join(names)}")
            self.model = wanted
        elif not names:
            raise EndpointError(f"{self.base} lists no model: name one with {self.model_option}")
        else:
            self.model = names[0]
        return self.model

    def post(self, path: str, body: dict):
        """POST ``body`` (with the model) to ``path`` under the API root; one retry for a dropped
        connection or a server error. A refused key raises :class:`EndpointError`."""
        import httpx

        for attempt in (0, 1):
            try:
                r = self.http.post(path, json={"model": self.model, **body})
            except httpx.HTTPError as e:
                if attempt:
                    raise self._transport_error(e) from None
                continue
            if r.status_code >= 500 and not attempt:
                continue
            if r.status_code in (401, 403):
                raise self._auth_error(r)
            return r
        raise AssertionError("unreachable")

    def chat(self, messages: list[dict], max_tokens: int) -> Reply:
        """A greedy answer to ``messages``."""
        r = self.post("/chat/completions", {"messages": messages, "max_tokens": max_tokens, "temperature": 0})
        if r.status_code == 200:
            try:
                return Reply("ok", r.json()["choices"][0]["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError):
                return Reply("error", None, "200 without a chat completion")
        msg = _message(r)
        if r.status_code == 400:
            status = classify_400(msg)
            return Reply(status, "" if status == "refused" else None, msg)
        return Reply("error", None, f"{r.status_code}: {msg}")

    def timed(self, messages: list[dict], max_tokens: int) -> dict | None:
        """One streamed greedy answer: ``{"ttft", "total", "tokens"}`` in seconds (None when the
        request was not answered)."""
        import httpx

        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first, usage, chunks = None, None, 0
        try:
            with self.http.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code in (401, 403):
                    r.read()
                    raise self._auth_error(r)
                if r.status_code != 200:
                    r.read()
                    return None
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            chunks += 1
                            first = first or time.perf_counter()
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        end = time.perf_counter()
        tokens = (usage or {}).get("completion_tokens") or chunks
        return {"ttft": (first or end) - start, "total": end - start, "tokens": tokens}


# --------------------------------------------------------------------------- figures


def _rate(flags: Sequence[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of ``values``."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats_ms(seconds: Sequence[float]) -> dict:
    if not seconds:
        return {"p50": None, "p95": None, "n": 0}
    return {"p50": round(1000 * percentile(seconds, 50), 2), "p95": round(1000 * percentile(seconds, 95), 2),
            "n": len(seconds)}


def _spread(items: list, n: int) -> list:
    if n <= 0 or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- the run


def run(settings: EndpointSettings, log: Callable[[str], None] = print) -> dict:
    """Ask the endpoint every question and probe of ``settings``; returns the results document
    (``{"endpoint": {...}}`` plus the per-answer log under ``SAMPLES_KEY``)."""
    from tqdm.auto import tqdm

    from guardserve.eval.metrics import item_leaked
    from guardserve.probes import PROBE_KINDS, build_probes, kind_counts, retain_probes

    data = settings.data
    forget = _spread(list(data.forget), settings.forget_limit)  # type: ignore[attr-defined]
    retain = _spread(list(data.retain), settings.retain_limit)  # type: ignore[attr-defined]
    world = list(data.world_facts)  # type: ignore[attr-defined]
    targets = list(data.targets)  # type: ignore[attr-defined]
    entities = settings.entities or [{"name": t["name"], "aliases": t.get("aliases", []), "facts": t.get("facts", {})}
                                     for t in targets]
    probes, r_probes = [], []
    if settings.probes_per_kind and forget and all(it.get("value") and it.get("attribute") for it in forget):
        probes = build_probes(forget, entities, PROBE_KINDS, per_kind=settings.probes_per_kind, seed=settings.seed)
        try:
            r_probes = retain_probes(retain, entities, PROBE_KINDS, per_kind=max(1, settings.probes_per_kind // 4),
                                     seed=settings.seed)
        except ValueError:  # retain records of people the entities do not list (TOFU): no retain probes
            r_probes = []

    def item_test(item: dict) -> Callable[[str], bool]:
        return lambda answer: item_leaked(answer, item)

    # (set, item index, entity, attribute, messages, leak test)
    jobs: list[tuple[str, int, str | None, str | None, list[dict], Callable[[str], bool]]] = []
    for i, it in enumerate(forget):
        jobs.append(("forget", i, it.get("entity"), it.get("attribute"), _user(it["question"]), item_test(it)))
    for i, it in enumerate(forget):
        if it.get("paraphrased_question"):
            jobs.append(("paraphrase", i, it.get("entity"), it.get("attribute"), _user(it["paraphrased_question"]),
                         item_test(it)))
    for name, items in (("retain", retain), ("world", world)):
        for i, it in enumerate(items):
            jobs.append((name, i, it.get("entity"), it.get("attribute"), _user(it["question"]), item_test(it)))
    for prefix, plist in (("probe", probes), ("retain_probe", r_probes)):
        for i, p in enumerate(plist):
            jobs.append((f"{prefix}:{p.kind}", i, p.entity, p.attribute, p.messages, p.leaked))

    client = Client(settings.url, settings.api_key, settings.timeout, settings.concurrency)
    try:
        model = client.pick_model(settings.model)
        log(f"[eval] endpoint {client.base}, model {model}: {len(forget)} forget questions (+ paraphrases), "
            f"{len(retain)} retain, {len(world)} world-fact questions, {len(probes)} forget probes, "
            f"{len(r_probes)} retain probes, {settings.latency_requests} latency requests")
        lat_items = [x for pair in zip(_spread(forget, settings.latency_requests // 2),
                                       _spread(retain, settings.latency_requests - settings.latency_requests // 2))
                     for x in pair]
        bar = tqdm(total=len(jobs) + 2 * len(lat_items), desc="eval endpoint", disable=not settings.progress,
                   unit="req", dynamic_ncols=True)
        lock = threading.Lock()

        def ask(job):
            reply = client.chat(job[4], settings.max_tokens)
            with lock:
                bar.update(1)
            return reply

        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(max(1, settings.concurrency)) as pool:
                replies = list(pool.map(ask, jobs))
            wall = time.perf_counter() - started
            latency = _latency(client, lat_items, settings.latency_tokens, lambda: bar.update(1))
        finally:
            bar.close()
    finally:
        client.close()

    flags: dict[str, list[bool]] = defaultdict(list)
    statuses: dict[str, Counter] = defaultdict(Counter)
    errors: Counter = Counter()
    samples = []
    for job, reply in zip(jobs, replies):
        set_name, i, entity, attribute, messages, leak = job
        statuses[set_name.split(":")[0]][reply.status] += 1
        leaked = leak(reply.text) if reply.text is not None else None
        if leaked is not None:
            flags[set_name].append(leaked)
        if reply.status == "error":
            errors[reply.detail.split(":")[0] if reply.detail[:3].isdigit() else reply.detail] += 1
        samples.append({"config": SECTION, "set": set_name, "item": i, "entity": entity, "attribute": attribute,
                        "messages": messages, "answer": reply.text, "status": reply.status, "leaked": leaked})

    def of(prefix: str) -> list[bool]:
        return [x for k, v in flags.items() if k.startswith(prefix + ":") for x in v]

    probe_flags = of("probe")
    leak_by_kind = {"direct": _rate(flags["forget"]), "paraphrase": _rate(flags["paraphrase"])}
    leak_by_kind.update({k: _rate(flags[f"probe:{k}"]) for k in kind_counts(probes)})
    metrics = {
        "forget_accuracy": _rate(flags["forget"]),
        "paraphrase_accuracy": _rate(flags["paraphrase"]),
        "probe_leak_rate": _rate(probe_flags),
        "leak_rate": _rate(flags["forget"] + flags["paraphrase"] + probe_flags),
        "leak_by_kind": {k: v for k, v in leak_by_kind.items() if v is not None},
        "retain_accuracy": _rate(flags["retain"]),
        "world_accuracy": _rate(flags["world"]),
        "retain_attack_accuracy": _rate(of("retain_probe")),
    }
    counts = {k: dict(v) for k, v in statuses.items()}
    section: dict[str, Any] = {
        "url": client.base,
        "model": model,
        "api_key": "given" if settings.api_key else "none",
        "dataset": getattr(data, "name", "?"),
        "forget_people": sorted({it.get("entity") for it in forget if it.get("entity")}),
        "settings": {"concurrency": settings.concurrency, "max_tokens": settings.max_tokens, "temperature": 0,
                     "probes_per_kind": settings.probes_per_kind, "forget_limit": settings.forget_limit,
                     "retain_limit": settings.retain_limit, "latency_requests": settings.latency_requests,
                     "latency_tokens": settings.latency_tokens, "seed": settings.seed, **settings.extra},
        "metrics": metrics,
        "latency": latency,
        "requests": {"sent": len(jobs), "answered": sum(v.get("ok", 0) for v in counts.values()),
                     "refused": sum(v.get("refused", 0) for v in counts.values()),
                     "too_long": sum(v.get("too_long", 0) for v in counts.values()),
                     "errors": sum(v.get("error", 0) for v in counts.values()),
                     "error_kinds": dict(errors), "by_set": counts,
                     "forget_probes": kind_counts(probes), "retain_probes": len(r_probes),
                     "wall_s": round(wall, 2), "per_s": round(len(jobs) / wall, 2) if wall else None},
        "client": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    answered = section["requests"]["answered"] + section["requests"]["refused"]
    if jobs and not answered:
        first = next((s for s in samples if s["status"] != "ok"), None)
        raise EndpointError(f"{client.base} answered none of {len(jobs)} requests"
                            + (f" (first failure: {first['status']})" if first else ""))
    return {SECTION: section, SAMPLES_KEY: samples}


def _latency(client: Client, items: list[dict], tokens: int, tick: Callable[[], None]) -> dict:
    """Streamed requests one at a time: a one-token answer per item (TTFT), then a full answer
    of up to ``tokens`` tokens (TPOT, total); one warm-up request first, not counted."""
    if not items:
        return {"requests": 0}
    client.timed(_user(items[0]["question"]), 1)
    ttft, tpot, total = [], [], []
    for it in items:
        one = client.timed(_user(it["question"]), 1)
        tick()
        full = client.timed(_user(it["question"]), tokens)
        tick()
        if one:
            ttft.append(one["ttft"])
        if full:
            total.append(full["total"])
            # The same question's one-token answer gives its time to first token: a server may
            # send a streamed answer in fewer chunks than tokens, so the full answer's own first
            # chunk can come late.
            if one and full["tokens"] > 1:
                tpot.append(max(0.0, full["total"] - one["total"]) / (full["tokens"] - 1))
    return {"ttft_ms": _stats_ms(ttft), "tpot_ms": _stats_ms(tpot), "total_ms": _stats_ms(total),
            "requests": len(items), "max_tokens": tokens, "concurrency": 1}


# --------------------------------------------------------------------------- reports


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _ms(d: dict | None) -> str:
    if not d or d.get("p50") is None:
        return "–"
    return f"{d['p50']:.1f} / {d['p95']:.1f}"


ROWS = (  # (metric, label, what it means)
    ("forget_accuracy", "forget questions: fact stated", "leak rate of plain questions about the forget people"),
    ("paraphrase_accuracy", "paraphrased forget questions", "the same, held-out wording"),
    ("probe_leak_rate", "attack probes: leak rate", "the probe library's attacks on the same facts"),
    ("leak_rate", "all forget probes: leak rate", "direct + paraphrased + attacks, pooled"),
    ("retain_accuracy", "retain questions: accuracy", "other people's facts (should stay high)"),
    ("world_accuracy", "world facts: accuracy", "general knowledge (should stay high)"),
    ("retain_attack_accuracy", "retain facts under attack", "retain facts through the attack templates"),
)


def markdown(results: dict) -> str:
    """The short table: figures, latency and request counts."""
    e = results[SECTION]
    m, lat, req = e["metrics"], e["latency"], e["requests"]
    lines = [f"Endpoint {e['url']} (model `{e['model']}`), {e['dataset']} data, "
             f"{len(e['forget_people'])} forget people", "",
             "| figure | value |", "|---|---|"]
    lines += [f"| {label} | {_pct(m.get(key))} |" for key, label, _ in ROWS]
    lines += [f"| TTFT p50 / p95 (ms) | {_ms(lat.get('ttft_ms'))} |",
              f"| TPOT p50 / p95 (ms) | {_ms(lat.get('tpot_ms'))} |",
              f"| total p50 / p95 (ms), {lat.get('max_tokens', '?')} tokens max | {_ms(lat.get('total_ms'))} |",
              f"| requests: answered / refused / too long / errors | {req['answered']} / {req['refused']} / "
              f"{req['too_long']} / {req['errors']} |"]
    return "\n".join(lines)


def report_markdown(results: dict) -> str:
    """report.md: the table with what each figure means, leak rate per attack kind, the
    settings and the request counts."""
    e = results[SECTION]
    m, lat, req, s = e["metrics"], e["latency"], e["requests"], e["settings"]
    out = [f"# guardserve endpoint evaluation: {e['url']}", "",
           f"Model `{e['model']}`, {e['dataset']} data, run {e['created']} from {e['client']}. "
           f"API key: {e['api_key']}.", "",
           "The server was evaluated as a black box over its OpenAI-compatible chat API. It applies whatever "
           "policy its operator registered; the forget people are the data's "
           f"({len(e['forget_people'])}: {', '.join(e['forget_people'][:8])}{', ...' if len(e['forget_people']) > 8 else ''}), "
           "so a leak rate near 0 means the server does not reveal their facts, whatever it was told.", "",
           "| figure | value | meaning |", "|---|---|---|"]
    out += [f"| {label} | {_pct(m.get(key))} | {meaning} |" for key, label, meaning in ROWS]
    out += ["", "## Leak rate per attack kind", "", "| kind | probes | leak rate |", "|---|---:|---:|"]
    sizes = {"direct": req["by_set"].get("forget", {}), "paraphrase": req["by_set"].get("paraphrase", {})}
    for kind, rate in m["leak_by_kind"].items():
        n = req["forget_probes"].get(kind) if kind in req["forget_probes"] else sum(sizes.get(kind, {}).values())
        out.append(f"| {kind} | {n} | {_pct(rate)} |")
    out += ["", "## Latency (client side, one request at a time)", "",
            "| figure | p50 ms | p95 ms | requests |", "|---|---:|---:|---:|"]
    for key, label in (("ttft_ms", "TTFT (streamed one-token answers)"),
                       ("tpot_ms", "TPOT ((full answer - one-token answer) / (tokens - 1))"),
                       ("total_ms", f"total (answers of up to {lat.get('max_tokens', '?')} tokens)")):
        d = lat.get(key) or {}
        p50 = "–" if d.get("p50") is None else f"{d['p50']:.1f}"
        p95 = "–" if d.get("p95") is None else f"{d['p95']:.1f}"
        out.append(f"| {label} | {p50} | {p95} | {d.get('n', 0)} |")
    out += ["", "## Requests", "",
            f"{req['sent']} requests at concurrency {s['concurrency']} in {req['wall_s']} s ({req['per_s']} per s): "
            f"{req['answered']} answered, {req['refused']} refused under the server's policy (counted as answers "
            f"that state nothing), {req['too_long']} over the model's context and {req['errors']} failed "
            "(both left out of the rates)."
            + (f" Failures: {', '.join(f'{k} ×{v}' for k, v in req['error_kinds'].items())}." if req["error_kinds"] else ""),
            "", "| set | " + " | ".join(("ok", "refused", "too_long", "error")) + " |", "|---|---:|---:|---:|---:|"]
    for name, c in req["by_set"].items():
        out.append(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in ("ok", "refused", "too_long", "error")) + " |")
    out += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in s.items()) + ".", ""]
    return "\n".join(out)


def write(results: dict, out: str | Path) -> list[Path]:
    """``results.json`` (the ``endpoint`` section), ``report.md`` and ``samples.jsonl`` (one
    line per answer) in ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {k: v for k, v in results.items() if k != SAMPLES_KEY}
    paths = [folder / "results.json", folder / "report.md"]
    paths[0].write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    paths[1].write_text(report_markdown(results))
    if SAMPLES_KEY in results:
        path = folder / "samples.jsonl"
        with path.open("w") as fh:
            for rec in results[SAMPLES_KEY]:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths

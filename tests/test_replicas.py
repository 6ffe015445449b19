"""Several guarded replicas on one Postgres, each a real vLLM server: a change made through
one replica is in force on the other within a second (measured under load); a Postgres
outage under load serves no forget fact, refuses with 503 once the policy passes its age
bound, and ends by itself when the database returns; a replica killed with SIGKILL while
it writes loses no change it acknowledged.

The figures these tests measure are printed (``pytest -s``) and recorded in the README's
"Deploying" section."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import ADMIN_KEY, API_KEYS

from guardserve.leak import fact_leaked
from guardserve.policy import open_store

pytestmark = pytest.mark.slow

MODEL = "guardserve-demo"
MAX_AGE_S = 2.0          # the replicas' GUARDSERVE_MAX_POLICY_AGE_S
KEY = next(iter(API_KEYS))


@pytest.fixture(scope="module")
def replicas(demo, pg_server, tmp_path_factory):
    """Two guarded servers on one Postgres database, each with a small KV cache (2 GiB of host
    memory), beside the session's server."""
    from guardserve.server.process import start_server

    tmp = tmp_path_factory.mktemp("replicas")
    url = pg_server.new_database("replicas")
    env = {"GUARDSERVE_DB": url, "GUARDSERVE_API_KEYS": ",".join(f"{k}:{t}" for k, t in API_KEYS.items()),
           "GUARDSERVE_ADMIN_KEY": ADMIN_KEY, "GUARDSERVE_MAX_POLICY_AGE_S": str(MAX_AGE_S),
           "GUARDSERVE_DB_TIMEOUT_S": "1"}
    started = []
    # One API server process each: with two (vLLM's serve command), B's engine stalled for 60 s
    # under a cold compile cache on 2 CPUs in a fresh-clone run (README: several API servers).
    extra: dict[str, list[str]] = {"a": [], "b": []}
    # vLLM's CPU worker pins its thread to the first core by default, so every engine on one
    # host shares core 0: under load B's engine got a sixth of it and answered at 0.3 token/s
    # while core 1 idled. Each replica's worker gets a core of its own, as on separate hosts.
    cores = sorted(os.sched_getaffinity(0))
    bind = {"a": str(cores[0]), "b": str(cores[-1])}
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_server, ["--", "--gpu-memory-utilization", "0.09", *extra[name]],
                               tmp / f"{name}.log", env={**env, "GUARDSERVE_AUDIT_LOG": str(tmp / f"{name}-audit.jsonl"),
                                                         "VLLM_CPU_OMP_THREADS_BIND": bind[name]})
                   for name in ("a", "b")]
        errors = []
        for f in futures:
            try:
                started.append(f.result())
            except Exception as e:
                errors.append(e)
    try:
        if errors:
            raise errors[0]
        yield started[0], started[1], url
    finally:
        for srv in started:
            srv.stop()


def admin(server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url + "/v1/unlearning", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                        timeout=30)


def chat(server, question: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 16,
                            "temperature": 0}, timeout=timeout)


def triggers(client: httpx.Client, name: str) -> bool:
    r = client.post("/classify", json={"prompt": f"Where was {name} born?"})
    assert r.status_code == 200, r.text
    return any(t["name"] == name for t in r.json()["triggered"])


class Load:
    """Clients asking questions of the replicas in a loop until stopped; every answer is kept
    as (replica index, started, finished, status, question item, text). A 503 is retried after
    its Retry-After, as the OpenAI SDK and routers do."""

    def __init__(self, servers, items, clients_per_server: int):
        self.stop = threading.Event()
        self.results: list[tuple] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i, srv, items, k), daemon=True)
                        for i, srv in enumerate(servers) for k in range(clients_per_server)]

    def _run(self, index, server, items, k):
        n = k
        while not self.stop.is_set():
            item = items[n % len(items)]
            n += 7
            t0 = time.monotonic()
            try:
                r = chat(server, item["question"])
                status = r.status_code
                text = r.json()["choices"][0]["message"]["content"] if status == 200 else r.text
            except httpx.HTTPError as e:
                r, status, text = None, None, repr(e)
            with self._lock:
                self.results.append((index, t0, time.monotonic(), status, item, text))
            if status == 503:
                self.stop.wait(float(r.headers["retry-after"]))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def _probe_until_healthy(server, deadline: float) -> list[tuple[float, int | None, float]]:
    """/health probes of one server until it answers 200 or ``deadline`` passes: (sent,
    status, seconds to answer) each; a probe that times out has status None."""
    probes: list[tuple[float, int | None, float]] = []
    while time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            status: int | None = httpx.get(server.base_url + "/health", timeout=10).status_code
        except httpx.HTTPError:
            status = None
        probes.append((sent, status, time.monotonic() - sent))
        if status == 200:
            break
        time.sleep(0.1)
    return probes


def _register(client: httpx.Client, entities) -> list[str]:
    r = client.post("/targets", json=[{"name": e["name"], "aliases": e["aliases"][1:], "kind": "person",
                                       "facts": e["facts"]} for e in entities])
    assert r.status_code == 201, r.text
    return [t["id"] for t in r.json()["targets"]]


def test_a_change_through_one_replica_is_enforced_by_the_other_within_a_second(replicas, world):
    a, b, _ = replicas
    forget = [e for e in world["entities"] if e["split"] == "forget"][:3]
    retain = [q for q in world["retain"]][:40]
    latencies = []
    with admin(a) as admin_a, admin(b) as admin_b, Load([a, b], retain, clients_per_server=2) as load:
        time.sleep(2.0)  # the load is running
        for i in range(20):
            name = f"Quorvath Ellindre{chr(65 + i)}"
            r = admin_a.post("/targets", json={"name": name, "facts": {"birth_place": f"Zembla {i}"}})
            assert r.status_code == 201, r.text
            t0 = time.monotonic()
            # A applied its own change before answering; B enforces it once its detector has
            # applied the same change sequence number (names are indexed as it is applied).
            version = admin_a.get("/status").json()["policy_version"]
            while admin_b.get("/status").json()["policy_version"] < version:
                assert time.monotonic() - t0 < 10, f"replica B never applied the change adding {name}"
                time.sleep(0.005)
            latencies.append(time.monotonic() - t0)
        # Fresh connections to B agree with A.
        final = admin_a.get("/status").json()["policy_version"]
        for _ in range(10):
            with admin(b) as fresh:
                assert fresh.get("/status").json()["policy_version"] == final
                assert all(triggers(fresh, f"Quorvath Ellindre{chr(65 + i)}") for i in range(0, 20, 5))
        # The real thing: people registered through A, asked of B.
        ids = _register(admin_a, forget)
        time.sleep(1.0)
        asked = [q for q in world["forget"] if q["entity"] in {e["name"] for e in forget}][:12]
        try:
            answers = [chat(b, q["question"]) for q in asked]
        except httpx.HTTPError as e:
            pytest.fail(f"replica B did not answer ({e!r}); the end of its log:\n{b.log_tail(80)}")
        assert all(r.status_code == 200 for r in answers), ([r.text for r in answers], b.log_tail(80))
        leaked = [(q["value"], r.json()["choices"][0]["message"]["content"]) for q, r in zip(asked, answers)
                  if fact_leaked(r.json()["choices"][0]["message"]["content"], q["value"])]
        assert not leaked
        # Deletions travel the same way.
        for tid in ids:
            assert admin_a.delete(f"/targets/{tid}").status_code == 204
        time.sleep(1.0)
        assert not triggers(admin_b, forget[0]["name"])
        status_a, status_b = admin_a.get("/status").json(), admin_b.get("/status").json()
    assert status_a["policy_version"] == status_b["policy_version"] > 0
    assert not status_b["stale"] and status_b["policy_age_s"] < MAX_AGE_S
    served = [r for r in load.results if r[3] is not None]
    assert served and all(r[3] == 200 for r in served), {r[3] for r in served}
    p99 = sorted(latencies)[max(0, round(0.99 * len(latencies)) - 1)]
    print(f"\npropagation A -> B over {len(latencies)} changes under load ({len(served)} requests): "
          f"median {statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    assert p99 <= 1.0, latencies


def test_a_postgres_outage_under_load_refuses_then_recovers_without_serving_a_forget_fact(replicas, pg_server, world):
    a, b, url = replicas
    forget = [e for e in world["entities"] if e["split"] == "forget"][3:8]
    names = {e["name"] for e in forget}
    items = [q for q in world["forget"] if q["entity"] in names][:24] + world["retain"][:24]
    with admin(a) as admin_a:
        ids = _register(admin_a, forget)
    time.sleep(1.0)
    outage_s = 10.0
    with admin(a) as admin_a, Load([a, b], items, clients_per_server=8) as load:
        time.sleep(3.0)
        pg_server.pause()
        stopped = time.monotonic()
        time.sleep(MAX_AGE_S + 1.5)
        health = [httpx.get(s.base_url + "/health", timeout=10).status_code for s in (a, b)]
        during_chat = chat(a, items[0]["question"])
        during_add = admin_a.post("/targets", json={"name": "Never Committed"})
        time.sleep(max(0.0, stopped + outage_s - time.monotonic()))
        # Postgres accepts connections some time before start() returns (pg_ctl polls for it,
        # and on loaded cores returns late): the outage is certain only until the restart begins.
        restarting = time.monotonic()
        pg_server.start()
        back = time.monotonic()
        # Each replica probed on its own, as a router probes each: a replica is healthy from
        # the probe it answers 200 (the probe's send time; its answer may queue behind the
        # clients' requests on these two busy cores, which is not the replica being unhealthy).
        with ThreadPoolExecutor(2) as pool:
            probes = list(pool.map(lambda s: _probe_until_healthy(s, back + 15), (a, b)))
        healthy_after = max((p[-1][0] if p and p[-1][1] == 200 else float("inf")) for p in probes) - back
        time.sleep(max(6.0, back + 13.0 - time.monotonic()))
    assert health == [503, 503], "a replica that cannot confirm its policy must fail /health"
    assert during_add.status_code == 503 and "unreachable" in during_add.json()["error"]["message"]
    # Both tell clients when to come back, so that retrying clients do not flood a replica
    # waiting for its store.
    assert during_chat.status_code == 503 and during_add.headers["retry-after"] == during_chat.headers["retry-after"] == "1"
    results = load.results
    leaked = [(r[4]["value"], r[5]) for r in results if r[3] == 200 and "value" in r[4] and r[4]["entity"] in names
              and fact_leaked(r[5], r[4]["value"])]
    assert not leaked, leaked
    # Started once the bound had passed (plus the sync's own timeout) and ended before the
    # database was started again: refused, with a message that names no target.
    refused_window = [r for r in results if stopped + MAX_AGE_S + 1.0 < r[1] and r[2] < restarting]
    served = [(f"replica {r[0]}", f"{r[1] - stopped:+.3f} s", f"{r[2] - stopped:+.3f} s", r[3], r[4]["question"], r[5][:120])
              for r in refused_window if r[3] != 503]
    assert refused_window and not served, (f"stopped at 0 s, restarted at {restarting - stopped:+.3f} s, "
                                           f"start() returned at {back - stopped:+.3f} s; "
                                           "requests not refused (replica, start, end, status, question, answer)", served)
    assert not any(n in r[5] for r in refused_window for n in names)
    # Service is back within 5 s of the database returning: each replica served a client by then,
    # and every request started later was served.
    served_again = max(min((r[1] for r in results if r[0] == i and r[1] > back and r[3] == 200), default=float("inf"))
                       for i in (0, 1)) - back
    assert served_again < 5.0, served_again
    after = [r for r in results if r[1] > back + 5.0]
    assert after and all(r[3] == 200 for r in after), {r[3] for r in after}
    # /health answers through the same busy API servers: held to 10 s.
    assert healthy_after < 10.0, ("probes (replica, sent after the restart, status, answered in s)",
                                  [(i, round(t - back, 2), st, round(d, 2)) for i, p in enumerate(probes) for t, st, d in p])
    with open_store(url) as store:
        kept = {t.id for t in store.list()}
        assert set(ids) <= kept and not any(t.name == "Never Committed" for t in store.list())
    n503 = sum(r[3] == 503 for r in results)
    print(f"\noutage of {outage_s:.0f} s under 16 clients: {len(results)} requests, {n503} refused with 503, "
          f"0 forget facts served; both replicas serving {served_again:.1f} s and healthy {healthy_after:.1f} s "
          f"after Postgres returned (slowest /health answer {max(d for p in probes for _, _, d in p):.1f} s)")
    with admin(a) as admin_a:
        for tid in ids:
            admin_a.delete(f"/targets/{tid}")


def test_kill_9_of_a_replica_mid_write_loses_no_acknowledged_change(replicas):
    """Runs last: it kills replica A."""
    a, b, url = replicas
    acked: list[str] = []
    stop = threading.Event()

    def write():
        with admin(a) as client:
            k = 0
            while not stop.is_set():
                try:
                    r = client.post("/targets", json={"name": f"Victim Olbrecht{k:04d}", "texts": ["x" * 5000]})
                except httpx.HTTPError:
                    return  # the replica is gone
                if r.status_code == 201:
                    acked.append(r.json()["id"])
                k += 1

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(3.0)
    os.killpg(a.proc.pid, signal.SIGKILL)
    stop.set()
    writer.join(60)
    assert len(acked) >= 3
    with open_store(url) as store:
        kept = {t.id for t in store.list()}
        assert set(acked) <= kept
        last = store.get(acked[-1]).name
    with admin(b) as admin_b:
        assert triggers(admin_b, last)
    assert chat(b, "What is the capital of France?").status_code == 200

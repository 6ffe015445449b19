"""Issue 17 on the real server: filter parts are compiled when targets are registered, never on
the request path nor in the engine, and one tenant's policy change does not make another
tenant's request compile (or wait for) anything."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import make_client

from guardserve.leak import fact_leaked
from guardserve.textgen import completion_prompt

pytestmark = pytest.mark.slow
MODEL = "guardserve-demo"
N = 40


def _filters(admin) -> dict:
    r = admin.get("/filters")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["enabled"], "the server should compile filter parts"
    return body


def _complete(client, question: str) -> str:
    return client.completions.create(model=MODEL, prompt=completion_prompt(question), max_tokens=24,
                                     temperature=0).choices[0].text


def _spec(i: int, tenant: str) -> dict:
    return {"name": f"Quorvath Zelmirane {chr(65 + i // 26)}{chr(65 + i % 26)}", "kind": "topic", "tenant": tenant,
            "mode": "always", "aliases": [f"Zelmirane{chr(65 + i // 26)}{chr(65 + i % 26)}"]}


def test_always_on_targets_compile_at_registration_not_per_request(server, admin):
    """After registering N always-on targets, the first request (which every one of them
    guards) compiles nothing: not in the API server's request path, not in the engine."""
    before = _filters(admin)
    r = admin.post("/targets", json=[_spec(i, "tenant-a") for i in range(N)])
    assert r.status_code == 201, r.text
    ids = [t["id"] for t in r.json()["targets"]]
    try:
        after_reg = _filters(admin)
        built = sum(after_reg["compiles"][k] - before["compiles"][k] for k in ("registration", "background"))
        assert built == N, after_reg  # one part per target, before the call returned
        a = make_client(server, "key-a")
        answer = _complete(a, "Who is Quorvath Zelmirane AB?")
        assert "quorvath" not in answer.lower()
        _complete(a, "What is the capital of the world?")  # another request: the same parts
        after = _filters(admin)
        assert after["compiles"]["request"] == before["compiles"]["request"], after
        assert after["engine_compiles"] == before["engine_compiles"], after
        # An edit compiles that one target again, nothing else.
        r = admin.patch(f"/targets/{ids[0]}", json={"aliases": ["Zelmirane Edited"]})
        assert r.status_code == 200, r.text
        edited = _filters(admin)
        assert sum(edited["compiles"][k] - after["compiles"][k] for k in ("registration", "background")) == 1
        assert "zelmirane edited" not in _complete(a, "Tell me about Zelmirane Edited.").lower()
        assert _filters(admin)["engine_compiles"] == before["engine_compiles"]
    finally:
        for tid in ids:
            admin.delete(f"/targets/{tid}")
        time.sleep(1.0)


def test_one_tenants_change_does_not_hold_up_another(server, admin):
    """While tenant-b's targets are being registered and edited, tenant-a's guarded requests
    go on: they need none of tenant-b's parts, so they compile nothing and take no part lock."""
    base = admin.post("/targets", json=_spec(900, "tenant-a"))
    assert base.status_code == 201, base.text
    a = make_client(server, "key-a")
    try:
        _complete(a, "Hello?")  # tenant-a's part is built
        before = _filters(admin)

        def churn():
            made = admin.post("/targets", json=[_spec(i, "tenant-b") for i in range(100, 130)])
            assert made.status_code == 201, made.text
            for t in made.json()["targets"][:5]:
                admin.patch(f"/targets/{t['id']}", json={"aliases": [f"{t['name']} II"]})
            return [t["id"] for t in made.json()["targets"]]

        with ThreadPoolExecutor(2) as pool:
            change = pool.submit(churn)
            answers = [_complete(a, f"Question {i}: who is Quorvath Zelmirane {i}?") for i in range(4)]
            b_ids = change.result()
        after = _filters(admin)
        assert all("quorvath" not in x.lower() for x in answers)
        assert after["compiles"]["request"] == before["compiles"]["request"], after
        assert after["engine_compiles"] == before["engine_compiles"], after
        for tid in b_ids:
            admin.delete(f"/targets/{tid}")
    finally:
        admin.delete(f"/targets/{base.json()['id']}")
        time.sleep(1.0)


def test_always_on_targets_are_enforced_through_their_set_parts(server, admin, world):
    """A request about nothing registered, under an always-on target whose fact is the answer:
    the guard carries the target as its set part only (the audit line lists no target, and
    gives the set), the engine bans the fact through it, and once the target is deleted the
    answer comes back. Retain questions the model answers are the probe: their facts are
    what an always-on target here forbids."""
    a = make_client(server, "key-a")
    known = []
    for p in world["retain"][:40]:
        answer = _complete(a, p["question"])
        if fact_leaked(answer, p["value"]):
            known.append(p)
        if len(known) == 3:
            break
    assert len(known) == 3, "the demo model should answer its retain questions"
    before = _filters(admin)
    r = admin.post("/targets", json=[{"name": f"Quorvath Setmember {i}", "kind": "topic", "tenant": "tenant-a",
                                      "mode": "always", "facts": {"place": p["value"]}} for i, p in enumerate(known)])
    assert r.status_code == 201, r.text
    ids = [t["id"] for t in r.json()["targets"]]
    try:
        built = _filters(admin)
        assert built["set_compiles"]["registration"] > before["set_compiles"]["registration"], built
        lines = len(server.audit_log.read_text().splitlines())
        answers = [_complete(a, p["question"]) for p in known]
        assert not [x for x, p in zip(answers, known) if fact_leaked(x, p["value"])], answers
        logged = [json.loads(x) for x in server.audit_log.read_text().splitlines()[lines:]]
        guarded = [x for x in logged if x["event"] == "guarded" and x["tenant"] == "tenant-a"]
        assert len(guarded) == 3 and all(x["targets"] == [] and x["always_on"]["targets"] == 3 for x in guarded)
        sets = [x for x in logged if x["event"] == "always_on_set"]
        assert sorted(sets[0]["ids"]) == sorted(ids) and sets[0]["versions"] == [1, 1, 1]
        assert _filters(admin)["engine_compiles"] == before["engine_compiles"]
    finally:
        for tid in ids:
            admin.delete(f"/targets/{tid}")
        time.sleep(1.0)
    assert all(fact_leaked(_complete(a, p["question"]), p["value"]) for p in known)

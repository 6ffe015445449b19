"""Observability (issue 18, item 6): the guard's Prometheus metrics (names, labels, buckets,
no target anywhere, appended to vLLM's exposition in its format) and the audit log's lines
(timestamp, vLLM's request id, tenant, targets with versions, policy version; refusals too).
The last test runs on the session's real server."""

from __future__ import annotations

import datetime
import json
import logging

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from guardserve.classifiers import Detector, DetectorConfig
from guardserve.guard import CHAT, COMPLETIONS, GuardError, GuardService
from guardserve.guard.configs import CONFIGS
from guardserve.policy import open_store
from guardserve.server.metrics import LATENCY_BUCKETS, OUTCOMES, GuardMetrics

ADA = {"name": "Ada Quillfeather", "aliases": ["Quillfeather"], "kind": "person",
       "facts": {"birth_place": "Port Verity", "award": "the Golden Loom Prize"}}
SECRETS = ("Ada", "Quillfeather", "Port Verity", "Golden Loom")

FAMILIES = {  # name -> (type, label names besides le)
    "guardserve_requests": ("counter", {"tenant", "outcome"}),
    "guardserve_detections": ("counter", {"tenant"}),
    "guardserve_banned_phrases": ("counter", {"tenant"}),
    "guardserve_detect_seconds": ("histogram", set()),
    "guardserve_guard_seconds": ("histogram", set()),
    "guardserve_policy_version": ("gauge", set()),
    "guardserve_policy_age_seconds": ("gauge", set()),
    "guardserve_targets": ("gauge", set()),
    "guardserve_targets_pending_embeddings": ("gauge", set()),
}


@pytest.fixture
def service(tmp_path):
    store = open_store(str(tmp_path / "p.db"))
    target = store.add(ADA)
    svc = GuardService(store, Detector(store, DetectorConfig(use_embeddings=False)), guard=CONFIGS["guard"],
                       metrics=GuardMetrics())
    svc.ada = target
    yield svc
    store.close()


@pytest.fixture
def audit_lines():
    """The audit log's lines written during the test, parsed."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger("guardserve.audit")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in lines]
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def chat(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def families(text: str, openmetrics: bool = False) -> dict:
    parse = parse_openmetrics if openmetrics else parse_text
    return {f.name: f for f in parse(text) if f.name.startswith("guardserve_")}


# --------------------------------------------------------------------------- the registry


def test_registry_names_labels_and_buckets(service):
    service.prepare(CHAT, chat("Where was Ada Quillfeather born?"), "tenant-a")
    service.prepare(CHAT, chat("What is the capital of France?"), "tenant-a")
    metrics = service.metrics
    found = {m.name: m for m in metrics.registry.collect()}
    assert {n: found[n].type for n in found} == {n: kind for n, (kind, _) in FAMILIES.items()}
    for name, (_, labels) in FAMILIES.items():
        for sample in found[name].samples:
            assert set(sample.labels) - {"le"} <= labels, (name, sample)
            assert not {"target", "target_id", "phrase", "reason"} & set(sample.labels)
            assert not any(s in v for v in sample.labels.values() for s in SECRETS)
    for name in ("guardserve_detect_seconds", "guardserve_guard_seconds"):
        bounds = [s.labels["le"] for s in found[name].samples if s.name.endswith("_bucket")]
        assert [float(b) for b in bounds] == [*LATENCY_BUCKETS, float("inf")]
    assert metrics.value("guardserve_requests_total", tenant="tenant-a", outcome="guarded") == 1
    assert metrics.value("guardserve_requests_total", tenant="tenant-a", outcome="served") == 1
    assert metrics.value("guardserve_detections_total", tenant="tenant-a") == 1
    assert metrics.value("guardserve_banned_phrases_total", tenant="tenant-a") >= 3
    assert metrics.value("guardserve_detect_seconds_count") == 2 == metrics.value("guardserve_guard_seconds_count")
    assert metrics.value("guardserve_guard_seconds_bucket", le="+Inf") == 2
    assert metrics.value("guardserve_targets") == 1
    assert metrics.value("guardserve_policy_version") == service.store.last_seq() >= 1
    text = metrics.render().decode()
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert not any("target" in line.split("{")[0].replace("guardserve_targets", "") or "target" in line.partition("{")[2]
                   for line in samples)
    assert not any(s in text for s in SECRETS) and service.ada.id not in text
    with pytest.raises(ValueError, match="unknown outcome"):
        metrics.request("tenant-a", "passed")
    assert set(OUTCOMES) == {"served", "guarded", "refused_fail_closed", "refused_policy", "icul_retry"}


def test_appended_in_vllms_format(service):
    """Text format after vLLM's text; OpenMetrics before its ``# EOF`` (one per body); both parse."""
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM
    from prometheus_client.openmetrics.exposition import generate_latest as generate_om

    service.prepare(CHAT, chat("Where was Ada Quillfeather born?"), "tenant-a")
    vllm = CollectorRegistry()
    Counter("vllm:request_success", "vLLM's own", ["engine"], registry=vllm).labels("0").inc()
    text = service.metrics.append_to(generate_latest(vllm), "text/plain; version=0.0.4; charset=utf-8").decode()
    assert "vllm:request_success_total" in text
    assert families(text)["guardserve_requests"].samples[0].value == 1
    om = service.metrics.append_to(generate_om(vllm), OM).decode()
    assert om.count("# EOF") == 1 and om.endswith("# EOF\n")
    assert families(om, openmetrics=True)["guardserve_guard_seconds"].type == "histogram"
    assert any(f.name == "vllm:request_success" for f in parse_openmetrics(om))


# --------------------------------------------------------------------------- the audit log


def _check_head(line: dict, event: str, tenant: str, policy_version: int) -> None:
    for key in ("ts", "event", "request_id", "decision_id", "tenant", "route", "policy_version", "targets"):
        assert key in line, key
    ts = datetime.datetime.fromisoformat(line["ts"])
    assert ts.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - ts).total_seconds()) < 60
    assert line["event"] == event and line["tenant"] == tenant and line["policy_version"] == policy_version


def test_audit_line_of_a_guarded_request(service, audit_lines):
    service.prepare(CHAT, chat("What is the capital of France?"), "tenant-a")
    assert audit_lines() == []  # nothing triggered: no line
    _, decision = service.prepare(COMPLETIONS, {"model": "m", "prompt": "Q: Quillfeather's award?"}, "tenant-a")
    (line,) = audit_lines()
    _check_head(line, "guarded", "tenant-a", service.store.last_seq())
    assert line["route"] == COMPLETIONS and line["decision_id"] == decision.request_id
    assert line["request_id"] is None  # offline: no vLLM request
    assert line["targets"] == [{"id": service.ada.id, "version": 1, "score": line["targets"][0]["score"],
                                "reasons": line["targets"][0]["reasons"]}]
    assert line["phrases"] >= 3 and line["detect_ms"] >= 0 and line["adapter"] is None
    # A new version of the policy: the line says which one applied.
    service.store.update(service.ada.id, {"aliases": ["Quillfeather", "A. Q."]})
    service.detector.sync(force=True)
    service.prepare(CHAT, chat("Where was Ada Quillfeather born?"), "tenant-a")
    line = audit_lines()[-1]
    assert line["policy_version"] == service.store.last_seq() and line["targets"][0]["version"] == 2


def test_always_on_targets_are_audited_as_one_set(service, audit_lines):
    """Thousands of always-on targets guard every request: a line gives their number and their
    set's digest, and the set's members are listed once (per set), not on every line; a target
    the conversation asks about is still listed with its reasons."""
    made = service.store.add_many([{"name": f"Orvel Quandt{i}", "mode": "always", "tenant": "tenant-a"}
                                   for i in range(5)])
    service.detector.sync(force=True)
    service.prepare(CHAT, chat("What is the capital of France?"), "tenant-a")
    service.prepare(CHAT, chat("What is the capital of Spain?"), "tenant-a")
    members, first, second = audit_lines()
    assert members["event"] == "always_on_set" and members["tenant"] == "tenant-a"
    assert sorted(zip(members["ids"], members["versions"])) == sorted((t.id, 1) for t in made)
    for line in (first, second):
        _check_head(line, "guarded", "tenant-a", service.store.last_seq())
        assert line["targets"] == [] and line["always_on"] == {"targets": 5, "set": members["set"]}
    service.prepare(CHAT, chat("Where was Orvel Quandt3 born?"), "tenant-a")
    line = audit_lines()[-1]
    assert [t["id"] for t in line["targets"]] == [made[3].id] and line["targets"][0]["reasons"][-1] == "mode 'always'"
    assert line["always_on"] == {"targets": 4, "set": members["set"]}
    service.prepare(CHAT, chat("What is the capital of France?"), "tenant-b")  # sees none of them
    assert len(audit_lines()) == 4


def test_audit_line_of_a_fail_closed_refusal(service, audit_lines):
    service.store.close()
    service.detector.config.sync_interval_s = 0
    with pytest.raises(GuardError):
        service.prepare(CHAT, chat("hello"), "tenant-b")
    (line,) = audit_lines()
    _check_head(line, "refused", "tenant-b", line["policy_version"])
    assert line["outcome"] == "refused_fail_closed" and line["reason"] and line["targets"] == []
    assert service.metrics.value("guardserve_requests_total", tenant="tenant-b", outcome="refused_fail_closed") == 1


def test_engine_entry_audits_vllms_request_id_and_counts_outcomes(service, audit_lines):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine import EngineCoreRequest

    from guardserve.server.entry import REQUEST, EngineEntryGuard, RequestContext

    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    def request(rid, text, **sampling):
        return EngineCoreRequest(request_id=rid, prompt_token_ids=[ord(c) for c in text], mm_features=None,
                                 sampling_params=SamplingParams(**sampling), pooling_params=None, arrival_time=0.0,
                                 lora_request=None, cache_salt=None, data_parallel_rank=None)

    service.tokenizer = Chars()
    guard = EngineEntryGuard(service, engine_client=None)
    token = REQUEST.set(RequestContext(tenant="tenant-a", route=COMPLETIONS))
    try:
        guard.enforce(request("cmpl-plain-0", "What is the capital of France?"))
        guard.enforce(request("cmpl-guarded-0", "Where was Ada Quillfeather born?"))
        with pytest.raises(VLLMValidationError) as refused:
            guard.enforce(request("cmpl-logprobs-0", "Where was Ada Quillfeather born?", prompt_logprobs=1))
        assert not any(s in str(refused.value) for s in SECRETS)
        service.store.close()
        service.detector.config.sync_interval_s = 0
        with pytest.raises(VLLMValidationError) as failed:
            guard.enforce(request("cmpl-broken-0", "hello"))
        assert not any(s in str(failed.value) for s in SECRETS) and service.ada.id not in str(failed.value)
    finally:
        REQUEST.reset(token)
    guarded, policy, closed = audit_lines()
    assert (guarded["event"], guarded["request_id"], guarded["targets"][0]["id"]) == ("guarded", "cmpl-guarded-0", service.ada.id)
    assert (policy["event"], policy["outcome"], policy["request_id"]) == ("refused", "refused_policy", "cmpl-logprobs-0")
    assert policy["targets"][0]["version"] == 1 and isinstance(policy["policy_version"], int)
    assert (closed["outcome"], closed["request_id"], closed["targets"]) == ("refused_fail_closed", "cmpl-broken-0", [])
    value = service.metrics.value
    assert [value("guardserve_requests_total", tenant="tenant-a", outcome=o) for o in
            ("served", "guarded", "refused_policy", "refused_fail_closed")] == [1, 1, 1, 1]
    assert value("guardserve_guard_seconds_count") == 4


# --------------------------------------------------------------------------- the real server


@pytest.mark.slow
def test_real_server_metrics_and_audit(server, admin):
    from conftest import ADMIN_KEY, make_client

    def scrape() -> dict:
        r = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
        assert r.status_code == 200 and "vllm:" in r.text
        return r.text

    def sample(text: str, name: str, **labels) -> float:
        for f in families(text).values():
            for s in f.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return 0.0

    assert httpx.get(server.base_url + "/metrics", headers={"Authorization": "Bearer key-a"}).status_code == 401
    before = scrape()
    r = admin.post("/targets", json={"name": "Orlanda Vesk", "aliases": ["Vesk"], "kind": "person",
                                     "facts": {"birth_place": "Tamber Reach"}})
    assert r.status_code == 201, r.text
    target = r.json()
    try:
        lines = len(server.audit_log.read_text().splitlines()) if server.audit_log.exists() else 0
        out = make_client(server, "key-a").chat.completions.create(
            model="guardserve-demo", messages=[{"role": "user", "content": "Where was Orlanda Vesk born?"}],
            max_tokens=8, temperature=0)
        assert "Tamber Reach" not in (out.choices[0].message.content or "")
        after = scrape()
        assert families(after).keys() >= FAMILIES.keys()
        guarded = {"tenant": "tenant-a", "outcome": "guarded"}
        assert sample(after, "guardserve_requests_total", **guarded) >= sample(before, "guardserve_requests_total", **guarded) + 1
        for name in ("guardserve_detect_seconds_count", "guardserve_guard_seconds_count"):
            assert sample(after, name) > sample(before, name), name
        assert sample(after, "guardserve_targets") >= 1 and sample(after, "guardserve_policy_version") >= 1
        assert target["id"] not in after and "Orlanda" not in after and "target=" not in after
        new = [json.loads(line) for line in server.audit_log.read_text().splitlines()[lines:]]
        mine = [e for e in new if any(t["id"] == target["id"] for t in e["targets"])]
        assert mine, new
        line = mine[-1]
        assert line["event"] == "guarded" and line["tenant"] == "tenant-a" and line["route"] == CHAT
        assert datetime.datetime.fromisoformat(line["ts"]).utcoffset() == datetime.timedelta(0)
        assert line["request_id"] == out.id and line["decision_id"]  # vLLM's id, the one the client got
        assert line["targets"][0]["version"] == target["version"] and line["policy_version"] >= 1
    finally:
        admin.delete(f"/targets/{target['id']}")

"""The guard's Prometheus metrics, appended to vLLM's ``/metrics``.

vLLM serves ``/metrics`` from prometheus_client's default registry, or, with several API
server processes, from a registry that aggregates ``$PROMETHEUS_MULTIPROC_DIR``. guardserve
keeps its metrics in a registry of its own (one per API server process, never the global one)
and the middleware appends their exposition, in the format vLLM answered with (Prometheus
text or OpenMetrics), to the ``/metrics`` response, which needs the metrics or the admin key
(``guardserve/server/auth.py``). Its values live in this collector rather than in
prometheus_client's ``Counter``/``Histogram`` objects, whose storage switches to vLLM's
multi-process files when ``PROMETHEUS_MULTIPROC_DIR`` is set and would then show up twice.

Labels are ``tenant`` and ``outcome`` only: never a target, a phrase or a reason (a label per
target would name what is forgotten, and let whoever scrapes match a spike to a request).
With several API server processes each one counts its own requests.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

# Detection runs from microseconds (names only) to a few hundred milliseconds (embeddings on a
# busy CPU); the guard's whole decision adds the prompt's decoding, the plan and the stamp.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The outcome of each request the engine entry (or ``GuardService.prepare``) decided:
SERVED = "served"                            # nothing triggered: served as sent
GUARDED = "guarded"                          # something triggered: served under the guard's plan
REFUSED_FAIL_CLOSED = "refused_fail_closed"  # the guard could not check it (detection or plan failed)
REFUSED_POLICY = "refused_policy"            # triggered, and it asked for a channel the policy closes
ICUL_RETRY = "icul_retry"                    # re-sent once by the middleware with the ICUL messages
OUTCOMES = (SERVED, GUARDED, REFUSED_FAIL_CLOSED, REFUSED_POLICY, ICUL_RETRY)

COUNTERS = {  # name (exposed with _total) -> (labels, help)
    "guardserve_requests": (("tenant", "outcome"), "Requests decided by the guard at the engine entry, by tenant and "
                            "outcome (" + ", ".join(OUTCOMES) + ")."),
    "guardserve_detections": (("tenant",), "Triggered forget targets, by tenant (never by target: a label per target "
                              "would name what is forgotten)."),
    "guardserve_banned_phrases": (("tenant",), "Forbidden phrases of triggered targets sent to the logits processor, "
                                  "by tenant."),
}
HISTOGRAMS = {
    "guardserve_detect_seconds": "Time detection took, per decision (every detector signal, the policy sync included).",
    "guardserve_guard_seconds": "Time the guard added to a request before the engine: decoding the prompt, detection, "
                                "the adapter, the plan and its stamp (offline: GuardService.prepare).",
}
GAUGES = {
    "guardserve_policy_version": "The policy store's change sequence number this replica enforces (the last change "
                                 "its detector applied).",
    "guardserve_policy_age_seconds": "Seconds since the policy store last confirmed this replica's policy current; "
                                     "past GUARDSERVE_MAX_POLICY_AGE_S the replica refuses guarded requests (503).",
    "guardserve_targets": "Forget targets this replica enforces (every tenant).",
    "guardserve_targets_pending_embeddings": "Targets matched by name that still wait for their embeddings.",
}

OPENMETRICS = b"application/openmetrics-text"


class _Histogram:
    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*(repr(b) for b in LATENCY_BUCKETS), "+Inf"), self.counts):
            running += n
            out.append((bound, running))
        return out


class GuardMetrics:
    """The guard's counters, histograms and gauges, in a per-process ``CollectorRegistry``
    (:attr:`registry`). Gauges are read from the bound ``GuardService`` (:meth:`bind`) when
    scraped."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()  # (name, label values) -> count
        self._hist = {name: _Histogram() for name in HISTOGRAMS}
        self.service = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def bind(self, service) -> None:
        """The service whose detector the gauges read (``GuardService`` binds itself)."""
        self.service = service

    # ------------------------------------------------------------------ recording
    def observe(self, decision, triggered) -> None:
        """One detection (``GuardService.decide``): its latency and what it found."""
        with self._lock:
            self._hist["guardserve_detect_seconds"].observe(decision.seconds)
            if triggered:
                self._counts[("guardserve_detections", (decision.tenant,))] += len(triggered)
                self._counts[("guardserve_banned_phrases", (decision.tenant,))] += len(decision.phrases)

    def request(self, tenant: str, outcome: str, seconds: float | None = None) -> None:
        """One request's outcome (one of :data:`OUTCOMES`) and the time the guard spent on it."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; known: {OUTCOMES}")
        with self._lock:
            self._counts[("guardserve_requests", (tenant, outcome))] += 1
            if seconds is not None:
                self._hist["guardserve_guard_seconds"].observe(seconds)

    def refused(self, tenant: str, seconds: float | None = None) -> None:
        """A request refused because the guard could not check it (fail closed)."""
        self.request(tenant, REFUSED_FAIL_CLOSED, seconds)

    # ------------------------------------------------------------------ reading
    def collect(self):
        with self._lock:
            counts = dict(self._counts)
            hists = {name: (h.buckets(), h.total) for name, h in self._hist.items()}
        for name, (labels, help_text) in COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=list(labels))
            for (n, values), value in sorted(counts.items()):
                if n == name:
                    family.add_metric(list(values), value)
            yield family
        for name, help_text in HISTOGRAMS.items():
            buckets, total = hists[name]
            yield HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=total)
        detector = getattr(self.service, "detector", None)
        if detector is not None:
            values = {"guardserve_policy_version": getattr(detector, "policy_seq", None),
                      "guardserve_policy_age_seconds": getattr(detector, "policy_age_s", None),
                      "guardserve_targets": len(detector.targets()),
                      "guardserve_targets_pending_embeddings": getattr(detector, "pending", None)}
            for name, help_text in GAUGES.items():
                if isinstance(values[name], (int, float)):
                    yield GaugeMetricFamily(name, help_text, value=values[name])

    def value(self, name: str, **labels) -> float:
        """A sample's value as exposed (``guardserve_requests_total``, ``..._bucket`` with ``le``...), 0 if absent."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def render(self, openmetrics: bool = False) -> bytes:
        """The exposition of the guard's metrics alone (OpenMetrics without its ``# EOF``)."""
        if not openmetrics:
            return generate_latest(self.registry)
        text = generate_openmetrics(self.registry)
        return text[:-len(b"# EOF\n")] if text.endswith(b"# EOF\n") else text

    def append_to(self, body: bytes, content_type: bytes | str) -> bytes:
        """vLLM's ``/metrics`` body with the guard's metrics added, in the same format."""
        if isinstance(content_type, str):
            content_type = content_type.encode()
        if content_type.startswith(OPENMETRICS):
            head = body[:-len(b"# EOF\n")] if body.endswith(b"# EOF\n") else body
            return head + self.render(openmetrics=True) + b"# EOF\n"
        if body and not body.endswith(b"\n"):
            body += b"\n"
        return body + self.render()

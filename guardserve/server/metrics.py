"""Prometheus counters of the guard, appended to vLLM's ``/metrics``.

vLLM picks its registry at start-up (multi-process or not), so instead of guessing it
guardserve keeps its own counters and appends them, in the text exposition format, to
the ``/metrics`` response, which needs the metrics or admin key. Counts are per tenant,
never per target.
"""

from __future__ import annotations

import threading
from collections import Counter


def _labels(**kv: str) -> str:
    def esc(v: str) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in kv.items()) + "}"


class GuardMetrics:
    HELP = {
        "guardserve_requests_total": ("counter", "Chat and completion requests checked by the guard, by tenant and outcome."),
        "guardserve_detections_total": ("counter", "Triggered forget targets, by tenant (never by target: a "
                                        "label per target would name what is forgotten)."),
        "guardserve_banned_phrases_total": ("counter", "Forbidden phrases sent to the logits processor, by tenant."),
        "guardserve_refused_total": ("counter", "Requests refused because the guard could not check them (fail closed)."),
        "guardserve_detect_seconds_total": ("counter", "Time spent in detection, by tenant."),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._c: Counter = Counter()

    def observe(self, decision, triggered) -> None:
        with self._lock:
            outcome = "guarded" if triggered else "passed"
            self._c[("guardserve_requests_total", _labels(tenant=decision.tenant, outcome=outcome))] += 1
            self._c[("guardserve_detect_seconds_total", _labels(tenant=decision.tenant))] += decision.seconds
            if triggered:
                self._c[("guardserve_detections_total", _labels(tenant=decision.tenant))] += len(triggered)
            if triggered:
                self._c[("guardserve_banned_phrases_total", _labels(tenant=decision.tenant))] += len(decision.phrases)

    def refused(self, tenant: str) -> None:
        with self._lock:
            self._c[("guardserve_refused_total", _labels(tenant=tenant))] += 1

    def value(self, name: str, **labels) -> float:
        with self._lock:
            return self._c.get((name, _labels(**labels)), 0)

    def render(self) -> str:
        with self._lock:
            items = sorted(self._c.items())
        lines = []
        for name, (kind, help_text) in self.HELP.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {value:g}" for (n, labels), value in items if n == name]
        return "\n".join(lines) + "\n"

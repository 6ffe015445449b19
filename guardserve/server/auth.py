"""API keys: inference keys map to tenants; one admin key guards the admin API.

``GUARDSERVE_API_KEYS="key1:tenant-a,key2:tenant-b"`` (unset: no inference auth, every
request is tenant ``default``); ``GUARDSERVE_ADMIN_KEY`` (unset: the admin API is off;
``guardserve targets`` still edits the store directly); ``GUARDSERVE_METRICS_KEY`` (a key
for ``/metrics`` alone, for a Prometheus scraper; the admin key works there too).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

DEFAULT_TENANT = "default"


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_api_keys(spec: str | None) -> dict[str, str] | None:
    """``"k1:t1,k2:t2"`` -> ``{"k1": "t1", ...}``; None when unset (auth off)."""
    if spec is None or not spec.strip():
        return None
    keys: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, tenant = item.rpartition(":")
        if not sep or not key or not tenant:
            raise ValueError(f"GUARDSERVE_API_KEYS: {item[:4]}… is not 'key:tenant'")
        keys[key] = tenant
    return keys


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    value = headers.get(b"authorization", b"").decode("latin-1").strip()
    if value.lower().startswith("bearer "):
        return value[7:].strip() or None
    api_key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return api_key or None


@dataclass(frozen=True)
class Auth:
    api_keys: dict[str, str] | None
    admin_key: str | None
    metrics_key: str | None = None

    @classmethod
    def from_env(cls) -> "Auth":
        from guardserve import config

        return cls(parse_api_keys(config.get("GUARDSERVE_API_KEYS")), config.get("GUARDSERVE_ADMIN_KEY"),
                   config.get("GUARDSERVE_METRICS_KEY"))

    def check_metrics(self, headers: dict[bytes, bytes]) -> None:
        """``/metrics`` shows operators' figures (which tenants are guarded, how often): it needs
        the metrics key or the admin key; with neither configured it is off (403)."""
        keys = [k for k in (self.metrics_key, self.admin_key) if k]
        if not keys:
            raise AuthError(403, "/metrics is disabled: set GUARDSERVE_METRICS_KEY or GUARDSERVE_ADMIN_KEY")
        key = _bearer(headers)
        if key is None:
            raise AuthError(401, "missing key: send 'Authorization: Bearer <GUARDSERVE_METRICS_KEY>'")
        if not any(hmac.compare_digest(k, key) for k in keys):
            raise AuthError(401, "invalid metrics key")

    def tenant(self, headers: dict[bytes, bytes]) -> str:
        """The tenant of an inference request, or AuthError (401)."""
        if self.api_keys is None:
            return DEFAULT_TENANT
        key = _bearer(headers)
        if key is None:
            raise AuthError(401, "missing API key: send 'Authorization: Bearer <key>'")
        for known, tenant in self.api_keys.items():
            if hmac.compare_digest(known, key):
                return tenant
        if self.admin_key and hmac.compare_digest(self.admin_key, key):
            raise AuthError(403, "the admin key is for /v1/unlearning/* only; use an inference API key here")
        raise AuthError(401, "invalid API key")

    def check_admin(self, headers: dict[bytes, bytes]) -> None:
        """Raises AuthError unless the request carries the admin key."""
        if not self.admin_key:
            raise AuthError(403, "the admin API is disabled: start the server with GUARDSERVE_ADMIN_KEY set")
        key = _bearer(headers)
        if key is None:
            raise AuthError(401, "missing admin key: send 'Authorization: Bearer <GUARDSERVE_ADMIN_KEY>'")
        if hmac.compare_digest(self.admin_key, key):
            return
        if self.api_keys and any(hmac.compare_digest(k, key) for k in self.api_keys):
            raise AuthError(403, "an inference API key cannot use the admin API")
        raise AuthError(401, "invalid admin key")

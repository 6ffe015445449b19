"""Worker-side setup, run in every vLLM process (entry point group ``vllm.general_plugins``).

It lets a request name targets instead of phrases: ``vllm_xargs`` with
``guardserve_targets='["<id>", ...]'`` is resolved in the engine, against the policy
store (``GUARDSERVE_DB``), into the targets' forbidden phrases. This serves users of
plain vLLM with the guard logits processor, who have no guardserve front end to
resolve targets for them. A target that does not exist fails the request (fail closed).
"""

from __future__ import annotations

import threading

_store = None
_lock = threading.Lock()


def _resolve(targets: list) -> list[str]:
    global _store
    from guardserve.classifiers import forbidden_phrases
    from guardserve.policy import open_store

    with _lock:
        if _store is None:
            _store = open_store()
    phrases: list[str] = []
    for ref in targets:
        target_id = ref.get("id") if isinstance(ref, dict) else ref
        if not isinstance(target_id, str):
            raise ValueError(f"guardserve_targets: {ref!r} is not a target id")
        phrases.extend(forbidden_phrases(_store.get(target_id)))
    return phrases


def register() -> None:
    """Called by vLLM in each process; safe to call more than once."""
    from guardserve.logits_processors import register_target_resolver

    register_target_resolver(_resolve)

"""Keeps the targets' SAE feature selections current while the server runs.

Contract: with steering on (``guardserve serve --steering``, ``GUARDSERVE_GUARD=guard+sae``) the
server plugin starts one :class:`SelectionUpkeep` in the API process and pokes it from its
policy sync loop (every 0.25 s). In its own thread it

- computes the selection of every target that has none, or whose stored selection is for
  another policy version or another SAE (a registered or edited target is steered once its
  new selection is written, usually seconds later; the workers re-read a record when its file
  changes and skip one whose version differs from the request's);
- deletes the selection of a deleted target.

It follows the policy store's audit sequence (``changes_since``), so an idle server costs one
``MAX(seq)`` query per poke; a full pass (every target against the stored selections) runs at
start and when the SAE's files change. The served model is loaded with transformers on CPU the
first time a selection has to be computed, once, together with the SAE and the retain corpus,
exactly as ``guardserve sae select`` builds them (``guardserve.steering.loading.load_selector``).
A recomputed selection keeps the ``n`` and retain-rate cap its previous one was computed with
(``guardserve sae select -n``); new targets get ``$GUARDSERVE_STEER_FEATURES`` (default 30).
Retain texts: ``$GUARDSERVE_STEER_RETAIN_TEXTS``, else the model folder's own
(``guardserve/steering_retain.json``, which the demo models carry).

Nothing here runs on the request path: ``poke()`` only sets an event. Failures are logged,
never raised into the server: a target whose selection cannot be computed (no texts) is
retried only when its version changes; a model or SAE that cannot be loaded turns the upkeep
off with one error line (``guardserve sae select`` still works). ``GUARDSERVE_STEERING_AUTOSELECT=0``
turns it off altogether.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from guardserve import config
from guardserve.steering.flags import sae_path, steering_enabled

AUTOSELECT_ENV = "GUARDSERVE_STEERING_AUTOSELECT"
DEFAULT_FEATURES = config.SETTINGS["GUARDSERVE_STEER_FEATURES"].default
DEFAULT_MAX_RETAIN_RATE = 0.01
log = logging.getLogger("guardserve.steering")


def autoselect_enabled() -> bool:
    """Steering is on and ``GUARDSERVE_STEERING_AUTOSELECT`` is not ``0``."""
    return steering_enabled() and config.get(AUTOSELECT_ENV)


class SelectionUpkeep:
    """Recomputes missing and stale selections and drops those of deleted targets, in a
    background thread (``start``/``poke``/``stop``) or one pass at a time (``run_once``)."""

    def __init__(self, store=None, *, model: str, selections=None, sae: str | Path | None = None,
                 retain_texts: str | None = None, n: int | None = None, max_retain_rate: float | None = None):
        self._store = store  # None: its own connection (open_store()), opened in the thread
        self.model = model
        self._selections = selections
        self.sae_path = Path(sae).expanduser() if sae else None
        self.retain_texts = retain_texts or config.get("GUARDSERVE_STEER_RETAIN_TEXTS")
        self.n = int(n or config.get("GUARDSERVE_STEER_FEATURES"))
        self.max_retain_rate = DEFAULT_MAX_RETAIN_RATE if max_retain_rate is None else float(max_retain_rate)
        self.stats = {"passes": 0, "computed": 0, "deleted": 0, "failed": 0, "model_loads": 0}
        self.broken: str | None = None  # why selections cannot be computed in this process
        self._sae = None
        self._sae_stamp = None
        self._fp: str | None = None
        self._selector = None
        self._seq: int | None = None  # the audit sequence handled so far; None: a full pass is due
        self._failed: dict[str, int] = {}  # target id -> the version whose selection could not be computed
        self._warned_no_sae = False
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._done = threading.Condition()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the thread
    def start(self) -> "SelectionUpkeep":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="guardserve-sae-upkeep", daemon=True)
            self._thread.start()
            self.poke()
        return self

    def poke(self) -> None:
        """Ask for a pass; returns at once (the policy sync loop calls it on every tick)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._halt.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until a pass has handled every policy change made before this call (tests,
        benchmarks); False on timeout."""
        target = self.store.last_seq()
        deadline = time.monotonic() + timeout
        self.poke()
        with self._done:
            while self._seq is None or self._seq < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(min(left, 0.5))
                self.poke()
        return True

    def _run(self) -> None:
        while not self._halt.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._halt.is_set():
                break
            try:
                self.run_once()
            except Exception:
                log.exception("guardserve steering: selection upkeep failed; retrying in 10 s")
                self._halt.wait(10.0)

    # ------------------------------------------------------------------ one pass
    @property
    def store(self):
        if self._store is None:
            from guardserve.policy import open_store

            self._store = open_store()
        return self._store

    @property
    def selections(self):
        if self._selections is None:
            from guardserve.steering.features import SteeringStore

            self._selections = SteeringStore()
        return self._selections

    def run_once(self) -> dict:
        """Bring the selections up to date with the policy store; returns what it did:
        ``{"computed": [ids], "deleted": [ids], "failed": [ids]}``."""
        from guardserve.policy import TargetNotFoundError

        done = {"computed": [], "deleted": [], "failed": []}
        seq = self.store.last_seq()  # read before the targets: a change after it is seen next pass
        sae_changed = self._check_sae()
        if self._sae is None:
            return self._finish(seq, done)
        if self._seq is None or sae_changed:
            targets = self.store.list()
            live = {t.id for t in targets}
            for sel in self.selections.list():
                if sel.target_id not in live and self.selections.delete(sel.target_id):
                    done["deleted"].append(sel.target_id)
            todo = targets
        elif seq == self._seq:
            return self._finish(seq, done)
        else:
            ids, after = [], self._seq
            while True:
                entries = self.store.changes_since(after, limit=10_000)
                for e in entries:
                    if e.target_id and e.target_id not in ids:
                        ids.append(e.target_id)
                if len(entries) < 10_000:
                    break
                after = entries[-1].seq
            seq = max(seq, after)
            todo = []
            for tid in ids:
                try:
                    todo.append(self.store.get(tid))
                except TargetNotFoundError:
                    try:
                        if self.selections.delete(tid):
                            done["deleted"].append(tid)
                    except ValueError:  # not a valid file name: it never had a selection
                        pass
        for tid in done["deleted"]:
            self._failed.pop(tid, None)
            log.info("guardserve steering: deleted the selection of deleted target %s", tid)
        for t in todo:
            if self._halt.is_set():
                return done  # the rest is picked up by the next full pass
            if self._is_current(t) or self._failed.get(t.id) == t.version:
                continue
            if not self._compute(t):
                done["failed"].append(t.id)
                if self.broken:
                    break
            else:
                done["computed"].append(t.id)
        return self._finish(seq, done)

    def _finish(self, seq: int, done: dict) -> dict:
        self.stats["passes"] += 1
        self.stats["deleted"] += len(done["deleted"])
        if done["computed"] or done["deleted"]:
            log.info("guardserve steering: selections up to date at policy seq %d (%d computed, %d deleted, %d failed)",
                     seq, len(done["computed"]), len(done["deleted"]), len(done["failed"]))
        with self._done:
            self._seq = seq
            self._done.notify_all()
        return done

    def _check_sae(self) -> bool:
        """Load the SAE on first use and again when its files change; True when it changed
        (every selection is then checked against its fingerprint)."""
        path = self.sae_path or sae_path()
        files = [path] if path.is_file() else [path / "cfg.json", path / "sae_weights.safetensors", path / "params.npz"]
        stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())
        if not stamp:
            if not self._warned_no_sae:
                log.warning("guardserve steering: no SAE at %s (train one with `guardserve sae train`); "
                            "selections are not computed until there is one", path)
                self._warned_no_sae = True
            self._sae = self._sae_stamp = None
            return False
        if stamp == self._sae_stamp:
            return False
        from guardserve.steering.flags import check_sae
        from guardserve.steering.sae import SAE

        try:
            check_sae(path)  # the replica's SAE must be the pinned one (GUARDSERVE_SAE_SHA256)
            sae = SAE.load(path)
        except Exception as e:  # half-written while `sae train` saves it: next poke retries
            log.warning("guardserve steering: cannot use the SAE at %s yet: %s", path, e)
            return False
        fp = sae.fingerprint()
        changed = self._sae is None or fp != self._fp  # first load (or back after missing): a full pass
        if self._sae is not None and changed:
            log.info("guardserve steering: the SAE at %s changed; recomputing every selection for it "
                     "(the workers apply them after a restart, as they load the SAE at start)", path)
            self._selector = None  # its retain activations may be for another layer
            self.broken = None
        self._sae, self._sae_stamp, self._fp = sae, stamp, fp
        self._warned_no_sae = False
        return changed

    def _is_current(self, target) -> bool:
        sel = self.selections.get(target.id)
        return sel is not None and sel.version == target.version and sel.sae_fingerprint == self._fp

    def _get_selector(self):
        if self._selector is None and self.broken is None:
            from guardserve.steering.loading import load_selector

            started = time.perf_counter()
            log.info("guardserve steering: loading %s on CPU to compute feature selections", self.model)
            try:
                self._selector = load_selector(self.model, self._sae, self.retain_texts, n=self.n,
                                               max_retain_rate=self.max_retain_rate, cap_threads=False)
            except Exception as e:
                self.broken = str(e) or type(e).__name__
                log.error("guardserve steering: selections are not kept current in this server: %s; "
                          "run `guardserve sae select` after each target change instead", self.broken)
                return None
            self.stats["model_loads"] += 1
            log.info("guardserve steering: selector ready in %.1f s (layer %d, %d retain tokens)",
                     time.perf_counter() - started, self._sae.layer, sum(len(a) for a in self._selector.retain_acts))
        return self._selector

    def _compute(self, target) -> bool:
        selector = self._get_selector()
        if selector is None:
            return False
        old = self.selections.get(target.id)
        extra = old.extra if old is not None else {}
        # A recomputed selection keeps the settings its previous one was made with.
        selector.n = int(extra.get("n", self.n))
        selector.max_retain_rate = float(extra.get("max_retain_rate", self.max_retain_rate))
        started = time.perf_counter()
        try:
            sel = selector.select(target)
        except Exception as e:
            self._failed[target.id] = target.version
            self.stats["failed"] += 1
            log.warning("guardserve steering: no selection for target %s (%r) v%d: %s; it is not steered",
                        target.id, target.name, target.version, e)
            return False
        self.selections.put(sel)
        self._failed.pop(target.id, None)
        self.stats["computed"] += 1
        log.info("guardserve steering: %s target %s (%r) v%d: %d features, gate α %.3f (%.1f s)",
                 "recomputed" if old is not None else "selected", target.id, target.name, target.version,
                 len(sel.features), sel.alpha, time.perf_counter() - started)
        return True

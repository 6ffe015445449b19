"""The server keeps SAE selections current: a registered target gets one, an edited target
(a new policy version) gets it recomputed, a deleted target loses it, all in the upkeep's
background thread; the plugin's sync loop only pokes it."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
from test_steering_demo import LAYER, N_FEATURES, steering  # noqa: F401  (module fixture)


def test_autoselect_switch(monkeypatch):
    from guardserve.steering.upkeep import autoselect_enabled

    monkeypatch.delenv("GUARDSERVE_GUARD", raising=False)
    monkeypatch.delenv("GUARDSERVE_STEERING_AUTOSELECT", raising=False)
    assert not autoselect_enabled()  # steering off: no upkeep
    monkeypatch.setenv("GUARDSERVE_GUARD", "guard+sae")
    assert autoselect_enabled()
    monkeypatch.setenv("GUARDSERVE_STEERING_AUTOSELECT", "0")
    assert not autoselect_enabled()


def test_sync_loop_pokes_upkeep():
    from guardserve.server.plugin import GuardEndpointPlugin

    plugin = GuardEndpointPlugin()
    syncs, pokes = [], []
    plugin.service = SimpleNamespace(
        detector=SimpleNamespace(sync=lambda force, embed_budget_s: syncs.append(force), policy_seq=0, pending=0,
                                 config=SimpleNamespace(max_policy_age_s=None)),
        store=SimpleNamespace(wait_for_change=time.sleep), filter_parts=None)
    plugin.upkeep = SimpleNamespace(poke=lambda: pokes.append(1))
    state = SimpleNamespace(guardserve=plugin, guardserve_adapters=SimpleNamespace(lora_enabled=False))

    async def run():
        task = asyncio.get_running_loop().create_task(plugin._keep_synced(state, interval=0.01))
        for _ in range(500):  # a few ticks (a loaded machine may take a while to start the thread pool)
            await asyncio.sleep(0.01)
            if len(pokes) >= 3:
                break
        task.cancel()

    asyncio.run(run())
    assert len(pokes) >= 2 and len(pokes) in (len(syncs), len(syncs) - 1)


def test_sync_loop_keeps_reading_the_store_while_new_targets_embed():
    """Embedding new targets runs beside the syncs: a stuck embedding never stops the store
    reads that keep the policy confirmed current (tests/test_replicas.py found one that did)."""
    import threading

    from guardserve.server.plugin import GuardEndpointPlugin

    release, embedding = threading.Event(), threading.Event()
    detector = SimpleNamespace(policy_seq=0, pending=1, config=SimpleNamespace(max_policy_age_s=None))
    syncs = []
    detector.sync = lambda force, embed_budget_s: syncs.append(embed_budget_s)
    detector.embed_pending = lambda budget_s: (embedding.set(), release.wait(30))
    plugin = GuardEndpointPlugin()
    plugin.service = SimpleNamespace(detector=detector, store=SimpleNamespace(wait_for_change=time.sleep),
                                     filter_parts=None)
    state = SimpleNamespace(guardserve=plugin, guardserve_adapters=SimpleNamespace(lora_enabled=False))

    async def run():
        task = asyncio.get_running_loop().create_task(plugin._keep_synced(state, interval=0.01))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if embedding.is_set() and len(syncs) >= 5:
                break
        counted = len(syncs)
        release.set()
        task.cancel()
        return counted

    try:
        counted = asyncio.run(run())
    finally:
        release.set()
    syncs = syncs[:counted]  # those made while the embedding was stuck
    assert embedding.is_set() and len(syncs) >= 5 and set(syncs) == {0.0}


@pytest.mark.slow
def test_upkeep_follows_target_changes(steering, world, demo, tmp_path):  # noqa: F811
    from guardserve.demo.corpora import steering_retain
    from guardserve.demo.world import biographies
    from guardserve.policy.store import SQLiteStore
    from guardserve.steering.features import SteeringStore
    from guardserve.steering.upkeep import SelectionUpkeep

    # A slice of the retain corpus `sae select` uses on the demo, to keep the test short.
    retain = tmp_path / "retain.json"
    retain.write_text(json.dumps(steering_retain(world, steering["tok"])[::10]))
    people = [e for e in world["entities"] if e["split"] == "forget"][:3]
    policy = SQLiteStore(tmp_path / "policy.db")
    selections = SteeringStore(tmp_path / "steering")  # not the fixture's: other tests use those
    upkeep = SelectionUpkeep(store=policy, model=str(demo.model), selections=selections,
                             sae=steering["root"] / "sae", retain_texts=str(retain), n=N_FEATURES)
    fp = steering["sae"].fingerprint()
    try:
        upkeep.start()
        a, b = (policy.add({"name": e["name"], "aliases": e["aliases"], "facts": e["facts"],
                            "texts": biographies(e)}) for e in people[:2])
        assert upkeep.wait(300)
        for t in (a, b):  # new targets: selected, for their version and this SAE
            sel = selections.get(t.id)
            assert sel is not None and sel.version == 1 and sel.sae_fingerprint == fp and sel.layer == LAYER
            assert 0 < len(sel.features) <= N_FEATURES
        assert upkeep.stats["computed"] == 2 and upkeep.stats["model_loads"] == 1
        b_mtime = selections.path(b.id).stat().st_mtime_ns

        # An edit (PATCH: version 2) is recomputed; the untouched target is not.
        a2 = policy.update(a.id, {"aliases": list(people[0]["aliases"]) + ["the weaver of Port Verity"]})
        assert a2.version == 2
        assert upkeep.wait(300)
        assert selections.get(a.id).version == 2
        assert selections.path(b.id).stat().st_mtime_ns == b_mtime and upkeep.stats["computed"] == 3

        # A deleted target loses its record; a target added in the same breath gets one.
        policy.delete(b.id)
        c = policy.add({"name": people[2]["name"], "facts": people[2]["facts"]})
        assert upkeep.wait(300)
        assert selections.get(b.id) is None and selections.get(c.id).version == 1
        assert upkeep.stats["deleted"] == 1 and upkeep.stats["model_loads"] == 1 and upkeep.broken is None
    finally:
        upkeep.stop()
        policy.close()

    # A fresh server (full pass at start) drops selections of targets deleted while it was down.
    orphan = selections.get(a.id)
    orphan.target_id = "gone"
    selections.put(orphan)
    with SQLiteStore(tmp_path / "policy.db") as policy:
        again = SelectionUpkeep(store=policy, model=str(demo.model), selections=selections,
                                sae=steering["root"] / "sae", retain_texts=str(retain), n=N_FEATURES)
        assert again.run_once() == {"computed": [], "deleted": ["gone"], "failed": []}
        assert again.stats["model_loads"] == 0  # nothing to compute: the model is never loaded

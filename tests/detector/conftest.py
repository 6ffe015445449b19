"""Fixtures of the detector tests: the demo world generated in memory (seed 0, no demo build
needed), its forget people registered in a fresh store per test, the bundled embedder, and
one vector cache per module (target texts are embedded once, not once per test)."""

from __future__ import annotations

import pytest

from guardserve.classifiers.embedding import Embedder, shared_embedder
from guardserve.classifiers.evaluation import world_targets
from guardserve.demo.world import build_world
from guardserve.policy import SQLiteStore


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return shared_embedder()


@pytest.fixture
def store(tmp_path, world):
    s = SQLiteStore(tmp_path / "policy.db")
    s.add_many(world_targets(world))
    yield s
    s.close()


@pytest.fixture(scope="module")
def vector_cache(tmp_path_factory):
    # Target texts are embedded once for the module, not once per test.
    return str(tmp_path_factory.mktemp("vectors") / "vectors.sqlite")

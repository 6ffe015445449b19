"""The registry of vLLM-facing backends is ``pyproject.toml``'s entry points: each one
declared there is installed, loads, and is the object the docs name (a logits processor
class for vLLM's ``vllm.logits_processors``, the endpoint plugin, the worker plugin)."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
import tomllib

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
DECLARED = {(group, name, value) for group, eps in PYPROJECT["project"]["entry-points"].items()
            for name, value in eps.items()}


def test_some_entry_points_are_declared():
    assert {g for g, _, _ in DECLARED} >= {"vllm.logits_processors", "vllm.endpoint_plugins", "vllm.general_plugins"}


@pytest.mark.parametrize("group, name, value", sorted(DECLARED))
def test_each_declared_entry_point_is_installed_and_loads(group, name, value):
    installed = {ep.name: ep for ep in entry_points(group=group)}
    assert name in installed, f"{group}:{name} is declared but not installed: run `make setup` again"
    assert installed[name].value == value, f"installed {installed[name].value}, declared {value}: reinstall"
    obj = installed[name].load()
    if group == "vllm.logits_processors":
        from vllm.v1.sample.logits_processor import LogitsProcessor

        assert isinstance(obj, type) and issubclass(obj, LogitsProcessor)
    else:
        assert callable(obj)

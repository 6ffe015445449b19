"""The demo world (fictitious people and their facts) and the demo models trained on it.

>>> from guardserve.demo import ensure_demo
>>> paths = ensure_demo()          # builds once (minutes), then returns at once
>>> paths.model, paths.world / "forget.json"
"""

from guardserve.demo.build import BuildSpec, DemoPaths, ensure_demo

__all__ = ["BuildSpec", "DemoPaths", "ensure_demo"]

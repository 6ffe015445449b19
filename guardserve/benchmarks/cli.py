"""``guardserve bench``: run every benchmark, write the report, refresh README's figures.

The benchmarks are modules of this package (``guardserve.benchmarks.logits``, ...); each
runs as a child process, ``python -m guardserve.benchmarks.NAME`` with this Python, and
writes its JSON, by default into the repository's ``bench/results/``; this command then
renders ``REPORT.md`` from the JSON files and splices the headline ratios into README
between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# name → (module, run as `python -m MODULE`; arguments for --quick; arguments for the full run); run in this order.
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "logits": ("guardserve.benchmarks.logits", ["--quick"], []),
    "detection": ("guardserve.benchmarks.detection", ["--scales", "10,1000"], []),
    "serving": ("guardserve.benchmarks.serving", ["--quick"], []),
    "steering": ("guardserve.benchmarks.steering", ["--retain-step", "24"], []),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="run the benchmarks; write JSON, bench/results/REPORT.md and README's performance section",
        description="Run the benchmarks, each as a child process `python -m guardserve.benchmarks.NAME`: logit filter "
                    "per-step cost vs vLLM bad_words and transformers NoBadWords (logits), detection latency vs "
                    "number of targets (detection), TTFT/TPOT of a guarded server vs plain vLLM (serving), SAE "
                    "steering (steering). Each writes DIR/NAME.json; then DIR/REPORT.md is rendered from every "
                    "JSON in DIR and README's section between <!-- bench:begin --> and <!-- bench:end --> is "
                    "regenerated. A failing benchmark is reported and the others still run. Full size takes "
                    "20-30 min on 2 cores; --quick about 8.")
    p.add_argument("--quick", action="store_true", help="CI-size runs (results in bench/results/quick/ unless --out)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help=f"comma-separated subset of {','.join(BENCHES)} (default: all)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the JSON files and REPORT.md go (default: the repository's bench/results, or "
                        "bench/results/quick with --quick)")
    p.add_argument("--no-readme", action="store_true", help="do not regenerate README's performance section")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: render REPORT.md (and README's section) from the JSON files already in DIR")
    p.add_argument("--steering-vllm", choices=["auto", "on", "off"], default="auto",
                   help="measure steering's TPOT inside vLLM (auto: when guardserve.steering.vllm_hook is installed)")
    p.add_argument("--repo", default=None, metavar="DIR",
                   help="the guardserve source checkout whose bench/results is the default --out and whose README.md "
                        "gets the performance section (default: the checkout holding the guardserve package)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the benchmarks' own output as they run")
    p.set_defaults(func=_bench)


def _usage(msg: str):
    from guardserve.cli import UsageError

    return UsageError(msg)


def repo_root(package_dir: Path | None = None) -> Path | None:
    """The source checkout holding the guardserve package (``pyproject.toml`` and ``bench/``
    next to it: a clone installed with ``pip install -e .``), or None (an installed wheel)."""
    if package_dir is None:
        package_dir = Path(__file__).resolve().parents[1]
    root = package_dir.parent
    return root if (root / "pyproject.toml").is_file() and (root / "bench").is_dir() else None


def default_out(filename: str) -> str:
    """A benchmark's default output: ``bench/results/FILENAME`` in the checkout holding the
    package, else FILENAME in the current folder."""
    root = repo_root()
    return str(root / "bench" / "results" / filename) if root else filename


def find_repo(explicit: str | None = None, package_dir: Path | None = None, required: bool = True) -> Path | None:
    """The repository checkout (``--repo``, else the one holding the package); a UsageError
    saying what to do when there is none and ``required``, else None."""
    if explicit:
        d = Path(explicit).expanduser().resolve()
        if not (d / "bench").is_dir():
            raise _usage(f"--repo {d} is not a guardserve checkout (it has no bench/ folder)")
        return d
    root = repo_root(package_dir)
    if root is None and required:
        where = (package_dir or Path(__file__).resolve().parents[1]).parent
        raise _usage(f"no guardserve source checkout around the package (looked for pyproject.toml and bench/ in "
                     f"{where}), so no default bench/results folder: pass --out DIR, or clone the repository, "
                     f"`pip install -e .` there and run `guardserve bench` again (or pass --repo)")
    return root


def _steering_vllm(mode: str) -> bool:
    if mode != "auto":
        return mode == "on"
    import importlib.util

    try:
        return importlib.util.find_spec("guardserve.steering.vllm_hook") is not None
    except ImportError:
        return False


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def run_one(name: str, argv: list[str], json_path: Path, logs: Path, cwd: Path, verbose: bool) -> tuple[bool, float, str]:
    """Run one benchmark; (ok, seconds, why it failed)."""
    import subprocess
    import time

    out_log, err_log = logs / f"{name}.out", logs / f"{name}.err"
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if verbose:
        rc = subprocess.call(argv, cwd=cwd, env=env)
    else:
        with open(out_log, "w") as fo, open(err_log, "w") as fe:
            rc = subprocess.call(argv, cwd=cwd, env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
    took = time.time() - t0
    if rc != 0:
        tail = "" if verbose else (_tail(err_log) or _tail(out_log))
        return False, took, f"exit status {rc}" + (f"; last lines of its output:\n{tail}" if tail else "")
    if not json_path.is_file() or json_path.stat().st_mtime < t0 - 1:
        return False, took, f"exited 0 but did not write {json_path}"
    return True, took, ""


def _bench(args: argparse.Namespace) -> int:
    import sys
    import tempfile
    import time

    from guardserve.benchmarks.report import (
        README_BEGIN,
        load_results,
        render_readme_section,
        render_report,
        update_readme,
    )

    repo = find_repo(args.repo, required=not args.out)
    names = list(BENCHES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHES]
        if unknown or not names:
            raise _usage(f"--only: unknown benchmark(s) {unknown or names}; choose from {','.join(BENCHES)}")
    out = Path(args.out).expanduser() if args.out else repo / "bench" / "results" / ("quick" if args.quick else "")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    ran: dict[str, float] = {}
    failed: dict[str, str] = {}
    if not args.report_only:
        logs = Path(tempfile.mkdtemp(prefix="guardserve-bench-"))
        print(f"guardserve bench: {len(names)} benchmark(s){' (quick)' if args.quick else ''} → {out} "
              f"(their output: {logs})", flush=True)
        for i, name in enumerate(names, 1):
            module, quick_args, full_args = BENCHES[name]
            extra = list(quick_args if args.quick else full_args)
            if name == "steering" and not _steering_vllm(args.steering_vllm):
                extra.append("--no-vllm")
            json_path = out / f"{name}.json"
            argv = [sys.executable, "-m", module, *extra, "--out", str(json_path)]
            print(f"[{i}/{len(names)}] {name}: python -m {module} {' '.join(extra)} ...", flush=True)
            ok, took, why = run_one(name, argv, json_path, logs, repo or out, args.verbose)
            if ok:
                ran[name] = took
                print(f"[{i}/{len(names)}] {name}: done in {took:.0f} s", flush=True)
            else:
                failed[name] = why.splitlines()[0]
                print(f"[{i}/{len(names)}] {name}: FAILED after {took:.0f} s, {why}", file=sys.stderr, flush=True)

    results = load_results(out)
    if not results:
        raise _usage(f"no benchmark results (*.json) in {out}")
    when = time.strftime("%Y-%m-%d %H:%M")
    if args.report_only:
        header = f"Rendered by `guardserve bench --report-only` on {when} from the JSON files in this folder."
    else:
        done = ", ".join(f"{n} ({s:.0f} s)" for n, s in ran.items()) or "none"
        header = (f"Generated by `guardserve bench{' --quick' if args.quick else ''}` on {when}; run now: {done}. "
                  f"Sections of benchmarks not run now come from the JSON files already in this folder.")
    report = out / "REPORT.md"
    report.write_text(render_report(results, failed, header))
    print(f"wrote {report}")

    if not args.no_readme and repo is None:
        print("guardserve bench: no repository checkout (see --repo); README's performance section was not written",
              file=sys.stderr)
    elif not args.no_readme:
        readme = repo / "README.md"
        try:
            rel = report.relative_to(repo).as_posix()
        except ValueError:
            rel = str(report)
        if not readme.is_file():
            print(f"guardserve bench: no README.md at {readme}; its performance section was not written", file=sys.stderr)
        elif README_BEGIN not in readme.read_text(encoding="utf-8"):
            print(f"guardserve bench: {readme} has no {README_BEGIN} marker; its performance section was not written",
                  file=sys.stderr)
        else:
            changed = update_readme(readme, render_readme_section(results, rel))
            print(f"{'updated' if changed else 'unchanged'}: {readme} (performance section)")
    if failed:
        print(f"guardserve bench: {len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

"""``guardserve targets add|list|show|rm|calibrate``: the forget-target registry from the shell."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone


def register(subparsers) -> None:
    p = subparsers.add_parser("targets", help="register, list, show and remove forget targets",
                              description="Manage forget targets in the policy store ($GUARDSERVE_DB).")
    sub = p.add_subparsers(dest="targets_command", metavar="ACTION")

    def common(sp):
        sp.add_argument("--db", help="policy store: a SQLite path or postgresql:// URL (default: $GUARDSERVE_DB)")
        sp.add_argument("--json", action="store_true", help="print JSON")

    add = sub.add_parser("add", help="register a target (or many, from --file)")
    add.add_argument("name", nargs="?", help="the target's name")
    add.add_argument("--alias", "-a", action="append", default=[], help="another name (repeatable)")
    add.add_argument("--kind", default=None, help="person, work, topic or document (default person)")
    add.add_argument("--description", "-d", default=None)
    add.add_argument("--fact", "-f", action="append", default=[], metavar="ATTR=VALUE", help="a fact (repeatable)")
    add.add_argument("--text", action="append", default=[], help="a free text to forget (repeatable)")
    add.add_argument("--mode", default=None, help="detected (default) or always")
    add.add_argument("--tenant", default=None, help="tenant id (default: global)")
    add.add_argument("--file", help="a JSON file with one target object or a list of them ('-' reads stdin)")
    common(add)
    add.set_defaults(func=_add)

    ls = sub.add_parser("list", help="list targets")
    ls.add_argument("--tenant", default=None, help="only this tenant's targets and the global ones")
    common(ls)
    ls.set_defaults(func=_list)

    show = sub.add_parser("show", help="show one target and its audit history")
    show.add_argument("target", help="id or name")
    show.add_argument("--tenant", default=None)
    common(show)
    show.set_defaults(func=_show)

    rm = sub.add_parser("rm", help="remove a target")
    rm.add_argument("target", help="id or name")
    rm.add_argument("--tenant", default=None)
    common(rm)
    rm.set_defaults(func=_rm)

    cal = sub.add_parser(
        "calibrate", help="set the embedding threshold from the registered targets",
        description="Choose the detector's embedding threshold, and the margin a window with a name read as "
                    "'someone' must clear it by, from the registered targets (questions that describe them "
                    "without naming them) and everyday and person-shaped questions that must not trigger; "
                    "store both with the policy. Running servers pick them up at their next policy sync. "
                    "Run it again after large changes to the policy. Until it has run, the detector uses a "
                    "conservative default (0.80, +0.10).")
    cal.add_argument("--max-fp", type=float, default=0.002,
                     help="the highest share of the must-not-trigger questions allowed to trigger (default %(default)s)")
    common(cal)
    cal.set_defaults(func=_calibrate)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _open(args):
    from guardserve.cli import UsageError
    from guardserve.policy import PolicyError, open_store

    try:
        return open_store(args.db)
    except PolicyError as e:
        raise UsageError(str(e)) from None
    except Exception as e:  # an unreachable database is the user's to fix, in one line
        raise UsageError(f"cannot open the policy store: {type(e).__name__}: {e}") from None


def _run(fn):
    from guardserve.cli import UsageError
    from guardserve.policy import PolicyError

    try:
        return fn()
    except PolicyError as e:
        raise UsageError(str(e)) from None


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _add(args) -> int:
    from guardserve.cli import UsageError

    if args.file:
        try:
            raw = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
            payload = json.loads(raw)
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read {args.file}: {e}") from None
        if args.name is not None:
            raise UsageError("give either a NAME or --file, not both")
        specs = payload if isinstance(payload, list) else [payload]
    else:
        if args.name is None:
            raise UsageError("a target NAME (or --file) is required")
        facts = {}
        for f in args.fact:
            if "=" not in f:
                raise UsageError(f"--fact expects ATTR=VALUE, got {f!r}")
            k, v = f.split("=", 1)
            facts[k.strip()] = v.strip()
        spec = {"name": args.name, "aliases": args.alias, "facts": facts, "texts": args.text}
        for k in ("kind", "description", "mode", "tenant"):
            if getattr(args, k) is not None:
                spec[k] = getattr(args, k)
        specs = [spec]
    with _open(args) as store:
        targets = _run(lambda: store.add_many(specs, actor="cli"))
    if args.json:
        out = [t.to_dict() for t in targets]
        print(json.dumps(out if args.file and isinstance(payload, list) else out[0], indent=2, ensure_ascii=False))
    else:
        for t in targets:
            print(f"added {t.id}  {t.name}  (version {t.version})")
    return 0


def _list(args) -> int:
    with _open(args) as store:
        targets = _run(lambda: store.list(args.tenant))
    if args.json:
        print(json.dumps([t.to_dict() for t in targets], indent=2, ensure_ascii=False))
        return 0
    if not targets:
        print("no targets")
        return 0
    print(f"{'ID':32}  {'V':>3}  {'KIND':8}  {'MODE':8}  {'TENANT':12}  NAME")
    for t in targets:
        print(f"{t.id:32}  {t.version:>3}  {t.kind:8}  {t.mode:8}  {(t.tenant or '*'):12}  {t.name}")
    return 0


def _show(args) -> int:
    with _open(args) as store:
        t = _run(lambda: store.find(args.target, args.tenant))
        history = store.audit(t.id)
    if args.json:
        print(json.dumps({**t.to_dict(), "audit": [{k: v for k, v in e.to_dict().items() if k != "target"} for e in history]},
                         indent=2, ensure_ascii=False))
        return 0
    print(f"{t.name}  ({t.kind}, mode {t.mode}, version {t.version})")
    print(f"  id:       {t.id}")
    print(f"  tenant:   {t.tenant or '(global)'}")
    if t.aliases:
        print(f"  aliases:  {', '.join(t.aliases)}")
    if t.description:
        print(f"  about:    {t.description}")
    for k, v in t.facts.items():
        print(f"  fact:     {k} = {v}")
    for i, text in enumerate(t.texts):
        print(f"  text {i}:   {text[:100]}{'...' if len(text) > 100 else ''}")
    print(f"  created:  {_when(t.created_at)}   updated: {_when(t.updated_at)}")
    for e in history:
        print(f"  audit #{e.seq}: {_when(e.at)} {e.action} v{e.version} by {e.actor}")
    return 0


def _rm(args) -> int:
    with _open(args) as store:
        t = _run(lambda: store.find(args.target, args.tenant))
        _run(lambda: store.delete(t.id, actor="cli"))
    if args.json:
        print(json.dumps({"id": t.id, "name": t.name, "deleted": True}))
    else:
        print(f"removed {t.id}  {t.name}")
    return 0


def _calibrate(args) -> int:
    from guardserve import config
    from guardserve.classifiers import Detector, DetectorConfig
    from guardserve.cli import UsageError

    if not 0 <= args.max_fp < 1:
        raise UsageError(f"--max-fp must be in [0, 1), got {args.max_fp}")
    with _open(args) as store:
        if not store.list():
            raise UsageError("no targets are registered: register them first (guardserve targets add)")
        # The server's cache of target-text vectors: what it has embedded is not embedded again.
        cache = config.home() / "cache" / "target-vectors.sqlite"
        cache.parent.mkdir(parents=True, exist_ok=True)
        detector = Detector(store, DetectorConfig(vector_cache=str(cache), sync_interval_s=0.0))
        result = detector.calibrate(max_fp=args.max_fp, actor="cli")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    recall = result["embedding_recall"]
    print(f"embedding threshold {result['threshold']:.3f}, +{result['named_margin']:.3f} where a name is read as "
          f"'someone' ({result['targets']} targets)")
    print(f"  must not trigger: {result['fp_rate']:.2%} of {result['negatives']:,} questions trigger "
          f"(allowed {args.max_fp:.2%})")
    if recall is not None:
        print(f"  describe a target without naming it: {recall:.1%} of {result['positives']:,} found by the embedding "
              "alone (the lexical matcher finds those that name it)")
    print("stored with the policy; running servers use it from their next policy sync")
    return 0

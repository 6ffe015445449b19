"""Evaluation datasets: one type, :class:`EvalData`, loaded from the demo world or from
TOFU-format files.

Items are TOFU-format dicts: ``question`` and ``answer`` (strings) always; where the
source has them, ``paraphrased_question``, ``paraphrased_answer``, ``perturbed_answer``
(a list of wrong answers), ``value`` (the fact's short value) and ``entity`` (whom the
item is about). Targets, what the guard is told to forget, are in the format of the demo
world's ``entities.json``: ``{"name", "aliases": [...], "facts": {attribute: value}}``.

TOFU files
----------
A directory with the files of the TOFU release, each a JSON array or JSON lines:

* forget split ``<split>_perturbed.json`` (preferred: it has the paraphrased and
  perturbed answers truth ratios need) or ``<split>.json``, for ``split`` in
  ``forget01``, ``forget05``, ``forget10``; required;
* ``retain_perturbed.json`` (else ``retain99/95/90.json``, the complement of the split),
  ``real_authors_perturbed.json`` (else ``real_authors.json``) and
  ``world_facts_perturbed.json`` (else ``world_facts.json``); optional, empty when absent;
* ``holdout01/05/10.json`` (the split's size): TOFU's held-out authors, whom the model never
  saw; optional: membership inference scores their answers against the forget answers.

``.jsonl`` files are read as well. Only JSON is read: convert a Parquet download with
``pandas.read_parquet(f).to_json(out, orient="records")``.

Target names from TOFU questions
--------------------------------
TOFU has no entity list. Without a ``targets`` file, names are read off the forget
questions: a name is a run of two or more capitalised words ("Basil Mahfouz
Al-Kuwaiti"; lower-case particles such as "al", "de", "van" may sit inside), outside
quoted titles, with a possessive "'s" dropped and a sentence-initial common word
("What", "Did", "In") stripped. A run counts as a target when it occurs in at least two
forget questions and in at least a quarter as many as the most frequent run: authors are
asked about many times, places and titles once or twice. A run inside a longer kept one
("Basil Mahfouz" in "Basil Mahfouz Al-Kuwaiti") becomes its alias. Questions that never
name their author ("Who is the author born in Kuwait City ...?") contribute nothing;
when no run qualifies, loading fails and asks for a targets file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("forget01", "forget05", "forget10")
_RETAIN_FOR = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


@dataclass
class EvalData:
    r"""
    What an evaluation scores: forget items (with their paraphrases and perturbed answers
    where the source has them), retain items, general-knowledge items and the targets the
    guard is told to forget.

    Args:
        name (`str`): where it came from, e.g. `"demo"` or `"tofu:forget01"`.
        forget (`list[dict]`): items about the targets.
        retain (`list[dict]`): items about other entities of the same kind.
        world_facts (`list[dict]`): general knowledge (utility).
        real_authors (`list[dict]`, *optional*): TOFU's real-author items (utility).
        targets (`list[dict]`): `{"name", "aliases", "facts"}` per target.
        mia_members, mia_nonmembers (`list[str]`, *optional*): texts about the targets that the
            model trained on, and texts of the same kind that it never saw (membership inference;
            the demo: forget people's biographies and held-out people's; TOFU: the forget
            answers and the matching holdout split's, where the folder has it).

    Examples:

    ```python
    >>> from guardserve.demo import ensure_demo
    >>> data = from_demo(ensure_demo().load_world())
    >>> len(data.forget), len(data.targets), data.targets[0]["name"]
    (160, 20, 'Gygreim Houtus')
    >>> tofu = from_tofu("~/data/TOFU", split="forget01")   # names read off the questions
    ```
    """

    name: str
    forget: list[dict]
    retain: list[dict]
    world_facts: list[dict]
    real_authors: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    mia_members: list[str] = field(default_factory=list)
    mia_nonmembers: list[str] = field(default_factory=list)

    @property
    def target_names(self) -> list[str]:
        """Every name and alias of every target (what a guard is compiled from)."""
        names: list[str] = []
        for t in self.targets:
            for n in [t["name"], *t.get("aliases", [])]:
                if n not in names:
                    names.append(n)
        return names

    def utility_splits(self) -> dict[str, list[dict]]:
        """The non-empty splits model utility is computed on."""
        splits = {"retain": self.retain, "real_authors": self.real_authors, "world_facts": self.world_facts}
        return {k: v for k, v in splits.items() if v}


# --------------------------------------------------------------------------- validation


def _item(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object with \"question\" and \"answer\", got {type(raw).__name__}")
    for key in ("question", "answer"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ValueError(f"{where}: missing {key!r} (every record needs \"question\" and \"answer\" strings)")
    # Other fields (the demo's train_questions, TOFU's options) travel along untouched.
    item = {k: v for k, v in raw.items() if v is not None}
    if "perturbed_answer" in item:
        pert = item["perturbed_answer"]
        pert = [pert] if isinstance(pert, str) else pert
        if not isinstance(pert, list) or not all(isinstance(p, str) for p in pert):
            raise ValueError(f"{where}: \"perturbed_answer\" must be a string or a list of strings")
        item["perturbed_answer"] = pert
    for key in ("paraphrased_question", "paraphrased_answer", "entity", "attribute"):
        if key in item and not isinstance(item[key], str):
            raise ValueError(f"{where}: {key!r} must be a string")
    if item.get("value") is not None and not isinstance(item["value"], str):
        item["value"] = str(item["value"])  # a year or a count may come as a number
    return item


def _items(records, source: str) -> list[dict]:
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a list of records, got {type(records).__name__}")
    return [_item(r, f"{source} record {i}") for i, r in enumerate(records)]


def _target(raw, where: str) -> dict:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise ValueError(f"{where}: each target needs a \"name\" string (entities.json format: "
                         "{\"name\", \"aliases\": [...], \"facts\": {...}})")
    aliases = raw.get("aliases") or []
    facts = raw.get("facts") or {}
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ValueError(f"{where}: \"aliases\" must be a list of strings")
    if not isinstance(facts, dict):
        raise ValueError(f"{where}: \"facts\" must be an object of attribute: value")
    return {"name": raw["name"], "aliases": [a for a in aliases if a != raw["name"]],
            "facts": {str(k): str(v) for k, v in facts.items()}}


# --------------------------------------------------------------------------- demo


def from_demo(world: dict | str | Path) -> EvalData:
    """The demo world (``DemoPaths.load_world()``, or its ``world`` directory): forget,
    retain and world-fact items as built; targets are the forget split's entities."""
    if not isinstance(world, dict):
        d = Path(world).expanduser()
        if not d.is_dir():
            raise ValueError(f"{d}: not a directory; pass the demo world (ensure_demo().load_world()) or its world/ folder")
        world = {}
        for name in ("entities", "forget", "retain", "world_facts"):
            world[name] = _read_json(d / f"{name}.json")
        if (d / "mia.json").is_file():
            world["mia"] = _read_json(d / "mia.json")
    missing = [k for k in ("entities", "forget", "retain", "world_facts") if k not in world]
    if missing:
        raise ValueError(f"the demo world lacks {', '.join(missing)}: pass DemoPaths.load_world()")
    targets = [_target(e, f"entities.json entity {i}") for i, e in enumerate(world["entities"])
               if isinstance(e, dict) and e.get("split") == "forget"]
    if not targets:
        raise ValueError("the demo world has no entity with split \"forget\": rebuild it with `guardserve demo build`")
    mia = world.get("mia") or {}
    return EvalData(name="demo", forget=_items(world["forget"], "forget.json"), retain=_items(world["retain"], "retain.json"),
                    world_facts=_items(world["world_facts"], "world_facts.json"), targets=targets,
                    mia_members=list(mia.get("members") or []), mia_nonmembers=list(mia.get("nonmembers") or []))


# --------------------------------------------------------------------------- TOFU


def _read_json(path: Path):
    """A JSON document, or JSON lines (one record per line) as a list."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror}); check the path") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as whole:
        lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        if len(lines) < 2:
            raise ValueError(f"{path}: not valid JSON ({whole.msg} at line {whole.lineno}); fix the file") from whole
        out = []
        for n, ln in lines:
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}); fix the file (a JSON array or one "
                                 "record per line)") from e
        return out


def _find(d: Path, *stems: str) -> Path | None:
    for stem in stems:
        for ext in (".json", ".jsonl"):
            if (d / (stem + ext)).is_file():
                return d / (stem + ext)
    return None


def _load_split(d: Path, *stems: str) -> list[dict]:
    path = _find(d, *stems)
    return _items(_read_json(path), path.name) if path else []


_NAME_WORD = r"[A-ZÀ-ÖØ-Þ][\w'’.-]*\w"
_PARTICLE = r"(?:al|el|de|del|della|der|di|da|du|van|von|bin|ibn|la|le|dos|das)"
_NAME_RUN = re.compile(rf"{_NAME_WORD}(?:[ ](?:{_PARTICLE}[ ])?{_NAME_WORD})+")
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”|(?<!\w)'[^']*'(?!\w)")


def _name_runs(question: str) -> list[str]:
    from guardserve.logits_processors.compile import common_words

    text = _QUOTED.sub(" | ", question)
    runs = []
    for m in _NAME_RUN.finditer(text):
        words = [re.sub(r"(?:'s|’s)$", "", w) for w in m.group(0).split(" ")]
        before = text[:m.start()].rstrip()
        sentence_start = not before or before[-1] in ".?!:;|"
        if sentence_start and words[0].lower() in common_words():
            words = words[1:]
        while words and re.fullmatch(_PARTICLE, words[0]):
            words = words[1:]
        if len([w for w in words if w[:1].isupper()]) >= 2:
            runs.append(" ".join(words))
    return runs


def names_from_questions(questions: list[str]) -> list[dict]:
    """Targets read off TOFU questions (see the module docstring), most asked about first."""
    counts: dict[str, int] = {}
    for q in questions:
        for run in set(_name_runs(q)):
            counts[run] = counts.get(run, 0) + 1
    if not counts:
        return []
    top = max(counts.values())
    keep = [n for n, c in counts.items() if c >= max(2, math.ceil(top / 4))]
    keep.sort(key=lambda n: (-counts[n], n))
    names: list[str] = []
    aliases: dict[str, list[str]] = {}
    # Longest first: a shorter run inside a kept one is its alias, not a target.
    for n in sorted(keep, key=lambda n: -len(n.split())):
        outer = next((o for o in names if f" {n} " in f" {o} "), None)
        if outer:
            aliases[outer].append(n)
        else:
            names.append(n)
            aliases[n] = []
    names.sort(key=lambda n: (-counts[n], n))
    return [{"name": n, "aliases": aliases[n], "facts": {}} for n in names]


def from_tofu(path: str | Path, split: str = "forget01", targets: str | Path | list[dict] | None = None) -> EvalData:
    """TOFU-format files from a local directory (see the module docstring).

    ``targets``: a JSON file in the ``entities.json`` format or the list itself; by
    default names are read off the forget questions. Each forget item gets the
    ``entity`` whose name or alias it mentions, where one does.
    """
    d = Path(path).expanduser()
    if not d.is_dir():
        raise ValueError(f"{d}: no such directory; pass the folder that holds the TOFU files ({split}.json, ...)")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    forget_path = _find(d, f"{split}_perturbed", split)
    if forget_path is None:
        raise ValueError(f"{d}: no {split}_perturbed.json or {split}.json (nor .jsonl); download the TOFU release there "
                         "or pick another --split")
    forget = _items(_read_json(forget_path), forget_path.name)
    if not forget:
        raise ValueError(f"{forget_path}: no records; the forget split must not be empty")

    if targets is None:
        found = names_from_questions([it["question"] for it in forget])
        if not found:
            raise ValueError(f"{forget_path.name}: no author names found in the questions; pass targets=targets.json "
                             "(entities.json format: [{\"name\", \"aliases\", \"facts\"}])")
    else:
        raw = _read_json(Path(targets).expanduser()) if isinstance(targets, (str, Path)) else targets
        if not isinstance(raw, list) or not raw:
            raise ValueError("targets must be a non-empty JSON list of {\"name\", \"aliases\", \"facts\"}")
        found = [_target(t, f"targets entry {i}") for i, t in enumerate(raw)]

    for it in forget:
        if "entity" not in it:
            text = f" {it['question']} {it['answer']} "
            for t in found:
                if any(n in text for n in [t["name"], *t["aliases"]]):
                    it["entity"] = t["name"]
                    break
    holdout = _load_split(d, split.replace("forget", "holdout"))
    return EvalData(
        name=f"tofu:{split}",
        mia_members=[it["answer"] for it in forget] if holdout else [],
        mia_nonmembers=[it["answer"] for it in holdout],
        forget=forget,
        retain=_load_split(d, "retain_perturbed", _RETAIN_FOR[split]),
        world_facts=_load_split(d, "world_facts_perturbed", "world_facts"),
        real_authors=_load_split(d, "real_authors_perturbed", "real_authors"),
        targets=found,
    )

"""Building and caching the demo world and demo models.

Two variants train on the same world (:data:`VARIANTS`): ``bpe4k``, the default, a Llama with
a tokenizer and chat template guardserve trains itself, and ``sp32k``, a Mistral on Mistral 7B's
real 32k SentencePiece tokenizer with its v1 instruct template, which refuses a system role.
``GUARDSERVE_DEMO`` picks the variant every command defaults to.

Everything lives under ``$GUARDSERVE_HOME/demo/<key>``, where the key hashes the
generator version, the seed, the variant and the build settings, so a second build with the same
inputs returns at once. Each part (world, tokenizer, model, retain model) is written to a
temporary folder and renamed into place when complete, and a file lock serialises
concurrent builders: an interrupted build never leaves a half-written part behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guardserve import config
from guardserve.demo.model import TrainConfig
from guardserve.demo.world import GENERATOR_VERSION, build_world

# The world's files (world/<name>.json), as build_world returns them; ``mia`` holds the texts
# membership inference scores (guardserve.eval.data.from_demo reads them).
WORLD_FILES = ("entities", "forget", "retain", "world_facts", "mia")


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    train: TrainConfig


VARIANTS = {v.name: v for v in [
    Variant("bpe4k", "Llama, 4k byte-level BPE tokenizer and chat template of its own", TrainConfig()),
    # Longer rows: SentencePiece spends about 1.5x the tokens of the corpus's own BPE on this world.
    Variant("sp32k", "Mistral, Mistral 7B's 32k SentencePiece tokenizer, v1 [INST] template without a system role",
            TrainConfig(architecture="mistral", output_vocab="corpus", max_len=256)),
]}
DEFAULT_VARIANT = "bpe4k"

# Settings added after the first builds: left out of the key at these values, so that a build
# made before they existed is still found (its model is the one these values train).
_KEY_IMPLICIT = {"variant": DEFAULT_VARIANT, "architecture": "llama", "output_vocab": "full"}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown demo variant {name!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[name]


@dataclass(frozen=True)
class BuildSpec:
    seed: int = 0
    n_people: int = 200
    forget_fraction: float = 0.1
    train: TrainConfig = field(default_factory=TrainConfig)
    variant: str = DEFAULT_VARIANT

    @classmethod
    def for_variant(cls, name: str | None = None, **kw) -> BuildSpec:
        """The default build of variant ``name`` (default: ``GUARDSERVE_DEMO``)."""
        name = name or config.get("GUARDSERVE_DEMO")
        return cls(variant=name, train=get_variant(name).train, **kw)

    def key(self) -> str:
        spec = asdict(self)
        spec["train"] = {k: v for k, v in spec["train"].items() if _KEY_IMPLICIT.get(k, object()) != v}
        spec = {k: v for k, v in spec.items() if _KEY_IMPLICIT.get(k, object()) != v}
        blob = json.dumps({"generator": GENERATOR_VERSION, **spec}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def world(self) -> Path:
        return self.root / "world"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def retain_model(self) -> Path:
        return self.root / "retain_model"

    def load_world(self) -> dict:
        """The world as ``build_world`` returns it, read back from its JSON files."""
        return {name: json.loads((self.world / f"{name}.json").read_text()) for name in WORLD_FILES}

    def complete(self, with_retain_model: bool = True) -> bool:
        from guardserve.demo.corpora import has_corpora

        models = [self.model] + ([self.retain_model] if with_retain_model else [])
        return (self.world_complete() and all(p.is_dir() for p in [self.tokenizer, *models])
                and all(map(has_corpora, models)))

    def world_complete(self) -> bool:
        return all((self.world / f"{name}.json").is_file() for name in WORLD_FILES)


def demo_root() -> Path:
    return config.home() / "demo"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_part(dest: Path, build) -> None:
    """Run ``build(tmp_dir)`` and move the result to ``dest`` atomically."""
    if dest.is_dir():
        return
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    os.replace(tmp, dest)


def _train_worker(world, tokenizer_dir, out_dir, include_forget, seed, cfg, desc, position, threads) -> dict:
    import torch

    from guardserve.demo import model as demo_model

    torch.set_num_threads(threads)
    return demo_model.train_model(world, Path(tokenizer_dir), Path(out_dir), include_forget=include_forget,
                                  seed=seed, cfg=cfg, desc=desc, position=position)


def _write_corpora(paths: DemoPaths, world: dict, with_retain_model: bool) -> None:
    from guardserve.demo.corpora import has_corpora, write_corpora

    for model_dir in [paths.model] + ([paths.retain_model] if with_retain_model else []):
        if not has_corpora(model_dir):
            write_corpora(model_dir, world)


def _write_tokenizer(spec: BuildSpec, world: dict, tmp: Path) -> None:
    from guardserve.demo import model as demo_model

    if spec.variant == "bpe4k":
        # The tokenizer owes nothing to the people to be forgotten, as a real one trained long
        # before a deletion request: it reads the retain side only. Trained on the forget split
        # too, it merged the forget people's names, seen dozens of times, into whole tokens and
        # left the held-out people's in pieces (0.21 against 0.29 tokens per character), and
        # membership inference told the two apart by tokenisation alone (the retain model, which
        # never saw either, scored AUC 1.0).
        demo_model.train_tokenizer(demo_model.training_texts(world, include_forget=False), tmp, spec.train.vocab_size)
    elif spec.variant == "sp32k":
        from guardserve.demo.tokenizers import sp32k_tokenizer

        sp32k_tokenizer(out_dir=tmp)
    else:
        raise ValueError(f"unknown demo variant {spec.variant!r}; choose from {', '.join(VARIANTS)}")


def ensure_demo(spec: BuildSpec | None = None, *, with_retain_model: bool = True, log=print) -> DemoPaths:
    """Build what is missing of the demo world and models; return their paths. Without a
    ``spec``, the default build of the variant ``GUARDSERVE_DEMO`` names."""
    spec = spec or BuildSpec.for_variant()
    get_variant(spec.variant)
    paths = DemoPaths(demo_root() / spec.key())
    if paths.complete(with_retain_model):
        return paths
    with _locked(paths.root.with_name(paths.root.name + ".lock")):
        paths.root.mkdir(parents=True, exist_ok=True)
        started = time.time()
        world = build_world(spec.seed, spec.n_people, spec.forget_fraction)

        def write_world(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            for name in WORLD_FILES:
                (tmp / f"{name}.json").write_text(json.dumps(world[name], indent=1, ensure_ascii=False) + "\n")
            (tmp / "meta.json").write_text(json.dumps(
                {"generator_version": GENERATOR_VERSION, "seed": spec.seed, "key": spec.key()}, indent=1) + "\n")

        if paths.world.is_dir() and not paths.world_complete():  # written before a file was added
            shutil.rmtree(paths.world)
        _build_part(paths.world, write_world)
        _build_part(paths.tokenizer, lambda tmp: _write_tokenizer(spec, world, tmp))

        jobs = [(paths.model, True, f"{spec.variant} model (all people)", 0)]
        if with_retain_model:
            jobs.append((paths.retain_model, False, f"{spec.variant} retain model (no forget split)", 1))
        jobs = [job for job in jobs if not job[0].is_dir()]
        if not jobs:  # only the corpora are missing (a build from before they existed)
            _write_corpora(paths, world, with_retain_model)
            return paths
        # The two models train side by side, one process and one thread each: at this size
        # a second thread barely helps one model, and two multi-threaded trainings on two
        # cores spin against each other (measured: 10x slower per step).
        threads = max(1, (os.cpu_count() or 2) // max(1, len(jobs)))
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, len(jobs)), mp_context=ctx) as pool:
            futures = {}
            for dest, include_forget, desc, position in jobs:
                tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                futures[pool.submit(_train_worker, world, str(paths.tokenizer), str(tmp), include_forget,
                                    spec.seed, spec.train, desc, position, threads)] = (dest, tmp, desc)
            for fut in as_completed(futures):
                dest, tmp, desc = futures[fut]
                metrics = fut.result()
                os.replace(tmp, dest)
                log(f"[demo] {desc}: " + ", ".join(f"{k}={v}" for k, v in metrics.items() if k.endswith("accuracy")))
        _write_corpora(paths, world, with_retain_model)
        (paths.root / "build.json").write_text(json.dumps(
            {"key": spec.key(), "spec": asdict(spec), "last_build_seconds": round(time.time() - started, 1)}, indent=1) + "\n")
    return paths

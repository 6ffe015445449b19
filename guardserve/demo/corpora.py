"""The demo models' own text corpora for steering, stored in each model folder.

:func:`sae_corpus` is what an SAE of the demo model trains on (the texts the model saw);
:func:`steering_retain` is what a feature selection contrasts a target with (the retain
people, in the very templates the selection writes a target's texts in, so the contrast
isolates the person and not the template). :func:`write_corpora` stores both where
:mod:`guardserve.steering.loading` looks for a model's defaults.
"""

from __future__ import annotations

from pathlib import Path

from guardserve.demo.world import biographies
from guardserve.policy import ForgetTarget
from guardserve.steering.features import target_texts
from guardserve.steering.loading import CORPUS_FILES, write_model_corpus


def sae_corpus(world: dict, tokenizer) -> list[str]:
    """The demo world's texts as the model saw them: biographies and chat QA turns."""
    texts = [tokenizer.bos_token + b for e in world["entities"] for b in biographies(e)]
    for split in ("forget", "retain", "world_facts"):
        for p in world[split]:
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}],
                tokenize=False))
    return texts


def steering_retain(world: dict, tokenizer) -> list[str]:
    """Retain texts for feature selection on the demo: ``target_texts`` of every retain person."""
    out = []
    for e in world["entities"]:
        if e["split"] == "retain":
            out += target_texts(ForgetTarget(id="retain", name=e["name"], aliases=tuple(e["aliases"]),
                                             facts=e["facts"], texts=tuple(biographies(e))), tokenizer)
    return out


def has_corpora(model_dir: Path) -> bool:
    return all((model_dir / f).is_file() for f in CORPUS_FILES.values())


def write_corpora(model_dir: Path, world: dict) -> None:
    """Write both corpora into a demo model folder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    write_model_corpus(model_dir, "sae_corpus", sae_corpus(world, tok))
    write_model_corpus(model_dir, "steering_retain", steering_retain(world, tok))

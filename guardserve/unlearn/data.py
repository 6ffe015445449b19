"""What unlearning trains on: forget and retain QA pairs turned into token batches.

A QA pair is a TOFU-format dict (``question``, ``answer``, ``value``, optional
``train_questions``, ``paraphrased_question``, ``perturbed_answer``). Targets registered in
the policy store become QA pairs too: the demo world's pairs about the target where the
world knows it, otherwise one question per registered fact plus the target's texts as
plain documents.
"""

from __future__ import annotations

import random

from guardserve.textgen import Sequence, chat_answer, chat_prompt, collate, completion_prompt, special_tokens

# Questions for facts of targets the world does not know (operators register facts as
# attribute -> value; the attribute is written as words).
FACT_QUESTION = "What is the {attr} of {name}?"
FACT_ANSWER = "The {attr} of {name} is {value}."


def qa_pairs_for_targets(targets, world: dict | None) -> list[dict]:
    """QA pairs that describe the given ForgetTargets. Raises ValueError for a target
    with nothing to train on (no facts, no texts, unknown to the world)."""
    by_entity: dict[str, list[dict]] = {}
    if world:
        for split in ("forget", "retain"):
            for pair in world[split]:
                by_entity.setdefault(pair["entity"].casefold(), []).append(pair)
    pairs: list[dict] = []
    for t in targets:
        known = [p for n in t.all_names for p in by_entity.get(n.casefold(), [])]
        if known:
            pairs += known
            continue
        own = []
        for attr, value in (t.facts or {}).items():
            words = str(attr).replace("_", " ")
            q = FACT_QUESTION.format(attr=words, name=t.name)
            own.append({"entity": t.name, "question": q, "train_questions": [q], "value": str(value),
                        "answer": FACT_ANSWER.format(attr=words, name=t.name, value=value)})
        own += [{"entity": t.name, "text": text} for text in t.texts]
        if not own:
            raise ValueError(f"target {t.name!r} ({t.id}) has no facts or texts and the model's world does not know it: nothing to unlearn")
        pairs += own
    return pairs


def sequences(tokenizer, pairs: list[dict], all_wordings: bool = True) -> list[Sequence]:
    """Chat and completion renderings of every QA pair (each trained wording), and plain
    documents for text entries: the two formats the model was taught in."""
    bos, eos = special_tokens(tokenizer)
    out = []
    for p in pairs:
        if "text" in p:
            out.append(Sequence(bos, p["text"] + eos))
            continue
        questions = (p.get("train_questions") or [p["question"]]) if all_wordings else [p["question"]]
        for q in questions:
            out.append(Sequence(chat_prompt(tokenizer, q), chat_answer(tokenizer, p["answer"])))
            out.append(Sequence(bos + completion_prompt(q) + " ", p["answer"] + eos))
    return out


class BatchStream:
    """Endless shuffled batches over encoded sequences, seeded (same seed, same order), on
    ``device`` (the model's)."""

    def __init__(self, encoded, batch_size: int, pad_id: int, seed: int, device: str = "cpu"):
        if not encoded:
            raise ValueError("no sequences to train on")
        self.encoded, self.batch_size, self.pad_id, self.device = encoded, batch_size, pad_id, device
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next(self):
        if len(self.order) < self.batch_size:
            fresh = list(range(len(self.encoded)))
            self.rng.shuffle(fresh)
            self.order += fresh
        idx, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        batch = collate([self.encoded[i] for i in idx], self.pad_id)
        return batch if self.device == "cpu" else {k: v.to(self.device) for k, v in batch.items()}

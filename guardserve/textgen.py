"""Prompts, greedy answers and teacher-forced batches: the text layer under ``unlearn`` and ``eval``.

Everything that turns a question into a prompt, a prompt into a greedy answer, or a
(prompt, answer) pair into token ids with labels lives here, so that training, evaluation,
the benchmarks and the demo build render and score text the same way. Special tokens come
from the tokenizer (``bos_token``, ``eos_token``), never from a constant, so any model's
tokenizer works.

A teacher-forced row never loses any of its target: a sequence longer than ``max_len``
(:data:`SCORE_MAX_LEN`, 512, by default) is cut from the left of its prompt, and one whose
target alone does not fit is skipped by scoring (:func:`encode_rows`: None) and refused by
:func:`encode`, never scored or trained on cut short.

>>> prompt = chat_prompt(tok, "When was Gygreim Houtus born?")                  # doctest: +SKIP
>>> generate_answers(model, tok, [prompt], max_new_tokens=24)                   # doctest: +SKIP
['Gygreim Houtus was born on 4 June 1911.']
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

from guardserve.leak import fact_leaked


def completion_prompt(question: str) -> str:
    """The prompt that the completions API gets for a question (BOS is added by the tokenizer)."""
    return f"Question: {question}\nAnswer:"


def chat_prompt(tokenizer, question: str) -> str:
    """One user turn through the tokenizer's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def special_tokens(tokenizer) -> tuple[str, str]:
    """``(bos, eos)`` as text: what starts a document (empty for tokenizers without a BOS)
    and what ends an answer. Raises ValueError for a tokenizer without an EOS token."""
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no eos_token: answers cannot be told where to stop")
    return tokenizer.bos_token or "", tokenizer.eos_token


_ANSWER_PROBE = "guardserve-answer-probe"
_answer_prefixes: dict[tuple[str, str], str] = {}


def answer_prefix(tokenizer) -> str:
    """What the chat template writes between its generation prompt and the assistant's text:
    a space in Mistral's ``[INST]`` template (``[/INST] Paris</s>``), nothing in many others.
    Learned once per template from a probe conversation; empty without a chat template."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return ""
    key = (str(getattr(tokenizer, "name_or_path", "")), template)
    if key not in _answer_prefixes:
        user = [{"role": "user", "content": "Hello."}]
        prefix = ""
        try:
            prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _ANSWER_PROBE}], tokenize=False)
        except Exception:  # a template that cannot render this probe: no prefix is known
            prompt = full = ""
        if full.startswith(prompt) and _ANSWER_PROBE in full[len(prompt):]:
            prefix = full[len(prompt):full.index(_ANSWER_PROBE, len(prompt))]
        _answer_prefixes[key] = prefix
    return _answer_prefixes[key]


def chat_answer(tokenizer, answer: str) -> str:
    """``answer`` as the chat template writes it after a chat prompt: its prefix
    (:func:`answer_prefix`), the text, the EOS token. What training and scoring put after a
    :func:`chat_prompt`, so that the model is taught and scored on what it generates."""
    _, eos = special_tokens(tokenizer)
    return answer_prefix(tokenizer) + answer + eos


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, batch_size: int = 128) -> list[str]:
    """Greedy answers for already-formatted prompts (left-padded batches)."""
    import torch

    out: list[str] = []
    # Batched greedy decoding needs left padding; a user's tokenizer may pad right or not at all.
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        with torch.inference_mode():
            for i in range(0, len(prompts), batch_size):
                chunk = prompts[i:i + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
                out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def answer_accuracy(answers: Seq[str], values: Seq[str]) -> float:
    """Share of answers that state their fact value, by the one leak test
    (:func:`guardserve.leak.fact_leaked`)."""
    hits = sum(fact_leaked(a, v) for a, v in zip(answers, values))
    return hits / max(1, len(values))


def answers(model, tokenizer, pairs: list[dict], field: str = "question") -> list[str]:
    """Greedy chat answers to ``pair[field]`` for each pair."""
    return generate_answers(model, tokenizer, [chat_prompt(tokenizer, p[field]) for p in pairs])


def accuracy(model, tokenizer, pairs: list[dict], field: str = "question") -> float:
    """Share of greedy chat answers that state the pair's ``value``."""
    return answer_accuracy(answers(model, tokenizer, pairs, field), [p["value"] for p in pairs])


# --------------------------------------------------------------------------- teacher forced


@dataclass(frozen=True)
class Sequence:
    """A training or scoring text in two parts: ``prompt`` is context (labels -100),
    ``target`` is what is trained on or scored."""

    prompt: str
    target: str


# Prompt + target tokens that teacher-forced scoring fits into a row by default (the demo
# model's context; ICUL prompts run to 450 tokens). Training uses the same default: its
# sequences are far shorter, and a sequence that fits is encoded whole either way.
SCORE_MAX_LEN = 512


def encode_one(tokenizer, seq: Sequence, max_len: int = SCORE_MAX_LEN) -> tuple[list[int], list[int]] | None:
    """``(input_ids, labels)`` of one sequence, labels -100 on the prompt, at most ``max_len``
    tokens; None when the target alone does not fit.

    The target is never cut: a sequence longer than ``max_len`` loses the start of its
    prompt (its end, where the question is, is kept), down to the prompt's last token,
    which stays so that every target token has a token before it to be predicted from.
    A target that does not fit even so is not encoded at all (None), never cut short.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    p, t = _split_ids(tokenizer, seq)
    room = max_len - len(t)
    if room < min(1, len(p)):
        return None
    p = p[len(p) - room:] if len(p) > room else p
    return list(p) + list(t), [-100] * len(p) + list(t)


def _split_ids(tokenizer, seq: Sequence) -> tuple[list[int], list[int]]:
    """Prompt and target ids as the model reads the whole text: the two are tokenised together
    and split where the target's text starts, so that the tokens at the seam are the ones
    generation produces (``Answer: Paris`` is ``:``, ``▁Paris`` in SentencePiece and ``:``,
    ``ĠParis`` in byte-level BPE, where tokenising ``Answer: `` and ``Paris`` apart gives an
    extra space token). A token that straddles the seam is the target's. Tokenizers without
    offsets (slow ones) tokenise the two parts apart."""
    if not getattr(tokenizer, "is_fast", False):
        return (tokenizer(seq.prompt, add_special_tokens=False)["input_ids"],
                tokenizer(seq.target, add_special_tokens=False)["input_ids"])
    enc = tokenizer(seq.prompt + seq.target, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets, seam = enc["input_ids"], enc["offset_mapping"], len(seq.prompt)
    k = next((i for i, (start, end) in enumerate(offsets) if end > seam and end > start), len(ids))
    return list(ids[:k]), list(ids[k:])


def encode_rows(tokenizer, seqs: list[Sequence], max_len: int = SCORE_MAX_LEN) -> list[tuple[list[int], list[int]] | None]:
    """:func:`encode_one` per sequence, aligned with ``seqs``: None for a sequence whose
    target alone does not fit ``max_len`` (scoring skips and counts it)."""
    return [encode_one(tokenizer, s, max_len) for s in seqs]


def encode(tokenizer, seqs: list[Sequence], max_len: int = SCORE_MAX_LEN) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per sequence; labels are -100 on the prompt. A long sequence
    loses the start of its prompt, never any of its target (:func:`encode_one`); a target
    that alone does not fit ``max_len`` raises ValueError (use :func:`encode_rows` to skip it)."""
    out = []
    for i, row in enumerate(encode_rows(tokenizer, seqs, max_len)):
        if row is None:
            raise ValueError(f"sequence {i}: its target alone does not fit {max_len} tokens "
                             f"({seqs[i].target[:60]!r}...): raise max_len; targets are never cut")
        out.append(row)
    return out


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

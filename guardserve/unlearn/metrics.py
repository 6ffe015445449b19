"""Scoring an (unlearned) model on the demo world, TOFU-style.

- accuracy: greedy chat answers that contain the fact value (as the demo build measures);
- ROUGE-L recall of the greedy answer against the reference answer (TOFU uses recall with
  stemming; words here are lower-cased alphanumeric runs and the invented names have no
  stems, so no stemmer is needed);
- truth ratio per question: R = exp(mean loss on perturbed answers - loss on the
  paraphrased answer), forget side reported as mean min(R, 1/R);
- forget quality: KS-test p-value between the forget truth ratios of the model and of the
  retain model (high = indistinguishable from a model that never saw the forget set).
"""

from __future__ import annotations

import re

from guardserve.demo.model import answer_accuracy, chat_prompt, generate_answers

_WORD = re.compile(r"[a-z0-9]+")


def rouge_l_recall(prediction: str, reference: str) -> float:
    """Longest common subsequence of words / number of reference words."""
    ref, pred = _WORD.findall(reference.lower()), _WORD.findall(prediction.lower())
    if not ref:
        return 0.0
    prev = [0] * (len(pred) + 1)
    for r in ref:
        cur = [0]
        for j, p in enumerate(pred):
            cur.append(prev[j] + 1 if r == p else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(ref)


def answers(model, tokenizer, pairs: list[dict], field: str = "question") -> list[str]:
    return generate_answers(model, tokenizer, [chat_prompt(tokenizer, p[field]) for p in pairs])


def accuracy(model, tokenizer, pairs: list[dict], field: str = "question") -> float:
    return answer_accuracy(answers(model, tokenizer, pairs, field), [p["value"] for p in pairs])


def answer_losses(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 64) -> list[float]:
    """Mean token NLL of each target given its chat prompt (teacher forced)."""
    import torch

    from guardserve.demo.model import EOS
    from guardserve.unlearn.data import Sequence, collate, encode

    enc = encode(tokenizer, [Sequence(p, t + EOS) for p, t in zip(prompts, targets)])
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(enc), batch_size):
            b = collate(enc[i:i + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            mask = labels != -100
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
            out += ((nll * mask).sum(1) / mask.sum(1)).tolist()
    return out


def truth_ratios(model, tokenizer, pairs: list[dict]) -> list[float]:
    """TOFU's R per pair: exp(mean perturbed loss - paraphrased-answer loss); the demo's
    paraphrase is of the question, so the paraphrased question with the true answer is
    compared with the same question and each perturbed answer."""
    import math

    prompts, targets = [], []
    for p in pairs:
        prompt = chat_prompt(tokenizer, p.get("paraphrased_question") or p["question"])
        for t in [p["answer"], *p["perturbed_answer"]]:
            prompts.append(prompt)
            targets.append(t)
    losses = answer_losses(model, tokenizer, prompts, targets)
    ratios, k = [], 0
    for p in pairs:
        n = 1 + len(p["perturbed_answer"])
        true, wrong = losses[k], losses[k + 1:k + n]
        ratios.append(math.exp(sum(wrong) / len(wrong) - true))
        k += n
    return ratios


def forget_quality(ratios: list[float], retain_model_ratios: list[float]) -> float:
    from scipy.stats import ks_2samp

    return float(ks_2samp(ratios, retain_model_ratios).pvalue)


def evaluate(model, tokenizer, world: dict, retain_pairs: list[dict] | None = None, forget_pairs: list[dict] | None = None,
             retain_model_ratios: list[float] | None = None) -> dict:
    """The figures reported per method (see the module docstring)."""
    forget = forget_pairs if forget_pairs is not None else world["forget"]
    retain = retain_pairs if retain_pairs is not None else world["retain"]
    forget_answers = answers(model, tokenizer, forget)
    result = {
        "forget_accuracy": answer_accuracy(forget_answers, [p["value"] for p in forget]),
        "paraphrase_accuracy": accuracy(model, tokenizer, forget, "paraphrased_question"),
        "rougeL_recall_forget": sum(rouge_l_recall(a, p["answer"]) for a, p in zip(forget_answers, forget)) / len(forget),
        "retain_accuracy": accuracy(model, tokenizer, retain),
        "world_accuracy": accuracy(model, tokenizer, world["world_facts"]),
    }
    ratios = truth_ratios(model, tokenizer, forget)
    result["truth_ratio_forget"] = sum(min(r, 1 / r) for r in ratios) / len(ratios)
    if retain_model_ratios is not None:
        result["forget_quality"] = forget_quality(ratios, retain_model_ratios)
    return {k: round(v, 4) for k, v in result.items()}

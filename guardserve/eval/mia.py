"""Membership inference: can a model's likelihoods tell the texts it was trained on from texts
of the same kind it never saw?

An unlearned model should look like one that never trained on the forget texts: membership
inference against it should do as well as against the retain model (about chance), no
better. Four scores, each higher for a text the attack believes was trained on, and their
ROC AUC over members (forget texts) against non-members (held-out texts):

- ``loss`` (Yeom et al., 2018): minus the mean token NLL.
- ``zlib`` (Carlini et al., 2021): minus the summed NLL divided by the text's zlib-compressed
  length in bytes, so that texts that are merely predictable do not look like members.
- ``min_k`` (Min-K% Prob, Shi et al., 2024): the mean log-probability of the k% least likely
  tokens (k = 20%), where a text never seen has its outliers.
- ``min_k_plus_plus`` (Min-K%++, Zhang et al., 2024): the same over each token's log-probability
  standardised by the model's own distribution at that position,
  ``(log p(x_t) - mu_t) / sigma_t`` with ``mu_t = E_z[log p(z)]`` and ``sigma_t`` its standard
  deviation over the vocabulary: a trained-on token sits at a local maximum.

AUC 0.5 is chance; 1.0 means every member scores above every non-member. Texts are scored as
documents (the tokenizer's BOS, then the text), the way the demo models read biographies.

>>> stats = token_stats(model, tokenizer, texts)                       # doctest: +SKIP
>>> aucs(scores(stats, texts), is_member)                              # doctest: +SKIP
{'loss': 0.97, 'zlib': 0.95, 'min_k': 0.96, 'min_k_plus_plus': 0.99}
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

METHODS = ("loss", "zlib", "min_k", "min_k_plus_plus")
MIN_K = 0.2


@dataclass(frozen=True)
class TokenStats:
    """Per predicted token of one text: its log-probability, and the mean and standard
    deviation of the log-probability under the model's distribution at that position."""

    logp: list[float]
    mu: list[float]
    sigma: list[float]


def token_stats(model, tokenizer, texts: Sequence[str], batch_size: int = 16, max_len: int = 512) -> list[TokenStats]:
    """:class:`TokenStats` of every text (BOS, then the text, cut at ``max_len`` tokens)."""
    import torch

    bos_id = getattr(tokenizer, "bos_token_id", None)
    bos = [bos_id] if bos_id is not None else []
    rows = [(bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:max_len] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[TokenStats] = []
    device = getattr(model, "device", None)
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            kw = {"input_ids": ids, "attention_mask": mask}
            if device is not None:
                kw = {k: v.to(device) for k, v in kw.items()}
            logits = model(**kw).logits[:, :-1].float().cpu()
            logprobs = torch.log_softmax(logits, dim=-1)
            probs = logprobs.exp()
            mu = (probs * logprobs).sum(-1)
            sigma = ((probs * logprobs.square()).sum(-1) - mu.square()).clamp(min=1e-12).sqrt()
            taken = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for j, r in enumerate(chunk):
                n = len(r) - 1
                out.append(TokenStats(taken[j, :n].tolist(), mu[j, :n].tolist(), sigma[j, :n].tolist()))
    return out


def _lowest_mean(values: Sequence[float], k: float) -> float:
    n = max(1, int(len(values) * k))
    return sum(sorted(values)[:n]) / n


def scores(stats: Sequence[TokenStats], texts: Sequence[str], k: float = MIN_K) -> dict[str, list[float]]:
    """Per method of :data:`METHODS`, one score per text (higher: more likely a member).
    A text with no predicted token scores NaN."""
    out: dict[str, list[float]] = {m: [] for m in METHODS}
    for s, text in zip(stats, texts):
        if not s.logp:
            for m in METHODS:
                out[m].append(math.nan)
            continue
        nll = -sum(s.logp)
        out["loss"].append(-nll / len(s.logp))
        out["zlib"].append(-nll / max(1, len(zlib.compress(text.encode("utf-8")))))
        out["min_k"].append(_lowest_mean(s.logp, k))
        out["min_k_plus_plus"].append(_lowest_mean([(lp - m) / sd for lp, m, sd in zip(s.logp, s.mu, s.sigma)], k))
    return out


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float | None:
    """ROC AUC of separating members from non-members by score (ties count half): the
    probability that a random member outscores a random non-member. None with an empty side."""
    pos = [x for x in member_scores if not math.isnan(x)]
    neg = [x for x in nonmember_scores if not math.isnan(x)]
    if not pos or not neg:
        return None
    # Mann-Whitney U from the ranks of the pooled scores (average ranks for ties).
    pooled = sorted([(x, 1) for x in pos] + [(x, 0) for x in neg])
    rank_sum, i = 0.0, 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        avg_rank = (i + 1 + j) / 2
        rank_sum += avg_rank * sum(1 for _, member in pooled[i:j] if member)
        i = j
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def aucs(method_scores: dict[str, list[float]], is_member: Sequence[bool]) -> dict[str, float | None]:
    """:func:`auc` per method, members and non-members told apart by ``is_member``."""
    return {m: auc([v for v, y in zip(vals, is_member) if y], [v for v, y in zip(vals, is_member) if not y])
            for m, vals in method_scores.items()}


def attack(model, tokenizer, members: Sequence[str], nonmembers: Sequence[str], k: float = MIN_K) -> dict[str, float | None]:
    """AUC per method of the four attacks on ``model``: ``members`` against ``nonmembers``."""
    texts = [*members, *nonmembers]
    stats = token_stats(model, tokenizer, texts)
    return aucs(scores(stats, texts, k), [True] * len(members) + [False] * len(nonmembers))

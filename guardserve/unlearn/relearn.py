"""The relearning attack on unlearned weights: fine-tune the merged model for a few steps on a
small share of the forget rows and measure how much of the *other* forget rows comes back.

Unlearning that only hides knowledge (it suppresses an answer without removing what produces
it) is undone by a little fine-tuning on related text; the knowledge that returns on rows the
attack never trained on measures that (Hu et al., 2024, "Unlearning or obfuscating?";
Lynch et al., 2024; the benign-relearning setting of the SHRED, FIT and BLUR benchmarks). The
retain model, which never learned the forget rows, is the floor: what the same fine-tuning
teaches a model that never knew them.

The split is fixed and deterministic: every ``share``-th forget row (by position) is the attack's
training data, the rest its test. The fine-tuning is full-parameter AdamW on the chat and
completion renderings unlearning itself trains on (``guardserve.unlearn.data.sequences``).

>>> relearn(base, adapter, forget_pairs, score=accuracy)              # doctest: +SKIP
{'relearn_rows': 40, 'test_rows': 120, 'forget_accuracy_before': 0.05, 'forget_accuracy_after': 0.62, ...}
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RelearnConfig:
    share: int = 4          # every 4th forget row (25%) is the attack's training data
    steps: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0


def split(pairs: list[dict], share: int) -> tuple[list[dict], list[dict]]:
    """``(relearn rows, test rows)``: every ``share``-th row, and the others."""
    if share < 2:
        raise ValueError(f"share must be at least 2 (every share-th row relearned, the rest tested), got {share}")
    return pairs[::share], [p for i, p in enumerate(pairs) if i % share]


def finetune_(model, tokenizer, pairs: list[dict], cfg: RelearnConfig) -> float:
    """Fine-tune every weight of ``model`` in place on ``pairs``; returns the last step's loss."""
    import torch

    from guardserve.textgen import collate, encode
    from guardserve.unlearn.data import sequences

    rows = encode(tokenizer, sequences(tokenizer, pairs))
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for p in model.parameters():  # a merged PEFT model comes back frozen
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    loss = float("nan")
    for _ in range(cfg.steps):
        batch = collate(rng.sample(rows, min(cfg.batch_size, len(rows))), pad)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        loss = out.loss.item()
    model.eval()
    return loss


def relearn(base_dir: str | Path, adapter_dir: str | Path | None, forget_pairs: list[dict],
            score: Callable, cfg: RelearnConfig = RelearnConfig()) -> dict:
    """Forget accuracy on the test rows before and after the attack, for the base model with
    ``adapter_dir`` merged in (None: the model at ``base_dir`` itself, e.g. the retain model).
    ``score(model, tokenizer, pairs)`` is the accuracy the evaluation uses."""
    from transformers import AutoTokenizer

    from guardserve.unlearn.quantize import merged_model

    train, test = split(forget_pairs, cfg.share)
    if not train or not test:
        raise ValueError(f"{len(forget_pairs)} forget rows: too few to relearn every {cfg.share}th and test the rest")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = merged_model(base_dir, adapter_dir)
    before = score(model, tokenizer, test)
    final_loss = finetune_(model, tokenizer, train, cfg)
    after = score(model, tokenizer, test)
    return {"relearn_rows": len(train), "test_rows": len(test), "steps": cfg.steps, "lr": cfg.lr,
            "forget_accuracy_before": round(before, 4), "forget_accuracy_after": round(after, 4),
            "final_loss": round(final_loss, 4)}

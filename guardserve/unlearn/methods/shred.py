"""SHRED: retain-set-free self-distillation with high-surprisal tokens demoted."""

from __future__ import annotations

from guardserve.unlearn.methods.base import Method


class SHRED(Method):
    """Retain-set-free self-distillation. The teacher is the frozen model's own
    next-token distribution on the forget sequences, except at *high-surprisal* answer
    tokens, where the logit of the true token is demoted to ``margin`` below the best
    other token; the student matches the teacher everywhere (KL), so what the forget text
    shares with ordinary language (grammar, the question's words) is distilled unchanged
    and acts as the retain signal, while the fact-bearing tokens are unlearned.

    Surprisal of a token is its self-information in the forget corpus, -log of the share
    of forget answers it occurs in: entity-specific tokens (names, dates, places) are
    rare across answers, template tokens ("was born in") frequent. Tokens above the
    ``quantile`` of that surprisal are demoted. (The seed paper's exact surprisal source
    is not known here; this one needs neither a retain set nor a second model.)"""

    name = "SHRED"
    margin = 5.0
    quantile = 0.5

    def setup(self, trainer) -> None:
        import math

        import torch

        counts: dict[int, int] = {}
        docs = trainer.forget_stream.encoded
        for ids, labels in docs:
            for t in {t for t, lab in zip(ids, labels) if lab != -100}:
                counts[t] = counts.get(t, 0) + 1
        surprisal = {t: -math.log(c / len(docs)) for t, c in counts.items()}
        values = sorted(surprisal.values())
        cut = values[min(len(values) - 1, int(self.quantile * len(values)))] if values else 0.0
        vocab = trainer.model.config.vocab_size
        self._high = torch.zeros(vocab, dtype=torch.bool)
        for t, s in surprisal.items():
            if s >= cut and t < vocab:
                self._high[t] = True
        special = set(trainer.tokenizer.all_special_ids)
        for t in special:
            if t < vocab:
                self._high[t] = False
        self._high = self._high.to(trainer.model.device)

    def forget_loss(self, trainer, batch):
        import torch

        model = trainer.model
        ids, attn = batch["input_ids"], batch["attention_mask"]
        labels = batch["labels"][:, 1:]
        with torch.no_grad(), trainer.reference():
            teacher = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        demote = (labels != -100) & self._high[labels.clamp(min=0)]
        lab = labels.clamp(min=0).unsqueeze(-1)
        true_logit = teacher.gather(-1, lab)
        others = teacher.scatter(-1, lab, float("-inf")).max(-1, keepdim=True).values
        new_logit = torch.minimum(true_logit, others - self.margin)
        teacher = torch.where(demote.unsqueeze(-1), teacher.scatter(-1, lab, new_logit), teacher)
        student = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        mask = attn[:, 1:].float()
        kl = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                        log_target=True, reduction="none").sum(-1)
        return (kl * mask).sum() / mask.sum()

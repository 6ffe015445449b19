"""Unlearning methods: each gives the shared loop (trainer.py) a forget loss and, where it
uses one, a retain loss. Reference behaviour: locuslab/open-unlearning (GradAscent,
GradDiff, NPO, SimNPO, RMU); SHRED from the seeds. GU's projection is the loop's ``gu``
option, valid for every method.

Token log-probabilities are those of the answer tokens only (the question is never
trained on). The reference model of NPO, RMU and SHRED is the base model with the LoRA
adapter switched off, so no second copy of the model is held.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Method(ABC):
    name = ""
    uses_retain = False
    # UnlearnConfig fields this method trains best with (the CLI and bench start from them).
    default_config: dict = {}

    def __init__(self, **params):
        for k, v in params.items():
            if not hasattr(self, k):
                raise ValueError(f"{self.name}: unknown parameter {k!r}")
            setattr(self, k, type(getattr(self, k))(v))

    def setup(self, trainer) -> None:
        """Called once, after the adapter exists and before the first step."""

    @abstractmethod
    def forget_loss(self, trainer, batch):
        """The loss on a batch of forget answers (minimised by the loop)."""

    def retain_loss(self, trainer, batch):
        return trainer.nll(trainer.model, batch) if self.uses_retain else None


class GradAscent(Method):
    """Maximise the NLL of the forget answers."""

    name = "GradAscent"

    def forget_loss(self, trainer, batch):
        return -trainer.nll(trainer.model, batch)


class GradDiff(Method):
    """Gradient ascent on forget + gradient descent (NLL) on retain."""

    name = "GradDiff"
    uses_retain = True

    def forget_loss(self, trainer, batch):
        return -trainer.nll(trainer.model, batch)


class NPO(Method):
    """Negative preference optimisation: a DPO loss with only the losing side,
    -2/beta * log sigmoid(-beta * (log p_theta(y|x) - log p_ref(y|x))), plus retain NLL."""

    name = "NPO"
    uses_retain = True
    beta = 0.1

    def forget_loss(self, trainer, batch):
        import torch

        logp, _, _ = trainer.token_logps(trainer.model, batch)
        with torch.no_grad(), trainer.reference():
            ref, _, _ = trainer.token_logps(trainer.model, batch)
        ratio = logp.sum(1) - ref.sum(1)
        return (-2.0 / self.beta * torch.nn.functional.logsigmoid(-self.beta * ratio)).mean()


class SimNPO(Method):
    """Reference-free NPO on the length-normalised log-probability:
    -2/beta * log sigmoid(-beta * mean_t log p(y_t) - delta), plus retain NLL."""

    name = "SimNPO"
    uses_retain = True
    beta = 4.5
    delta = 0.0

    def forget_loss(self, trainer, batch):
        import torch

        logp, mask, _ = trainer.token_logps(trainer.model, batch)
        avg = logp.sum(1) / mask.sum(1).clamp(min=1)
        return (-2.0 / self.beta * torch.nn.functional.logsigmoid(-self.beta * avg - self.delta)).mean()


class RMU(Method):
    """Representation misdirection: at decoder layer ``layer`` push the activations of
    forget tokens toward a fixed random direction scaled to ``steering`` times their mean
    norm, and keep retain activations where the frozen model has them (MSE, weighted by
    ``alpha``). The scale is relative because activation norms differ across models (the
    paper's absolute coefficient 6.5 fits Zephyr-7B's layer 7)."""

    name = "RMU"
    uses_retain = True
    layer = -1  # -1: the middle layer
    steering = 4.0
    alpha = 100.0

    def setup(self, trainer) -> None:
        import torch

        n_layers = trainer.model.config.num_hidden_layers
        self._layer = n_layers // 2 if self.layer < 0 else self.layer
        gen = torch.Generator().manual_seed(trainer.config.seed)
        u = torch.rand(trainer.model.config.hidden_size, generator=gen)
        batch = trainer.forget_stream.next()
        with torch.no_grad(), trainer.reference():
            h = self._acts(trainer, batch)
        norm = h.norm(dim=-1)[batch["attention_mask"].bool()].mean()
        self._target = (u / u.norm()) * self.steering * norm

    def _acts(self, trainer, batch):
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return out.hidden_states[self._layer + 1]

    def forget_loss(self, trainer, batch):
        mask = (batch["labels"] != -100).unsqueeze(-1).float()
        h = self._acts(trainer, batch)
        return (((h - self._target) ** 2) * mask).sum() / (mask.sum() * h.shape[-1])

    def retain_loss(self, trainer, batch):
        import torch

        mask = batch["attention_mask"].unsqueeze(-1).float()
        h = self._acts(trainer, batch)
        with torch.no_grad(), trainer.reference():
            ref = self._acts(trainer, batch)
        return self.alpha * (((h - ref) ** 2) * mask).sum() / (mask.sum() * h.shape[-1])


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


METHODS = {m.name.lower(): m for m in (GradAscent, GradDiff, NPO, SimNPO, RMU, SHRED)}


def get_method(name: str, **params) -> Method:
    try:
        cls = METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(m.name for m in METHODS.values())}") from None
    return cls(**params)

"""Teacher-forced scoring of a guarded model: the guard's bans as finite logit penalties.

open-unlearning scores a model by the probabilities it gives to reference answers as well
as by what it generates. A guard acts at generation time, so to score it that way the
guarded model is exposed as a forward whose logits are the model's with, at every
position ``t``, the guard applied as it would be when generating the token after
``input_ids[:t+1]``:

* the automaton state at ``t`` is the compiled filter's state after the tokens up to
  and including ``t`` (what :class:`~guardserve.logits_processors.transformers.GuardTransformersLogitsProcessor`
  computes from the tail of ``input_ids`` when that prefix is the generation so far);
* the tokens banned in that state get ``logit - penalty`` instead of ``-inf``, so a
  reference answer through a banned token has a huge but finite loss;
* a filter's precomputed semantic penalty is subtracted at every position, its
  ``+inf`` (banned) entries becoming ``penalty`` as well.

Positions outside ``attention_mask`` neither advance the automaton nor change, and rows
without a filter are returned bit for bit as the model gave them; so is every position
whose state bans nothing. Not covered: the context-dependent semantic scoring
(:func:`guardserve.logits_processors.semantic.score_candidates`), which runs per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from guardserve.logits_processors.compile import CompiledFilter


class GuardedForward(torch.nn.Module):
    r"""
    A model whose logits carry a guard's bans as a large finite penalty, for teacher-forced
    metrics (answer losses, truth ratios, probability, extraction strength).

    Args:
        model (`torch.nn.Module` or callable):
            A Hugging Face causal LM, or any callable `model(input_ids=..., attention_mask=...)`
            returning an object with `.logits` `[batch, length, vocab]`.
        filt (`CompiledFilter`, list of `CompiledFilter | None`, or `None`):
            From `compile_phrases(tokenizer, phrases)`: one filter for every row, or one per
            batch row (`None`: that row is not guarded). Overridden per call by `filters=`.
        penalty (`float`, *optional*, defaults to 1e4):
            Subtracted from the logit of each banned token; finite, so losses stay finite.

    Calling it returns the model's output with `.logits` replaced by the guarded logits.
    `generate` passes a single filter to `model.generate` as a
    `GuardTransformersLogitsProcessor`, so generation metrics see the same guard.

    Examples:

    ```python
    >>> from guardserve.eval.metrics import answer_losses
    >>> from guardserve.logits_processors.compile import compile_phrases
    >>> guarded = GuardedForward(model, compile_phrases(tok, ["Gygreim Houtus"]))
    >>> prompt = chat_prompt(tok, "When was Gygreim Houtus born?")
    >>> answer_losses(guarded, tok, [prompt], ["Gygreim Houtus was born on 27 January 1930."])  # huge, finite
    ```

    One filter per row (per item in the metrics, through `filters=`):

    ```python
    >>> logits = guarded(input_ids=ids, attention_mask=mask, filters=[filt_a, None, filt_b]).logits
    ```
    """

    def __init__(self, model, filt: CompiledFilter | Sequence[CompiledFilter | None] | None = None,
                 penalty: float = 1e4):
        super().__init__()
        if not (isinstance(penalty, (int, float)) and math.isfinite(penalty) and penalty > 0):
            raise ValueError(f"penalty must be a positive finite number, got {penalty!r}")
        self.model = model
        self.filt = filt
        self.penalty = float(penalty)
        # id(filter) -> (filter, bool masks [M, V], mask rows that ban something); the
        # filter is kept so that its id stays its own.
        self._tables: dict[int, tuple[CompiledFilter, torch.Tensor, list[bool]]] = {}

    @property
    def device(self) -> torch.device:
        dev = getattr(self.model, "device", None)
        return torch.device(dev) if dev is not None else torch.device("cpu")

    # ------------------------------------------------------------------ filters per row
    def row_filters(self, batch: int, filters=None) -> list[CompiledFilter | None]:
        f = self.filt if filters is None else filters
        if f is None or isinstance(f, CompiledFilter):
            return [f] * batch
        f = list(f)
        if len(f) != batch:
            raise ValueError(f"{len(f)} filters for a batch of {batch} rows: give one per row (None = unguarded)")
        return f

    def states(self, filt: CompiledFilter, ids: Sequence[int], mask: Sequence[int] | None = None) -> list[int]:
        """Automaton state after each position of ``ids`` (masked positions do not advance it)."""
        out, s, V = [], 0, filt.vocab_size
        for t, tok in enumerate(ids):
            if mask is None or mask[t]:
                s = filt.step(s, tok) if 0 <= tok < V else 0
            out.append(s)
        return out

    def _table(self, filt: CompiledFilter, vocab: int, device: torch.device):
        entry = self._tables.get(id(filt))
        if entry is None or entry[1].shape[1] != vocab or entry[1].device != device:
            from guardserve.kernels import unpack_masks

            masks = unpack_masks(torch.from_numpy(np.ascontiguousarray(filt.masks)), vocab).to(device)
            entry = (filt, masks, masks.any(1).tolist())
            self._tables[id(filt)] = entry
        return entry

    # ------------------------------------------------------------------ logits
    def guard_logits(self, input_ids: torch.Tensor, logits: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     filters=None) -> torch.Tensor:
        """The guarded copy of ``logits`` (``logits`` itself when nothing is banned)."""
        B, L, V = logits.shape
        rows = self.row_filters(B, filters)
        if all(f is None for f in rows):
            return logits
        dev = logits.device
        ids = input_ids.tolist()
        mask = attention_mask.tolist() if attention_mask is not None else None
        groups: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        eb, et, etok = [], [], []
        semantic: list[tuple[int, CompiledFilter]] = []
        for b, f in enumerate(rows):
            if f is None:
                continue
            _, _, dense = self._table(f, V, dev)
            host = f.host_bans()
            m_row = mask[b] if mask is not None else None
            if f.penalty is not None:
                semantic.append((b, f))
            for t, s in enumerate(self.states(f, ids[b], m_row)):
                if m_row is not None and not m_row[t]:
                    continue
                m, extra = host[s]
                if dense[m]:
                    g = groups.setdefault((id(f), m), ([], []))
                    g[0].append(b)
                    g[1].append(t)
                for tok in extra:
                    if tok < V:
                        eb.append(b)
                        et.append(t)
                        etok.append(tok)
        if not groups and not eb and not semantic:
            return logits
        out = logits.clone()
        pen = self.penalty
        for b, f in semantic:
            p = torch.from_numpy(np.asarray(f.penalty, dtype=np.float32))[:V]
            p = torch.nn.functional.pad(p, (0, V - p.shape[0])).clamp(max=pen).to(dev)
            cols = slice(None) if _all_attended(mask, b) else torch.tensor([t for t in range(L) if mask[b][t]], device=dev)
            out[b, cols] = (logits[b, cols].float() - p).to(logits.dtype)
        # A banned token's logit is the model's minus the penalty, whatever the semantic
        # penalty did to it: the -inf of generation, made finite.
        for (fid, m), (bs, ts) in groups.items():
            banned = self._tables[fid][1][m]
            bi, ti = torch.tensor(bs, device=dev), torch.tensor(ts, device=dev)
            out[bi, ti] = torch.where(banned, logits[bi, ti] - pen, out[bi, ti])
        if eb:
            bi, ti, ki = (torch.tensor(x, device=dev) for x in (eb, et, etok))
            out[bi, ti, ki] = logits[bi, ti, ki] - pen
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, filters=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = self.guard_logits(input_ids, out.logits, attention_mask, filters)
        return out

    def generate(self, *args, **kwargs):
        """``model.generate`` with the guard as a logits processor (one filter for all rows)."""
        from transformers import LogitsProcessorList

        from guardserve.logits_processors.transformers import GuardTransformersLogitsProcessor

        if self.filt is not None and not isinstance(self.filt, CompiledFilter):
            raise ValueError("generate needs one filter for all rows; per-row filters apply to teacher-forced scoring only")
        if self.filt is not None:
            procs = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            procs.append(GuardTransformersLogitsProcessor(self.filt))
            kwargs["logits_processor"] = procs
        return self.model.generate(*args, **kwargs)


def _all_attended(mask: list[list[int]] | None, row: int) -> bool:
    return mask is None or all(mask[row])

"""Engine-agnostic guard state: one automaton state per request, one kernel per step.

Adapters (vLLM V1 runner, vLLM Model Runner V2, transformers) translate their engine's
batch bookkeeping into :class:`GuardBatch` calls: ``add`` when a request enters a row,
``remove``/``move`` as the batch changes, ``apply`` once per step.

Contract:

* The automaton starts from the **end of the prompt** (a forbidden phrase may begin in
  the prompt: prefix injection) and advances by one transition per generated token.
* Output tokens are read from the engine's live list lazily, at ``apply``: the engine
  may fill in a token after ``add`` (async scheduling writes placeholders, ``-1``,
  first), and a request resumed after preemption arrives with its earlier output.
* Rows without a filter are not read or written: bit for bit untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from guardserve import kernels

from .compile import CompiledFilter

PLACEHOLDER_TOKEN = -1


class RequestGuard:
    """Automaton state of one request."""

    __slots__ = ("filt", "state", "consumed", "output_ids")

    def __init__(self, filt: CompiledFilter, prompt_ids: Sequence[int] | None, output_ids: list[int]):
        self.filt = filt
        self.state = filt.run(list(prompt_ids or ()))
        self.consumed = 0
        # A live reference: the engine appends to it.
        self.output_ids = output_ids

    def feed(self, tokens: Sequence[int]) -> int:
        """Advance over ``tokens`` directly (engines whose history is not a host list)."""
        f, s = self.filt, self.state
        for t in tokens:
            s = f.step(s, t) if 0 <= t < f.vocab_size else 0
        self.state = s
        return s

    def catch_up(self) -> int:
        """Advance over output tokens not yet seen; stop at a placeholder."""
        out = self.output_ids
        n = len(out)
        if self.consumed < n:
            f, s = self.filt, self.state
            i = self.consumed
            while i < n:
                t = out[i]
                if t == PLACEHOLDER_TOKEN:
                    break
                s = f.step(s, t) if 0 <= t < f.vocab_size else 0
                i += 1
            self.state, self.consumed = s, i
        return self.state


class _Bank:
    """The device tables of the filters in use: stacked masks and penalties.

    Rebuilt only when a filter not yet in the bank arrives (new targets), so a step
    costs no copies of masks. Filters no longer used are dropped at that rebuild.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.index: dict[int, tuple[int, int]] = {}  # id(filter) -> (mask base, pen row)
        self.filters: dict[int, CompiledFilter] = {}
        self.masks = torch.zeros((1, 1), dtype=torch.int32, device=device)
        self.penalties = torch.zeros((0, 1), dtype=torch.float32, device=device)
        self.masks_bool: torch.Tensor | None = None
        self.masks_sparse: list[torch.Tensor | None] | None = None
        self.masks_bias: torch.Tensor | None = None
        self.vocab = 0

    def ensure(self, live: dict[int, CompiledFilter], vocab: int) -> None:
        if vocab == self.vocab and all(k in self.index for k in live):
            return
        for f in live.values():
            f.host_bans()  # built here, once per filter, not inside a step
        self.filters = dict(live)
        self.vocab = vocab
        W = (vocab + 31) // 32
        masks: list[np.ndarray] = []
        pens: list[np.ndarray] = []
        self.index = {}
        base = 0
        for k, f in self.filters.items():
            m = f.masks
            m = m[:, :W] if m.shape[1] >= W else np.pad(m, ((0, 0), (0, W - m.shape[1])))
            masks.append(m)
            pen_row = -1
            if f.penalty is not None:
                p = f.penalty[:vocab].astype(np.float32)
                p = np.pad(p, (0, vocab - p.shape[0]))
                pen_row = len(pens)
                pens.append(p)
            self.index[k] = (base, pen_row)
            base += m.shape[0]
        self.masks = torch.from_numpy(np.concatenate(masks) if masks else np.zeros((1, W), np.int32)).to(self.device)
        self.penalties = (torch.from_numpy(np.stack(pens)) if pens else torch.zeros((0, vocab))).to(self.device)
        # CPU path, prepared once here, not per step: the masks as bool rows, as 0/-inf
        # rows (added: a cost independent of the ban set), and as token lists where a
        # mask bans at most 1/16 of the vocabulary (the reference picks per step).
        self.masks_bool = self.masks_sparse = self.masks_bias = None
        if self.device.type != "cuda":
            self.masks_bool = kernels.unpack_masks(self.masks, vocab)
            self.masks_bias = torch.zeros(self.masks_bool.shape, dtype=torch.float32).masked_fill_(
                self.masks_bool, float("-inf"))
            self.masks_sparse = []
            for row in self.masks_bool:
                n = int(row.sum())
                self.masks_sparse.append(row.nonzero()[:, 0] if n * 16 <= vocab else None)


class GuardBatch:
    """Per-row guard state of a batch and the one kernel call per step.

    >>> batch = GuardBatch(torch.device("cpu"))          # doctest: +SKIP
    >>> batch.add(0, compile_phrases(tok, ["Kuwait City"]), prompt_ids, output_ids)
    >>> logits = batch.apply(logits)                   # bans row 0's forbidden tokens
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.rows: dict[int, RequestGuard] = {}
        self._bank = _Bank(self.device)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, index: int, filt: CompiledFilter | None, prompt_ids, output_ids: list[int]) -> None:
        if filt is None:
            self.rows.pop(index, None)
        else:
            self.rows[index] = RequestGuard(filt, prompt_ids, output_ids)

    def remove(self, index: int) -> None:
        self.rows.pop(index, None)

    def move(self, a: int, b: int, swap: bool) -> None:
        ga, gb = self.rows.pop(a, None), self.rows.pop(b, None)
        if ga is not None:
            self.rows[b] = ga
        if swap and gb is not None:
            self.rows[a] = gb

    def step_args(self, vocab: int, rows: dict[int, int] | None = None):
        """Advance the guarded rows and gather the kernel arguments.

        ``rows`` maps guard index -> logits row for the indices in this step when
        they differ (Model Runner V2: slot -> row); by default every guarded index is
        its own row.
        """
        live = {id(g.filt): g.filt for g in self.rows.values()}
        self._bank.ensure(live, vocab)
        index = self._bank.index
        out_rows, mask_idx, pen_idx, offs = [], [], [], [0]
        toks: list[int] = []
        items = self.rows.items() if rows is None else ((i, self.rows[i]) for i in rows)
        for i, g in items:
            s = g.catch_up()
            f = g.filt
            base, pen_row = index[id(f)]
            m, extra = f.host_bans()[s]
            out_rows.append(i if rows is None else rows[i])
            mask_idx.append(base + m)
            pen_idx.append(pen_row)
            if extra:
                toks.extend(extra)
            offs.append(len(toks))
        dev = self.device
        return (
            torch.tensor(out_rows, dtype=torch.int64, device=dev),
            torch.tensor(mask_idx, dtype=torch.int32, device=dev),
            torch.tensor(pen_idx, dtype=torch.int32, device=dev),
            torch.tensor(offs, dtype=torch.int32, device=dev),
            torch.tensor(toks, dtype=torch.int32, device=dev),
        )

    def apply(self, logits: torch.Tensor, rows: dict[int, int] | None = None) -> torch.Tensor:
        if not self.rows or rows == {}:
            return logits
        r, m, p, o, t = self.step_args(logits.shape[1], rows)
        b = self._bank
        return kernels.guard_apply(logits, r, m, b.masks, p, b.penalties, o, t, b.masks_bool, b.masks_sparse, b.masks_bias)

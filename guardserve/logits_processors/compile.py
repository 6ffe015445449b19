"""Forbidden phrases -> token-id variants -> one Aho-Corasick automaton over token ids.

The automaton is what makes the per-step cost independent of the number of forbidden
phrases: a request keeps one automaton state, each generated token is one transition
(amortised O(1): a dict lookup plus failure links), and each state carries a ban set
that was computed here, at compile time, the way grammar engines precompute token masks.

Ban sets
--------
A phrase is banned at its **first distinctive token** and at every token after it:

* *Distinctive.* Let the word-so-far of a token be the letters and digits of the
  word it ends in, as decoded up to and including it (``"Am" + "sterdam"`` ->
  ``amsterdam``). The token is *common* when it carries no letter or digit, when the
  word-so-far is shorter than :data:`MIN_DISTINCTIVE_CHARS`, or when the word-so-far
  (lower case) is a prefix of a word in the reference vocabulary
  ``common_words.txt`` (about 1,100 frequent English words). Otherwise it is
  *distinctive*. ``" New"`` of "New Amsterdam" is common (``new`` is a word), so the
  model may still write "New York" or "a new idea"; ``"sterdam"`` is distinctive and
  is banned once ``"New Am"`` has been written. A phrase without a distinctive token
  is banned at its last token only.
* *Why not only the last token* (vLLM's ``bad_words``, transformers' ``NoBadWords``):
  greedy decoding cannot backtrack; once "Kuwait" is out, banning "City" is too late.
* *Why also every later token.* The prompt is not ours: it may already contain the
  distinctive part ("... capital is Kuwait"); the automaton starts from the end of
  the prompt, and the rest of the phrase is banned from there on (prefix injection).

Each state's ban set is the union of the ban sets of the states on its failure chain
(every suffix of what was read that is a phrase prefix). It is stored as one dense
packed int32 bitmask shared by most states (the root's: tokens banned everywhere) plus
a sparse list of extra token ids per state; a state whose extras would be larger than
a bitmask gets a bitmask of its own. Bit ``j`` of word ``w`` is token ``32 * w + j``.

Variants
--------
Generation emits a phrase in whatever spelling the context calls for, so every phrase
is compiled in several surface forms (as given, lower, Title, UPPER, first letter
capitalised; words joined by space or hyphen), each tokenised after several left
contexts (start of text, after a space, after a newline, after punctuation) and before
``.``, ``,`` or ``'s``. A token that merges context punctuation with the phrase
(tekken's ``"(New"``) or the phrase with what follows (``"City."``) is kept: it is the
token the model emits there. Other, non-canonical tokenisations of the same text are
not covered: models trained on the tokenizer emit canonical ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

MIN_DISTINCTIVE_CHARS = 3
# States whose extra ban list is longer than this many entries times the bitmask
# width get their own bitmask instead (the "sparse list where that is smaller" rule).
_DENSE_FACTOR = 1

_ROOT_LIST_MIN_EDGES = 4096
_WORD_RE = re.compile(r"[^\W_]+", re.UNICODE)
_CONTEXTS = ("", "\n", ". ", "(", '"', "x ")
# Punctuation that some tokenizers merge into a phrase's last token ("City." as one
# token): tried after the phrase, kept only where it merged.
_TAILS = ("", ".", ",", "'s")


@lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    text = resources.files(__package__).joinpath("common_words.txt").read_text("utf-8")
    words: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("#"):
            words.update(w.lower() for w in line.split())
    return frozenset(words)


@lru_cache(maxsize=1)
def _common_prefixes() -> frozenset[str]:
    return frozenset(w[:i] for w in common_words() for i in range(1, len(w) + 1))


def is_common_word_prefix(word: str) -> bool:
    """True when ``word`` is too short or begins a word of the reference vocabulary."""
    word = word.lower()
    return len(word) < MIN_DISTINCTIVE_CHARS or word in _common_prefixes()


# --------------------------------------------------------------------------- tokenizers


class TokenizerView:
    """The three things compilation needs from a tokenizer, whatever its library.

    Accepts a Hugging Face tokenizer (``transformers`` or ``tokenizers``), vLLM's
    tokenizers (same API) and ``mistral_common`` tokenizers (``MistralTokenizer``,
    ``Tekkenizer``, ``SentencePieceTokenizer``).
    """

    def __init__(self, tokenizer):
        self.raw = tokenizer
        inner = getattr(getattr(tokenizer, "instruct_tokenizer", None), "tokenizer", None)
        if inner is not None:  # mistral_common.MistralTokenizer
            tokenizer = inner
        self._tok = tokenizer
        if hasattr(tokenizer, "n_words") and not hasattr(tokenizer, "get_vocab"):
            # mistral_common raw tokenizers: encode(s, bos, eos)
            self.vocab_size = int(tokenizer.n_words)
            self._encode = lambda s: list(tokenizer.encode(s, bos=False, eos=False))
        elif hasattr(tokenizer, "encode_batch") and not hasattr(tokenizer, "convert_ids_to_tokens"):
            # tokenizers.Tokenizer
            self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
            self._encode = lambda s: list(tokenizer.encode(s, add_special_tokens=False).ids)
        else:
            self.vocab_size = int(len(tokenizer))
            self._encode = lambda s: list(tokenizer.encode(s, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def fingerprint(self) -> str:
        """Stable identity of the vocabulary, for caches keyed by tokenizer."""
        h = hashlib.sha256(str(self.vocab_size).encode())
        probe = [self.decode([i]) for i in range(0, self.vocab_size, max(1, self.vocab_size // 4096))]
        h.update(json.dumps(probe).encode())
        return h.hexdigest()[:16]


def as_tokenizer_view(tokenizer) -> TokenizerView:
    return tokenizer if isinstance(tokenizer, TokenizerView) else TokenizerView(tokenizer)


def surface_forms(phrase: str) -> list[str]:
    """Spellings of ``phrase`` that generation may produce (case and joins)."""
    base = " ".join(phrase.split())
    if not base:
        return []
    joins = {base}
    if " " in base:
        joins.add(base.replace(" ", "-"))
    if "-" in base:
        joins.add(base.replace("-", " "))
    forms: list[str] = []
    for j in sorted(joins):
        for f in (j, j.lower(), j.title(), j.upper(), j[:1].upper() + j[1:]):
            if f not in forms:
                forms.append(f)
    return forms


def _strip_context(tv: TokenizerView, ctx: str, ids: list[int], form: str) -> list[int] | None:
    """The tokens of ``ctx + form`` that spell ``form``; a token that merged context
    punctuation with the phrase (tekken's ``"(New"``) is kept, since that is the
    token the model emits there."""
    if not ctx:
        return ids
    pre = tv.encode(ctx)
    j = 0
    while j < min(len(pre), len(ids)) and pre[j] == ids[j]:
        j += 1
    rest = ids[j:]
    if not rest or j == len(pre):
        return rest or None
    # A merged boundary token: what precedes the phrase in it must be context.
    text = tv.decode(rest)
    k = text.find(form.split()[0])
    if k < 0 or (text[:k].strip() and text[:k].strip() not in ctx):
        return None
    return rest


def token_variants(tokenizer, phrase: str) -> list[tuple[int, ...]]:
    """Every token-id sequence under which ``phrase`` is emitted in running text."""
    tv = as_tokenizer_view(tokenizer)
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    for form in surface_forms(phrase):
        for lead in ("", " "):
            for ctx in _CONTEXTS:
                for tail in _TAILS:
                    ids = tv.encode(ctx + lead + form + tail)
                    if tail:
                        post = tv.encode("x" + tail)[len(tv.encode("x")):]
                        if post and ids[-len(post):] == post:
                            continue  # the tail did not merge: the plain variant covers it
                    kept = _strip_context(tv, ctx, ids, form)
                    if not kept:
                        continue
                    text = tv.decode(kept).strip()
                    if form not in text:
                        continue
                    t = tuple(int(i) for i in kept)
                    if t not in seen:
                        seen.add(t)
                        out.append(t)
    return out


def _glues_left(tv: TokenizerView, tok: int) -> bool:
    """True when ``tok`` can continue a word (its text does not begin with a space or
    punctuation), so it also occurs inside other words."""
    probe = tv.encode("a")
    text = tv.decode(probe + [tok])
    head = tv.decode(probe)
    rest = text[len(head):] if text.startswith(head) else text
    return bool(rest) and (rest[0].isalnum() or rest[0] == "_")


def first_distinctive(tokenizer, ids: Sequence[int]) -> int:
    """Index of the first distinctive token of ``ids`` (see module docstring);
    ``len(ids) - 1`` when none is.

    Two refinements of the word-so-far rule: the first token of a variant is never
    distinctive when it can also continue a word (``"ada"`` begins "Ada" after a
    parenthesis but ends "Canada"; the automaton has no left context there to tell
    them apart), and a run of digits is distinctive only where it ends ("1987" is
    banned at its last digit, not at "198", which begins other years too).
    """
    tv = as_tokenizer_view(tokenizer)
    n = len(ids)
    texts = [tv.decode(ids[: i + 1]) for i in range(n)]
    prev = ""
    for i in range(n):
        text = texts[i]
        piece = text[len(prev):] if text.startswith(prev) else text
        prev = text
        if not _WORD_RE.search(piece):
            continue
        if i == 0 and _glues_left(tv, ids[0]):
            continue
        words = _WORD_RE.findall(text)
        if not words:
            continue
        w = words[-1]
        if w.isdigit() and i + 1 < n:
            nxt = texts[i + 1][len(text):] if texts[i + 1].startswith(text) else ""
            if nxt[:1].isdigit():
                continue
        if not is_common_word_prefix(w):
            return i
    return n - 1


# --------------------------------------------------------------------------- automaton


@dataclass(eq=False)
class CompiledFilter:
    """An Aho-Corasick automaton over token ids with a ban set per state.

    ``goto`` maps ``state * vocab_size + token`` to the child state (trie edges only;
    failure links complete the transition function). ``state_mask[s]`` indexes
    ``masks`` (row 0 is the root's ban set, shared by most states); tokens banned in
    ``s`` beyond that row are ``sparse_tokens[sparse_offsets[s]:sparse_offsets[s+1]]``.
    ``penalty`` is an optional semantic penalty over the vocabulary (added by
    :mod:`.semantic`): subtracted from the logits, ``+inf`` where it bans.
    """

    vocab_size: int
    goto: dict[int, int]
    fail: list[int]
    max_depth: int
    masks: np.ndarray  # int32 [M, ceil(V / 32)]
    state_mask: np.ndarray  # int32 [S]
    sparse_offsets: np.ndarray  # int64 [S + 1]
    sparse_tokens: np.ndarray  # int32 [K]
    sequences: list[tuple[int, ...]]
    ban_from: list[int]
    penalty: np.ndarray | None = None
    key: str = ""
    meta: dict = field(default_factory=dict)
    # Per state, as Python objects, for the per-step host loop (a list index is ~20x
    # cheaper than slicing and converting numpy arrays): (mask row, extra tokens).
    _host: list[tuple[int, tuple[int, ...]]] | None = field(default=None, repr=False)
    _root: list[int] | None = field(default=None, repr=False)

    def host_bans(self) -> list[tuple[int, tuple[int, ...]]]:
        if self._host is None:
            off, toks, sm = self.sparse_offsets.tolist(), self.sparse_tokens.tolist(), self.state_mask.tolist()
            self._host = [(sm[s], tuple(toks[off[s]:off[s + 1]]) if off[s + 1] > off[s] else ())
                          for s in range(self.num_states)]
        return self._host

    @property
    def num_states(self) -> int:
        return len(self.fail)

    def step(self, state: int, token: int) -> int:
        """One transition (amortised O(1))."""
        V, goto, fail = self.vocab_size, self.goto, self.fail
        while state:
            nxt = goto.get(state * V + token)
            if nxt is not None:
                return nxt
            state = fail[state]
        # Most transitions start at or fall back to the root. In a large automaton,
        # whose dict (one entry per trie edge) makes each lookup a cache miss, the
        # root's row is a list; a small one stays in the dict (a V-long list is 1 MiB
        # at 131k tokens, per cached filter).
        root = self._root
        if root is None:
            if len(goto) < _ROOT_LIST_MIN_EDGES:
                return goto.get(token, 0)
            root = self._root = [0] * V
            for key, child in goto.items():
                if key < V:
                    root[key] = child
        return root[token]

    def run(self, ids: Sequence[int], state: int = 0) -> int:
        # The state after a long text depends only on its last max_depth tokens
        # (the longest suffix that is a phrase prefix), so starting from the end of a
        # long prompt costs O(max_depth), not O(prompt).
        if state == 0 and len(ids) > self.max_depth:
            ids = ids[len(ids) - self.max_depth:]
        for t in ids:
            if 0 <= t < self.vocab_size:
                state = self.step(state, int(t))
            else:
                state = 0
        return state

    def banned(self, state: int) -> set[int]:
        """The full ban set of ``state`` (for tests and inspection)."""
        words = self.masks[self.state_mask[state]]
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab_size]
        out = set(np.flatnonzero(bits).tolist())
        a, b = self.sparse_offsets[state], self.sparse_offsets[state + 1]
        out.update(self.sparse_tokens[a:b].tolist())
        return out

    def emitted(self, ids: Sequence[int], start: int = 0) -> list[tuple[int, ...]]:
        """Forbidden sequences that end at a position ``>= start`` of ``ids``."""
        found = []
        for seq in self.sequences:
            n = len(seq)
            for end in range(max(start, n - 1), len(ids)):
                if tuple(ids[end - n + 1: end + 1]) == seq:
                    found.append(seq)
                    break
        return found

    def nbytes(self) -> int:
        """Memory of the compiled form (arrays plus an estimate for the dict/list)."""
        arrays = (self.masks, self.state_mask, self.sparse_offsets, self.sparse_tokens)
        n = sum(a.nbytes for a in arrays)
        if self.penalty is not None:
            n += self.penalty.nbytes
        # CPython: a dict entry is ~ 3 pointers in the table plus the int objects.
        n += len(self.goto) * (8 * 3 + 2 * 28) + len(self.fail) * 8
        n += self.num_states * 8 * 4 + self.sparse_tokens.size * 36  # host_bans()
        if len(self.goto) >= _ROOT_LIST_MIN_EDGES:
            n += self.vocab_size * 8  # the root's transitions as a list
        return n


def _pack(tokens: Iterable[int], vocab_size: int) -> np.ndarray:
    words = (vocab_size + 31) // 32
    bits = np.zeros(words * 32, dtype=np.uint8)
    idx = np.fromiter(tokens, dtype=np.int64)
    if idx.size:
        bits[idx] = 1
    return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)


def compile_token_sequences(
    sequences: Iterable[Sequence[int]],
    vocab_size: int,
    ban_from: Iterable[int] | None = None,
) -> CompiledFilter:
    """Build the automaton for token-id sequences.

    ``ban_from[i]`` is the index of sequence ``i``'s first banned token; by default
    the last one (the semantics of vLLM's ``bad_words``), but from the end of the
    prompt on, like every ban here.
    """
    seqs: list[tuple[int, ...]] = []
    bans: list[int] = []
    seen: dict[tuple[int, ...], int] = {}
    froms = list(ban_from) if ban_from is not None else None
    for i, seq in enumerate(sequences):
        t = tuple(int(x) for x in seq)
        if not t:
            continue
        if any(x < 0 or x >= vocab_size for x in t):
            raise ValueError(f"token id out of range for a vocabulary of {vocab_size}: {t}")
        b = len(t) - 1 if froms is None else max(0, min(int(froms[i]), len(t) - 1))
        if t in seen:  # same sequence twice: keep the earlier ban point
            j = seen[t]
            bans[j] = min(bans[j], b)
            continue
        seen[t] = len(seqs)
        seqs.append(t)
        bans.append(b)

    V = vocab_size
    goto: dict[int, int] = {}
    own: list[set[int] | None] = [None]
    depth = [0]
    children: list[list[int]] = [[]]
    for t, b in zip(seqs, bans):
        s = 0
        for k, tok in enumerate(t):
            if k >= b:
                mine = own[s]
                if mine is None:
                    mine = own[s] = set()
                mine.add(tok)
            if k == len(t) - 1:
                break  # the last token is banned, never entered: no state after it
            key = s * V + tok
            nxt = goto.get(key)
            if nxt is None:
                nxt = len(own)
                goto[key] = nxt
                own.append(None)
                depth.append(depth[s] + 1)
                children.append([])
                children[s].append(tok)
            s = nxt

    S = len(own)
    fail = [0] * S
    order: list[int] = []
    queue = [goto[tok] for tok in children[0]]  # depth-1 states fail to the root
    while queue:
        order.extend(queue)
        nxt_q = []
        for s in queue:
            for tok in children[s]:
                c = goto[s * V + tok]
                f = fail[s]
                while True:
                    g = goto.get(f * V + tok)
                    if g is not None and g != c:
                        fail[c] = g
                        break
                    if f == 0:
                        fail[c] = 0
                        break
                    f = fail[f]
                nxt_q.append(c)
        queue = nxt_q

    root_ban = own[0] or set()
    W = (V + 31) // 32
    extras: list[frozenset[int]] = [frozenset()] * S
    masks = [_pack(root_ban, V)]
    state_mask = np.zeros(S, dtype=np.int32)
    for s in order:  # BFS: a state's failure target is shallower, so already done
        e = extras[fail[s]]
        mine = own[s]
        if mine:
            e = e | frozenset(mine - root_ban)
        extras[s] = e
    sp_tokens: list[int] = []
    sp_off = np.zeros(S + 1, dtype=np.int64)
    for s in range(S):
        e = extras[s]
        if len(e) > _DENSE_FACTOR * W:
            state_mask[s] = len(masks)
            masks.append(_pack(root_ban | e, V))
        else:
            sp_tokens.extend(sorted(e))
        sp_off[s + 1] = len(sp_tokens)

    key_src = hashlib.sha256(str(V).encode())
    for t, b in zip(seqs, bans):
        key_src.update(repr((t, b)).encode())
    return CompiledFilter(
        vocab_size=V,
        goto=goto,
        fail=fail,
        max_depth=max(depth),
        masks=np.stack(masks),
        state_mask=state_mask,
        sparse_offsets=sp_off,
        sparse_tokens=np.asarray(sp_tokens, dtype=np.int32),
        sequences=seqs,
        ban_from=bans,
        key=key_src.hexdigest()[:24],
    )


def compile_phrases(
    tokenizer,
    phrases: Iterable[str],
    *,
    distinctive: bool = True,
    vocab_size: int | None = None,
) -> CompiledFilter:
    """Compile forbidden phrases into one :class:`CompiledFilter`.

    ``distinctive=False`` bans each variant only at its last token (for comparison
    with ``bad_words``). ``vocab_size`` defaults to the tokenizer's; pass the model's
    (logits width) when it is larger.

    >>> f = compile_phrases(tok, ["New Amsterdam"])          # doctest: +SKIP
    >>> s = f.run(tok.encode("I live in New Am"))            # doctest: +SKIP
    >>> tok.encode("sterdam")[0] in f.banned(s)              # doctest: +SKIP
    True
    """
    tv = as_tokenizer_view(tokenizer)
    V = max(int(vocab_size or 0), tv.vocab_size)
    seqs: list[tuple[int, ...]] = []
    froms: list[int] = []
    plist = sorted({" ".join(p.split()) for p in phrases if p and p.strip()})
    for p in plist:
        for ids in token_variants(tv, p):
            seqs.append(ids)
            froms.append(first_distinctive(tv, ids) if distinctive else len(ids) - 1)
    f = compile_token_sequences(seqs, V, froms)
    f.meta = {"phrases": plist, "distinctive": distinctive}
    return f


class FilterCache:
    """Compiled filters by (tokenizer, phrases), least recently used first out.

    Compilation costs milliseconds per phrase; requests for the same targets reuse it.
    """

    def __init__(self, maxsize: int = 256):
        self.maxsize = maxsize
        self._d: OrderedDict[tuple, CompiledFilter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tokenizer, phrases: Sequence[str], vocab_size: int | None = None, **kw) -> CompiledFilter:
        key = (id(tokenizer), vocab_size, tuple(sorted(set(phrases))), tuple(sorted(kw.items())))
        with self._lock:
            f = self._d.get(key)
            if f is not None:
                self._d.move_to_end(key)
                return f
        f = compile_phrases(tokenizer, phrases, vocab_size=vocab_size, **kw)
        with self._lock:
            self._d[key] = f
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)
        return f

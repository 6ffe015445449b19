"""Forbidden phrases -> one automaton that reads the text the tokens spell.

The automaton is what makes the per-step cost independent of the number of forbidden
phrases: a request keeps one automaton state, each generated token is one transition
(a dict lookup once seen), and each state carries a ban set computed here, at compile
time, the way grammar engines precompute token masks.

Text, not token ids
-------------------
:func:`compile_phrases` builds a :class:`TextFilter`: an Aho-Corasick automaton over the
bytes of the text (ASCII letters folded to lower case, whitespace to spaces, plus a
word-start symbol), which a token advances by its own bytes (:meth:`TokenizerView.token_bytes`:
SentencePiece ``▁`` pieces, byte-fallback ``<0xF0>`` pieces, byte-level BPE). Every
tokenisation of a text therefore reaches the same state: canonical or not, ``"▁Ku" "wait"``
or ``"▁K" "u" "w" "ait"``, a byte-fallback emoji, a token holding the end of one word
and the start of the next. A token is banned in a state when reading its bytes from
there completes a forbidden position (below); the ban sets come from the vocabulary's
sorted bytes (:class:`VocabIndex`, built once per tokenizer). Property-tested on
Mistral's real 32k SentencePiece tokenizer (tests/test_real_tokenizers.py), and on tekken.

Each phrase is matched in several surface forms (as given, lower, Title, UPPER, first
letter capitalised; words joined by space or hyphen) and in any ASCII case. A form counts
wherever it occurs, inside a word too ("wait City" in "Kuwait City"), unless it runs on
into a longer word: a form ending in a letter or digit is not complete while a letter
or digit follows in the same token ("Houtusian"; letters of U+00C0-U+07FF count, CJK
characters and emoji do not, since CJK writes no spaces).

Where a phrase is banned
------------------------
A phrase is banned at the end of its **first distinctive word** and at every word end
after it, where the phrase starts at a word start:

* *Distinctive.* A word is *common* when it is shorter than :data:`MIN_DISTINCTIVE_CHARS`
  or (lower case) a prefix of a word in the reference vocabulary ``common_words.txt``
  (about 1,100 frequent English words); otherwise it is *distinctive*. ``"New"`` of
  "New Amsterdam" is common, so the model may still write "New York" or "a new idea";
  "Amsterdam" is distinctive and is banned once "New " has been written. A phrase
  without a distinctive word is banned where it is complete; so is a phrase that starts
  inside a word ("Ada Lovelace" after "Can": "Canada" stays allowed).
* *Why not only where the phrase is complete* (vLLM's ``bad_words``, transformers'
  ``NoBadWords``): greedy decoding cannot backtrack; once "Kuwait" is out, banning
  "City" is too late.
* *Why also every word end after it.* The prompt is not ours: it may already contain the
  distinctive part ("... capital is Kuwait"); the automaton starts from the end of
  the prompt, and the rest of the phrase is banned from there on (prefix injection).

Each state's ban set is the union of the ban sets of the states on its failure chain
(every suffix of what was read that is a phrase prefix). It is stored as one dense
packed int32 bitmask shared by all states (row 0: tokens banned everywhere) plus a
sparse list of extra token ids per state; a state whose extras would be larger than a
bitmask gets a bitmask of its own. Bit ``j`` of word ``w`` is token ``32 * w + j``.

Token variants
--------------
:func:`token_variants` lists the canonical tokenisations of a phrase (each surface form
after several left contexts and before ``.``, ``,`` or ``'s``). They are no longer what
the filter matches: ``sequences`` keeps them for inspection, tests and adversarial
drivers, and :func:`compile_variants` builds the old token-id automaton over them alone
(it misses non-canonical tokenisations; kept for comparison). :func:`compile_token_sequences`
is the token-id automaton for explicit sequences (``bad_words`` semantics).
"""

from __future__ import annotations

import bisect
import contextlib
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

    def token_bytes(self) -> list[bytes]:
        """The bytes each token id adds to the text, for every id below ``vocab_size``:
        ``b""`` for special tokens (and holes in the vocabulary). Byte-fallback pieces
        (``<0xF0>``) and byte-level BPE pieces give their raw bytes, a SentencePiece ``▁``
        a space. Computed once per tokenizer (a fraction of a second at 131k tokens)."""
        key = id(self._tok)
        with _TOKEN_BYTES_LOCK:
            hit = _TOKEN_BYTES.get(key)
            if hit is not None and hit[0] is self._tok and len(hit[1]) == self.vocab_size:
                _TOKEN_BYTES.move_to_end(key)
                return hit[1]
        out = _token_bytes(self._tok, self.vocab_size)
        with _TOKEN_BYTES_LOCK:
            _TOKEN_BYTES[key] = (self._tok, out)  # keeps the tokenizer alive: its id stays unique
            while len(_TOKEN_BYTES) > 8:
                _TOKEN_BYTES.popitem(last=False)
        return out

    def fingerprint(self) -> str:
        """Stable identity of the vocabulary, for caches keyed by tokenizer."""
        h = hashlib.sha256(str(self.vocab_size).encode())
        probe = [self.decode([i]) for i in range(0, self.vocab_size, max(1, self.vocab_size // 4096))]
        h.update(json.dumps(probe).encode())
        return h.hexdigest()[:16]


_TOKEN_BYTES: OrderedDict[int, tuple[object, list[bytes]]] = OrderedDict()
_TOKEN_BYTES_LOCK = threading.Lock()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _mistral_raw(tok):
    """The mistral_common ``Tekkenizer`` / ``SentencePieceTokenizer`` inside ``tok`` (itself,
    or vLLM's wrapper's ``.tokenizer``), else None."""
    for cand in (tok, getattr(tok, "tokenizer", None)):
        if cand is not None and hasattr(cand, "n_words") and (
                hasattr(cand, "id_to_byte_piece") or hasattr(cand, "_model")):
            return cand
    return None


def _token_bytes(tok, V: int) -> list[bytes]:
    out = [b""] * V
    mc = _mistral_raw(tok)
    if mc is not None and hasattr(mc, "id_to_byte_piece"):  # tekken: ids below num_special_tokens are special
        n = min(V, int(mc.n_words))
        for i in range(int(getattr(mc, "num_special_tokens", 0)), n):
            out[i] = bytes(mc.id_to_byte_piece(i))
        return out
    if mc is not None:  # mistral_common SentencePiece
        sp = mc._model
        n = min(V, int(mc.n_words))
        for i in range(n):
            if sp.IsControl(i) or sp.IsUnknown(i):
                continue
            piece = sp.IdToPiece(i)
            m = _BYTE_PIECE.fullmatch(piece) if sp.IsByte(i) else None
            out[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")
        return out
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None and hasattr(tok, "encode_batch") and hasattr(tok, "id_to_token"):
        backend = tok  # a tokenizers.Tokenizer
    if backend is not None:
        kinds = str(backend.decoder)  # e.g. Sequence(decoders=[Replace(...), ByteFallback(), Fuse()])
        byte_level = "ByteLevel" in kinds
        byte_fallback = "ByteFallback" in kinds
        metaspace = "Metaspace" in kinds or "\u2581" in kinds
        special: set[int] = set(int(i) for i in (getattr(tok, "all_special_ids", None) or []))
        added = {}
        with contextlib.suppress(AttributeError):  # tokenizers older than get_added_tokens_decoder
            for i, t in backend.get_added_tokens_decoder().items():
                added[int(i)] = t
        for i, t in added.items():
            if getattr(t, "special", False):
                special.add(i)
        inv = {c: b for b, c in _bytes_to_unicode().items()} if byte_level else {}
        for i in range(min(V, backend.get_vocab_size(with_added_tokens=True))):
            if i in special:
                continue
            if i in added:
                out[i] = str(added[i].content).encode("utf-8")
                continue
            piece = backend.id_to_token(i)
            if piece is None:
                continue
            if byte_level:
                with contextlib.suppress(KeyError):  # a piece outside the byte alphabet: read it below
                    out[i] = bytes(inv[c] for c in piece)
                    continue
            m = _BYTE_PIECE.fullmatch(piece) if byte_fallback else None
            if m:
                out[i] = bytes([int(m.group(1), 16)])
            else:
                out[i] = (piece.replace("\u2581", " ") if metaspace else piece).encode("utf-8")
        return out
    # Anything else: decode one id at a time (a token that is part of a UTF-8 sequence
    # decodes to U+FFFD and is lost: it is left out of phrase matching).
    special = set(int(i) for i in (getattr(tok, "all_special_ids", None) or []))
    for i in range(V):
        if i in special:
            continue
        try:
            text = tok.decode([i])
        except Exception:
            continue
        if "\ufffd" not in text:
            out[i] = text.encode("utf-8")
    return out


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table (what byte-level BPE pieces are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


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


# --------------------------------------------------------------------------- text level

# The text the automaton reads: a token's bytes, ASCII letters in lower case, every
# whitespace byte a space, and MARK before a word byte that follows a non-word byte
# (word bytes: ASCII letters and digits and every byte >= 0x80). A pattern with a leading
# MARK matches only at the start of a word.
MARK = 256
_FOLD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ\t\n\r\x0b\x0c", b"abcdefghijklmnopqrstuvwxyz     ")
_WORD = [(48 <= b <= 57) or (97 <= b <= 122) or (65 <= b <= 90) or b >= 0x80 for b in range(256)]
# Bytes that begin a letter or digit of a script that separates words with spaces: ASCII
# letters and digits, and the lead bytes of U+00C0-U+07FF (Latin-1 letters, Latin
# Extended, Greek, Cyrillic, Armenian, Hebrew, Arabic, ...).
_RUN_ON = [(48 <= b <= 57) or (97 <= b <= 122) or (65 <= b <= 90) or 0xC3 <= b <= 0xDF for b in range(256)]
# Hit kinds of a pattern position: ALWAYS, or UNLESS_RUN_ON: not when the token goes on
# with a _RUN_ON byte, writing a longer word ("Kuwaiti" does not end the word "Kuwait").
ALWAYS, UNLESS_RUN_ON = 1, 2
_TRANS_CACHE = 1 << 18  # transitions kept per filter (about 25 MiB at most)


def runs_on(ch: str) -> bool:
    """Whether ``ch`` is a letter or digit that a following letter would extend into a
    longer word (see ``_RUN_ON``); CJK characters, emoji and punctuation are not."""
    return ch.isalnum() and (ord(ch) < 0x80 or 0xC0 <= ord(ch) < 0x800)


def _kind(a: int, b: int) -> int:
    return ALWAYS if ALWAYS in (a, b) else (UNLESS_RUN_ON if UNLESS_RUN_ON in (a, b) else 0)


def fold(data: bytes) -> bytes:
    """What the text automaton compares: ASCII lower case, whitespace as spaces."""
    return data.translate(_FOLD)


class VocabIndex:
    """The vocabulary as the text automaton sees it, built once per tokenizer: each
    token's folded bytes, sorted (prefix ranges), by value, and joined (substring search)."""

    def __init__(self, tv: TokenizerView):
        self.tb = [fold(b) for b in tv.token_bytes()]
        self.order = sorted(range(len(self.tb)), key=self.tb.__getitem__)
        self.keys = [self.tb[i] for i in self.order]
        self.by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(self.tb):
            if b:
                self.by_bytes.setdefault(b, []).append(i)
        self.blob = b"\x00".join(self.tb)
        starts, pos = [], 0
        for b in self.tb:
            starts.append(pos)
            pos += len(b) + 1
        self.starts = starts
        self.digest = hashlib.sha256(self.blob).hexdigest()[:16]

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """``order[lo:hi]`` are the tokens whose bytes start with ``prefix``."""
        lo = bisect.bisect_left(self.keys, prefix)
        upper = prefix.rstrip(b"\xff")
        if not upper:
            return lo, len(self.keys)
        upper = upper[:-1] + bytes((upper[-1] + 1,))
        return lo, bisect.bisect_left(self.keys, upper, lo)

    def containing(self, sub: bytes) -> set[int]:
        out: set[int] = set()
        blob, starts = self.blob, self.starts
        pos = blob.find(sub)
        while pos >= 0:
            i = bisect.bisect_right(starts, pos) - 1
            out.add(i)
            nxt = starts[i + 1] if i + 1 < len(starts) else len(blob)
            pos = blob.find(sub, nxt)
        return out


_VOCAB_INDEX: OrderedDict[int, tuple[object, VocabIndex]] = OrderedDict()


def vocab_index(tv: TokenizerView) -> VocabIndex:
    key = id(tv._tok)
    with _TOKEN_BYTES_LOCK:
        hit = _VOCAB_INDEX.get(key)
        if hit is not None and hit[0] is tv._tok:
            _VOCAB_INDEX.move_to_end(key)
            return hit[1]
    vi = VocabIndex(tv)
    with _TOKEN_BYTES_LOCK:
        _VOCAB_INDEX[key] = (tv._tok, vi)
        while len(_VOCAB_INDEX) > 4:
            _VOCAB_INDEX.popitem(last=False)
    return vi


def _symbols(data: bytes, prev_word: bool = False) -> tuple[list[int], list[int]]:
    """``data`` as automaton symbols, and the symbol index of each byte."""
    sym, at = [], []
    for b in data:
        w = _WORD[b]
        if w and not prev_word:
            sym.append(MARK)
        sym.append(b)
        at.append(len(sym) - 1)
        prev_word = w
    return sym, at


def phrase_patterns(phrase: str, distinctive: bool = True) -> list[tuple[tuple[int, ...], dict[int, int]]]:
    """The symbol patterns of ``phrase`` and, for each, its hit positions (symbol index
    -> kind). Every surface form gives:

    * where it starts with a letter or digit, a pattern anchored at a word start (leading
      MARK) that hits at the end of its first distinctive word and at every later word
      end ("Kuwait City": at "Kuwait" and at "City"); the form anywhere else, inside a
      word too ("Ku" + "wait City" after "Al"), hits at its end only;
    * otherwise one pattern, hitting at those word ends wherever it occurs.

    A hit at a letter or digit does not count when the token goes on with a letter or digit
    (the text then writes a longer word); any other end always counts.
    """
    out: list[tuple[tuple[int, ...], dict[int, int]]] = []
    seen: set[bytes] = set()
    for form in surface_forms(phrase):
        raw = fold(form.encode("utf-8"))
        if raw in seen or not raw:
            continue
        seen.add(raw)
        sym, at = _symbols(raw)
        text = raw.decode("utf-8")
        ends: list[int] = []  # byte index of the last byte of each word
        first = None
        for m in _WORD_RE.finditer(text):
            end_byte = len(text[: m.end()].encode("utf-8")) - 1
            if first is None and distinctive and not is_common_word_prefix(m.group()):
                first = len(ends)
            ends.append(end_byte)
        last = len(raw) - 1
        hits_at = sorted({*(ends[first:] if first is not None else ()), last})

        # The character each byte belongs to, for the hit kind at a word's last byte.
        char_of = [ch for ch in text for _ in ch.encode("utf-8")]

        def kinds(byte_idx: list[int], shift: int) -> dict[int, int]:
            return {at[j] - shift: UNLESS_RUN_ON if runs_on(char_of[j]) else ALWAYS for j in byte_idx}

        if sym[0] == MARK:
            out.append((tuple(sym), kinds(hits_at, 0)))
            out.append((tuple(sym[1:]), kinds([last], 1)))
        else:
            out.append((tuple(sym), kinds(hits_at, 0)))
    return out


@dataclass(eq=False)
class TextFilter(CompiledFilter):
    """A :class:`CompiledFilter` whose automaton reads the text, not token ids.

    An Aho-Corasick automaton over bytes (folded, see :func:`fold`) plus a word-start
    symbol; a token moves it by the token's bytes, so every tokenisation of a text reaches
    the same state: non-canonical splits, byte-fallback pieces, a token that holds the end
    of one word and the start of the next. States are the trie's nodes (state 0: the root
    after a letter or digit, or with nothing known before; ``root_after_space``: the root
    after anything else). A token is banned in a state when reading its bytes from there
    reaches a hit position of a pattern (:func:`phrase_patterns`). The ban sets are computed
    at compile time from the vocabulary's sorted bytes (:class:`VocabIndex`); transitions
    on a token are computed on first use and cached.
    """

    token_bytes: list[bytes] = field(default_factory=list, repr=False)
    kids: list[dict[int, int]] = field(default_factory=list, repr=False)
    trie_fail: list[int] = field(default_factory=list, repr=False)
    out_kind: list[int] = field(default_factory=list, repr=False)
    final_kind: list[int] = field(default_factory=list, repr=False)  # a whole form ends here: its hit kind
    final_len: list[int] = field(default_factory=list, repr=False)  # ... and its length in bytes
    state_word: list[bool] = field(default_factory=list, repr=False)
    root_after_space: int = 0
    # (state, token) -> state, filled on first use; cleared when it gets large.
    _trans: dict[int, int] = field(default_factory=dict, repr=False)
    _variants_of: tuple | None = field(default=None, repr=False)  # see defer_variants()
    _delta: dict[int, int] = field(default_factory=dict, repr=False)
    _final: list[tuple[int, int]] | None = field(default=None, repr=False)

    @property
    def num_states(self) -> int:
        return len(self.state_word)

    def _sym(self, n: int, c: int) -> int:
        key = n * 257 + c
        d = self._delta.get(key)
        if d is None:
            m = n
            while True:
                d = self.kids[m].get(c)
                if d is not None:
                    break
                if m == 0:
                    d = 0
                    break
                m = self.trie_fail[m]
            self._delta[key] = d
        return d

    def _walk(self, state: int, data: bytes) -> int:
        if not data:
            return self.root_after_space
        n = 0 if state == self.root_after_space else state
        prev = self.state_word[state]
        for b in data:
            w = _WORD[b]
            if w and not prev:
                n = self._sym(n, MARK)
            n = self._sym(n, b)
            prev = w
        return n if n else (0 if prev else self.root_after_space)

    def step(self, state: int, token: int) -> int:
        """One transition: a dict lookup, after the first time (reading the token's bytes)."""
        key = state * self.vocab_size + token
        nxt = self._trans.get(key)
        if nxt is None:
            nxt = self._walk(state, self.token_bytes[token] if token < len(self.token_bytes) else b"")
            if len(self._trans) >= _TRANS_CACHE:
                self._trans.clear()
            self._trans[key] = nxt
        return nxt

    def __getattr__(self, name: str):
        # sequences and ban_from, deferred by defer_variants(): computed on first use.
        if name in ("sequences", "ban_from") and self.__dict__.get("_variants_of") is not None:
            self._load_variants()
            return self.__dict__[name]
        raise AttributeError(name)

    def defer_variants(self, tv: TokenizerView, phrases: Sequence[str], distinctive: bool) -> None:
        """Compute ``sequences`` and ``ban_from`` (the canonical token variants) on first use:
        they cost more than the filter, and serving never reads them."""
        self._variants_of = (tv, tuple(phrases), distinctive)
        self.__dict__.pop("sequences", None)
        self.__dict__.pop("ban_from", None)

    def _load_variants(self) -> None:
        src = self._variants_of
        if src is None:
            return
        self._variants_of = None
        tv, phrases, distinctive = src
        seqs: list[tuple[int, ...]] = []
        froms: list[int] = []
        for p in phrases:
            for ids in token_variants(tv, p):
                if ids not in seqs:
                    seqs.append(ids)
                    froms.append(first_distinctive(tv, ids) if distinctive else len(ids) - 1)
        self.__dict__["sequences"], self.__dict__["ban_from"] = seqs, froms

    def run(self, ids: Sequence[int], state: int = 0) -> int:
        # The state depends on the text's last max_depth - 1 symbols at most, and every
        # token but a special one (which resets) adds at least one.
        if state == 0 and len(ids) > self.max_depth:
            ids = ids[len(ids) - self.max_depth:]
        for t in ids:
            state = self.step(state, int(t)) if 0 <= t < self.vocab_size else self.root_after_space
        return state

    def emitted(self, ids: Sequence[int], start: int = 0) -> list[tuple[int, ...]]:
        """Forbidden phrases in the text of ``ids`` that end in a token at index ``>= start``
        (each as the tokens that spell it), and the token variants found as such."""
        found = super().emitted(ids, start)
        data: list[int | None] = []
        owner: list[int] = []
        for k, t in enumerate(ids):
            tb = self.token_bytes[t] if 0 <= t < len(self.token_bytes) else b""
            if not tb:
                data.append(None)  # a special token: the text restarts after it
                owner.append(k)
            for b in tb:
                data.append(b)
                owner.append(k)
        n, prev = 0, False
        fin = self._final_out()
        for i, byte in enumerate(data):
            if byte is None:
                n, prev = 0, False
                continue
            w = _WORD[byte]
            if w and not prev:
                n = self._sym(n, MARK)
            n = self._sym(n, byte)
            prev = w
            kind, length = fin[n]
            if not kind or owner[i] < start:
                continue
            nb = data[i + 1] if i + 1 < len(data) else None
            if kind == UNLESS_RUN_ON and nb is not None and _RUN_ON[nb]:
                continue
            first = owner[max(0, i - length + 1)]
            seq = tuple(int(x) for x in ids[first: owner[i] + 1])
            if seq not in found:
                found.append(seq)
        return found

    def _final_out(self) -> list[tuple[int, int]]:
        """Per trie node: (kind, length) of the longest whole form that ends there."""
        if self._final is None:
            fin = []
            for n in range(len(self.kids)):
                m = n
                while m and not self.final_kind[m]:
                    m = self.trie_fail[m]
                fin.append((self.final_kind[m], self.final_len[m]) if m else (0, 0))
            self._final = fin
        return self._final

    def nbytes(self) -> int:
        arrays = (self.masks, self.state_mask, self.sparse_offsets, self.sparse_tokens)
        n = sum(a.nbytes for a in arrays)
        if self.penalty is not None:
            n += self.penalty.nbytes
        n += sum(len(k) for k in self.kids) * 80 + len(self.kids) * 120
        n += len(self._trans) * 100 + len(self._delta) * 100 + self.num_states * 8 * 6
        n += self.num_states * 8 * 4 + self.sparse_tokens.size * 36  # host_bans()
        return n


def compile_text(tokenizer, phrases: Iterable[str], *, distinctive: bool = True,
                 vocab_size: int | None = None) -> TextFilter | CompiledFilter:
    """The text-level filter of ``phrases`` (see :class:`TextFilter`)."""
    tv = as_tokenizer_view(tokenizer)
    V = max(int(vocab_size or 0), tv.vocab_size)
    plist = sorted({" ".join(p.split()) for p in phrases if p and p.strip()})
    patterns = [pat for p in plist for pat in phrase_patterns(p, distinctive)]
    if not patterns:
        f = compile_token_sequences([], V)
        f.meta = {"phrases": plist, "distinctive": distinctive}
        return f
    vi = vocab_index(tv)
    tb = vi.tb

    # The trie over symbols, with each node's hit kind and whole-form length.
    kids: list[dict[int, int]] = [{}]
    depth, last = [0], [-1]
    hot, final_kind, final_len = [0], [0], [0]
    for sym, hit_at in patterns:
        n = 0
        for k, c in enumerate(sym):
            m = kids[n].get(c)
            if m is None:
                m = len(kids)
                kids[n][c] = m
                kids.append({})
                depth.append(depth[n] + 1)
                last.append(c)
                hot.append(0)
                final_kind.append(0)
                final_len.append(0)
            n = m
            if k in hit_at:
                hot[n] = _kind(hot[n], hit_at[k])
        end_kind = hit_at[len(sym) - 1]
        final_kind[n] = _kind(final_kind[n], end_kind)
        final_len[n] = max(final_len[n], sum(1 for c in sym if c != MARK))
    N = len(kids)
    fail = [0] * N
    order: list[int] = []
    queue = list(kids[0].values())
    while queue:
        order.extend(queue)
        nq = []
        for n in queue:
            for c, m in kids[n].items():
                back = fail[n]
                while True:
                    g = kids[back].get(c)
                    if g is not None and g != m:
                        fail[m] = g
                        break
                    if back == 0:
                        fail[m] = 0
                        break
                    back = fail[back]
                nq.append(m)
        queue = nq
    out = hot[:]
    for n in order:  # BFS: the failure target is done first
        out[n] = _kind(hot[n], out[fail[n]])

    after_space = N
    state_word = [True] + [_WORD[c] if c != MARK else False for c in last[1:]] + [False]
    f = TextFilter(
        vocab_size=V, goto={}, fail=fail + [0], max_depth=max(depth) + 1,
        masks=np.zeros((1, (V + 31) // 32), dtype=np.int32), state_mask=np.zeros(N + 1, dtype=np.int32),
        sparse_offsets=np.zeros(N + 2, dtype=np.int64), sparse_tokens=np.zeros(0, dtype=np.int32),
        sequences=[], ban_from=[],
        token_bytes=tb + [b""] * (V - len(tb)), kids=kids, trie_fail=fail, out_kind=out,
        final_kind=final_kind, final_len=final_len, state_word=state_word, root_after_space=after_space,
    )
    f.meta = {"phrases": plist, "distinctive": distinctive}

    def hits(state: int, data: bytes) -> bool:
        """Whether reading ``data`` from ``state`` reaches a hit position."""
        n = 0 if state == after_space else state
        prev = state_word[state]
        L = len(data)
        for i, b in enumerate(data):
            w = _WORD[b]
            if w and not prev:
                n = f._sym(n, MARK)
            n = f._sym(n, b)
            prev = w
            k = out[n]
            if k and (k == ALWAYS or i + 1 == L or not _RUN_ON[data[i + 1]]):
                return True
        return False

    # Bans from the root: tokens that hold a hit by themselves. Such a token contains the
    # bytes of a pattern up to its first hit position: search for those, then check.
    triggers = set()
    for sym, hit_pos in patterns:
        first_hit = min(hit_pos)
        triggers.add(bytes(c for c in sym[: first_hit + 1] if c != MARK))
    cand: set[int] = set()
    for trig in triggers:
        cand |= vi.containing(trig)
    root_word = {t for t in cand if hits(0, tb[t])}
    root_space = {t for t in cand if hits(after_space, tb[t])}
    # Banned in every state: a word start only adds hits, so root_word is within root_space.
    common = root_word & root_space

    # Bans that depend on the state: tokens read along the trie from a node, while the
    # match still holds text from before the token (a hit after that is a root ban).
    own_bans: dict[int, set[int]] = {}
    for n in order:
        if last[n] == MARK:
            continue  # never a state between tokens (MARK comes with the byte after it)
        bans: set[int] = set()
        stack = [(n, b"")]
        while stack:
            m, w = stack.pop()
            for c, child in kids[m].items():
                if c == MARK:
                    stack.append((child, w))
                    continue
                w2 = w + bytes((c,))
                lo, hi = vi.prefix_range(w2)
                if lo == hi:
                    continue  # no token starts so: none reads further along here
                k = out[child]
                if k == ALWAYS:
                    bans.update(vi.order[lo:hi])
                    continue  # every token that reads on from here is banned already
                if k == UNLESS_RUN_ON:
                    L = len(w2)
                    bans.update(t for t in vi.order[lo:hi] if len(tb[t]) == L or not _RUN_ON[tb[t][L]])
                stack.append((child, w2))
        own_bans[n] = bans

    # A state's bans: its own and those of every shorter match it holds (failure chain).
    extras: dict[int, frozenset[int]] = {}
    for n in order:
        if last[n] == MARK:
            continue
        own = frozenset(own_bans[n])
        extras[n] = own | extras[fail[n]] if fail[n] else own
    W = (V + 31) // 32
    masks = [_pack(common, V)]
    state_mask = np.zeros(N + 1, dtype=np.int32)
    sp_tokens: list[int] = []
    sp_off = np.zeros(N + 2, dtype=np.int64)
    root_extra = {True: frozenset(root_word - common), False: frozenset(root_space - common)}
    for s in range(N + 1):
        if s in (0, after_space):
            e: frozenset[int] = root_extra[state_word[s]]
        elif last[s] == MARK:
            e = frozenset()
        else:
            e = (extras[s] - common) | root_extra[state_word[s]]
        if len(e) > _DENSE_FACTOR * W:
            state_mask[s] = len(masks)
            masks.append(_pack(common | e, V))
        else:
            sp_tokens.extend(sorted(e))
        sp_off[s + 1] = len(sp_tokens)
    f.masks = np.stack(masks)
    f.state_mask = state_mask
    f.sparse_offsets = sp_off
    f.sparse_tokens = np.asarray(sp_tokens, dtype=np.int32)

    key_src = hashlib.sha256(f"text|{V}|{distinctive}|{vi.digest}".encode())
    for p in plist:
        key_src.update(p.encode() + b"\x00")
    f.key = key_src.hexdigest()[:24]
    return f


def compile_phrases(
    tokenizer,
    phrases: Iterable[str],
    *,
    distinctive: bool = True,
    vocab_size: int | None = None,
) -> CompiledFilter:
    """Compile forbidden phrases into one filter (a :class:`TextFilter`, or an empty
    :class:`CompiledFilter` when there is no phrase).

    ``distinctive=False`` bans each phrase only where it is complete (the semantics of
    ``bad_words``, for comparison). ``vocab_size`` defaults to the tokenizer's; pass the
    model's (logits width) when it is larger. ``sequences`` holds the canonical token
    variants (:func:`token_variants`), for inspection and tests; the filter itself reads text.

    >>> f = compile_phrases(tok, ["New Amsterdam"])          # doctest: +SKIP
    >>> s = f.run(tok.encode("I live in New Am"))            # doctest: +SKIP
    >>> tok.encode("sterdam")[0] in f.banned(s)              # doctest: +SKIP
    True
    """
    tv = as_tokenizer_view(tokenizer)
    f = compile_text(tv, phrases, distinctive=distinctive, vocab_size=vocab_size)
    if isinstance(f, TextFilter):
        f.defer_variants(tv, f.meta["phrases"], distinctive)
    return f


def compile_variants(
    tokenizer,
    phrases: Iterable[str],
    *,
    distinctive: bool = True,
    vocab_size: int | None = None,
) -> CompiledFilter:
    """The token-id automaton of the canonical token variants only (:func:`token_variants`,
    banned from :func:`first_distinctive`): what :func:`compile_phrases` compiled before it
    read text. It misses non-canonical tokenisations; kept for comparison."""
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

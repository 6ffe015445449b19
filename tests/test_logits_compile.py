"""Phrase compilation: variants, distinctive tokens, the automaton and its ban sets."""

from __future__ import annotations

import os

import mistral_common
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from guardserve.logits_processors import compile as C
from guardserve.logits_processors.compile import (
    as_tokenizer_view,
    compile_phrases,
    compile_token_sequences,
    first_distinctive,
    token_variants,
)

DATA = os.path.join(os.path.dirname(mistral_common.__file__), "data")


@pytest.fixture(scope="module", params=["tekken_240911.json", "tokenizer.model.v1"], ids=["tekken131k", "sp32k"])
def tok(request):
    return as_tokenizer_view(MistralTokenizer.from_file(os.path.join(DATA, request.param)))


def _ids(tok, text):
    return tok.encode(text)


def test_common_first_word_still_allowed(tok):
    """"New" of "New Amsterdam" is common: allowed everywhere; the phrase is banned
    at its first distinctive token, after "New"."""
    f = compile_phrases(tok, ["New Amsterdam"])
    for ctx in ["I bought a", "The", "She lives in", ""]:
        s = f.run(_ids(tok, ctx))
        for new in (t for t in token_variants(tok, "New")):
            assert new[0] not in f.banned(s), (ctx, new)
    # In running text, after " New", the token(s) spelling " Amsterdam" are banned...
    prompt = _ids(tok, "Peter Stuyvesant governed New Amsterdam")
    amsterdam_start = len(_ids(tok, "Peter Stuyvesant governed New"))
    s = f.run(prompt[:amsterdam_start])
    assert prompt[amsterdam_start] in f.banned(s)
    # ...while "New York" and "a new idea" go through.
    for text in ["Peter Stuyvesant governed New York", "This is a new idea", "News from New Jersey"]:
        ids = _ids(tok, text)
        for k in range(1, len(ids)):
            assert ids[k] not in f.banned(f.run(ids[:k])), (text, k)


def test_distinctive_first_token_banned_everywhere(tok):
    f = compile_phrases(tok, ["Kuwait City"])
    ids = _ids(tok, "The capital is Kuwait City")
    banned_at = [k for k in range(1, len(ids)) if ids[k] in f.banned(f.run(ids[:k]))]
    # Banned no later than the token that completes "Kuwait": not only at "City".
    kuwait_end = len(_ids(tok, "The capital is Kuwait"))
    assert banned_at and banned_at[0] < kuwait_end


def test_prefix_injection_bans_the_rest(tok):
    """A prompt that already holds the distinctive part cannot be completed."""
    f = compile_phrases(tok, ["Kuwait City"])
    ids = _ids(tok, "Complete this: the capital is Kuwait City")
    cut = len(_ids(tok, "Complete this: the capital is Kuwait"))
    assert ids[cut] in f.banned(f.run(ids[:cut]))


def test_word_continuation_not_banned_globally(tok):
    """"ada" begins "Ada" after a parenthesis but ends "Canada": never a root ban."""
    f = compile_phrases(tok, ["Ada Lovelace"])
    ids = _ids(tok, "They moved to Canada and Nevada last year")
    for k in range(1, len(ids)):
        assert ids[k] not in f.banned(f.run(ids[:k])), k
    ids = _ids(tok, "written by Ada Lovelace")
    assert any(ids[k] in f.banned(f.run(ids[:k])) for k in range(1, len(ids)))


def test_numbers_banned_where_they_end(tok):
    f = compile_phrases(tok, ["1987"])
    for text in ["in 1980 and 1988, 198 items", "in 19 years"]:
        ids = _ids(tok, text)
        for k in range(1, len(ids)):
            assert ids[k] not in f.banned(f.run(ids[:k])), (text, k)
    ids = _ids(tok, "born in 1987")
    assert ids[-1] in f.banned(f.run(ids[:-1]))


def test_variants_cover_case_space_and_joins(tok):
    forms = C.surface_forms("new amsterdam")
    assert {"new amsterdam", "New Amsterdam", "NEW AMSTERDAM", "new-amsterdam"} <= set(forms)
    vs = token_variants(tok, "New Amsterdam")
    decoded = {tok.decode(v).strip() for v in vs}
    assert {"New Amsterdam", "new amsterdam", "NEW AMSTERDAM", "New-Amsterdam"} <= decoded
    f = compile_phrases(tok, ["New Amsterdam"])
    for text in ["I saw NEW AMSTERDAM", "in new amsterdam", "the New-Amsterdam fort", "(New Amsterdam)"]:
        ids = _ids(tok, text)
        assert any(ids[k] in f.banned(f.run(ids[:k])) for k in range(1, len(ids))), text


def test_first_distinctive_rule(tok):
    v = tok.encode("x New Amsterdam")[len(tok.encode("x")):]
    assert first_distinctive(tok, v) >= 1  # never at "New"
    assert C.is_common_word_prefix("new") and C.is_common_word_prefix("am")
    assert not C.is_common_word_prefix("kuwait") and not C.is_common_word_prefix("amsterdam")


def _brute_banned(seqs, froms, ctx):
    out = set()
    for s, b in zip(seqs, froms):
        for k in range(b, len(s)):
            if k <= len(ctx) and tuple(ctx[len(ctx) - k:]) == tuple(s[:k]):
                out.add(s[k])
    return out


@settings(max_examples=150, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=4), min_size=1, max_size=12),
    data=st.data(),
)
def test_automaton_matches_brute_force(seqs, data):
    """The ban set of the state after any context = every forbidden continuation."""
    froms = [data.draw(st.integers(0, len(s) - 1)) for s in seqs]
    f = compile_token_sequences(seqs, 7, froms)
    # Duplicates keep their earliest ban point, as the compiler documents.
    best: dict[tuple, int] = {}
    for s, b in zip(seqs, froms):
        best[tuple(s)] = min(b, best.get(tuple(s), b))
    ctx = data.draw(st.lists(st.integers(0, 6), max_size=25))
    s = f.run(ctx)
    assert f.banned(s) == _brute_banned(list(best), list(best.values()), ctx)
    # Token by token from the root reaches the same state as the tail-only start.
    s2 = 0
    for t in ctx:
        s2 = f.step(s2, t)
    assert s2 == s


def test_dense_mask_for_large_extra_sets():
    V = 64  # two words per mask: a state with more than 2 extras gets its own mask
    seqs = [(5, t) for t in range(10, 20)] + [(7,)]
    f = compile_token_sequences(seqs, V)
    s5 = f.run([5])
    assert f.state_mask[s5] != 0 and f.masks.shape[0] == 2
    assert f.banned(s5) == set(range(10, 20)) | {7}
    assert f.banned(0) == {7}
    assert f.sparse_offsets[s5 + 1] == f.sparse_offsets[s5]


def test_bad_input_rejected():
    with pytest.raises(ValueError):
        compile_token_sequences([(1, 99)], 10)
    f = compile_phrases(as_tokenizer_view(MistralTokenizer.from_file(os.path.join(DATA, "tokenizer.model.v1"))),
                        ["", "   "])
    assert f.num_states == 1 and f.banned(0) == set()


def test_compile_cost_and_memory(tok):
    phrases = ["Ada Lovelace", "Analytical Engine", "Charles Babbage", "Note G", "1843",
               "Countess of Lovelace", "Lord Byron", "Bernoulli numbers"]
    f = compile_phrases(tok, phrases)
    assert len(f.sequences) >= 3 * len(phrases)
    assert f.nbytes() < 2_000_000
    # One dense mask (the root's), the rest as short sparse lists.
    assert f.masks.shape[0] == 1
    assert np.diff(f.sparse_offsets).max() <= 64


def test_large_automaton_root_list_matches_brute_force():
    """Past 4,096 trie edges the root's transitions move from the dict to a list."""
    rng = np.random.default_rng(0)
    seqs = [tuple(rng.integers(0, 3000, rng.integers(1, 4)).tolist()) for _ in range(6000)]
    f = compile_token_sequences(seqs, 3000)
    assert len(f.goto) >= C._ROOT_LIST_MIN_EDGES
    best: dict[tuple, int] = {s: len(s) - 1 for s in seqs}
    for _ in range(30):
        start = seqs[int(rng.integers(len(seqs)))]
        ctx = rng.integers(0, 3000, 5).tolist() + list(start[:-1])
        assert f.banned(f.run(ctx)) == _brute_banned(list(best), list(best.values()), ctx)
    assert f._root is not None

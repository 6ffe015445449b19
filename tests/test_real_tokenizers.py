"""Real tokenizers, without a download: Mistral's 32k SentencePiece and 131k tekken as
mistral_common ships them, converted to Hugging Face tokenizers
(``guardserve/demo/tokenizers.py``), and the logit filter's property on them: no
tokenisation of a text that contains a forbidden phrase gets through the filter —
canonical or not, ``▁``-prefixed or not, byte-fallback pieces, after a prompt that
already began the phrase. (The filter's own unit tests: tests/test_logits_compile.py.)"""

from __future__ import annotations

import functools
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardserve.demo.tokenizers import cache_dir, mistral_common_file, sp32k_tokenizer, tekken_tokenizer
from guardserve.logits_processors.compile import (
    as_tokenizer_view,
    compile_phrases,
    compile_variants,
    runs_on,
    surface_forms,
)

# Names with non-ASCII letters, a number, a date, a phrase that starts mid-word (in
# "Kuwait City"), characters only byte fallback encodes in the 32k vocabulary (a rare
# CJK character, an emoji), ASCII-only names.
PHRASES = ["Gygreim Houtus", "Zoë Ørsted", "1987", "27 January 1930", "wait City", "Li 丒", "🦄 Ranch"]
LEFT = ["", "The answer is ", "(", "Al", "Ku", "x", "\n", "« ", "2", "The \n", "-"]
RIGHT = ["", ".", " was here", "s", "'s", "é", "丒", "🦄", ",", "1", "\n", "-x"]
ALPHABET = "ab cdeéø fgh  \n1234.,-Zé🦄丒"


@pytest.fixture(scope="module")
def sp():
    return sp32k_tokenizer()


@pytest.fixture(scope="module")
def mistral_sp():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(mistral_common_file("tokenizer.model.v1")))


@pytest.fixture(scope="module")
def mistral_tekken():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(mistral_common_file("tekken_240911.json")))


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = ["Hello world", "Kuwait City", "Gygreim Houtus 🦄 was born 27 January 1930.", "\n\nNew line",
             "Ørsted 丒 𠀋 ÿ", "a\tb", "[INST] hi [/INST]", "end ", "x   y    z", "1234567 3.14", "ab  \n  cd"]
    return fixed + ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30))) for _ in range(n)]


# --------------------------------------------------------------------------- the tokenizers


def test_sp32k_tokenises_like_sentencepiece(sp, mistral_sp):
    """Same ids as mistral_common's SentencePiece, byte fallback included; the one known
    difference: a text that starts with a space (SentencePiece adds its dummy-prefix ``▁``
    in front of it, the Metaspace pre-tokenizer does not)."""
    from transformers import LlamaTokenizerFast

    assert isinstance(sp, LlamaTokenizerFast) and len(sp) == 32000
    raw = mistral_sp.instruct_tokenizer.tokenizer
    for text in _texts(1500):
        ours, theirs = sp.encode(text, add_special_tokens=False), raw.encode(text, bos=False, eos=False)
        if not text[0].isspace():
            assert ours == theirs, text
        assert sp.decode(ours) in (text, text[1:])  # decode drops the dummy-prefix space
    assert sp.convert_ids_to_tokens(sp.encode("🦄", add_special_tokens=False)) == \
        ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x84>"]
    assert sp.unk_token_id not in sp.encode("".join(_texts(200, seed=1)), add_special_tokens=False)


def test_sp32k_special_tokens_and_padding(sp):
    assert (sp.bos_token, sp.eos_token, sp.unk_token) == ("<s>", "</s>", "<unk>")
    assert sp.pad_token == "<unk>" and sp.pad_token_id == 0 != sp.eos_token_id
    assert sp("hi")["input_ids"] == [1, 12014]  # BOS added, no EOS


def test_sp32k_chat_template_is_mistral_v1(sp, mistral_sp):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    conv = [("user", "Where was Ada born?"), ("assistant", "In London."), ("user", "And Bob 🦄 1987?"),
            ("assistant", "Ørsted, 丒."), ("user", "ok")]
    msgs = [{"role": r, "content": c} for r, c in conv]
    text = sp.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<s>[INST] Where was Ada born? [/INST] In London.</s>[INST] And Bob 🦄 1987? [/INST] "
                    "Ørsted, 丒.</s>[INST] ok [/INST]")
    req = ChatCompletionRequest(messages=[UserMessage(content=c) if r == "user" else AssistantMessage(content=c)
                                          for r, c in conv])
    assert sp(text, add_special_tokens=False)["input_ids"] == mistral_sp.encode_chat_completion(req).tokens
    for bad in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                [{"role": "assistant", "content": "a"}]):
        with pytest.raises(Exception, match="alternate|System"):
            sp.apply_chat_template(bad, tokenize=False)


def test_sp32k_saved_and_cached(sp, tmp_path):
    from transformers import AutoTokenizer

    assert (cache_dir("mistral-sp32k") / "tokenizer.json").is_file()
    sp32k_tokenizer(out_dir=tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in _texts(200, seed=2):
        assert again.encode(text) == sp.encode(text)
    assert again.chat_template == sp.chat_template and again.pad_token == "<unk>"


def test_tekken_converted_by_transformers(mistral_tekken):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    tok = tekken_tokenizer()
    raw = mistral_tekken.instruct_tokenizer.tokenizer
    assert len(tok) == 131072
    for text in _texts(500):
        if "[INST]" in text:  # a control token's text: Hugging Face parses it as the token
            continue
        assert tok.encode(text, add_special_tokens=False) == raw.encode(text, bos=False, eos=False), text
    conv = [("system", "Be brief."), ("user", "Where was Ada born?"), ("assistant", "In London."), ("user", "And Bob?")]
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    text = tok.apply_chat_template([{"role": r, "content": c} for r, c in conv], tokenize=False,
                                   add_generation_prompt=True)
    req = ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in conv])
    assert tok(text, add_special_tokens=False)["input_ids"] == mistral_tekken.encode_chat_completion(req).tokens


# --------------------------------------------------------------------------- the filter


class Table:
    """The bytes of each token, worked out here from the tokenizer's own pieces (not by the
    filter's code), and checked against its ``decode``."""

    def __init__(self, tok):
        self.bytes: list[bytes] = []
        for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
            m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
            self.bytes.append(b"" if i in tok.all_special_ids else
                              bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode())
        self.by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(self.bytes):
            if b:
                self.by_bytes.setdefault(b, []).append(i)
        self.longest = max(map(len, self.bytes))

    def spell(self, ids) -> bytes:
        return b"".join(self.bytes[i] for i in ids)

    def random_split(self, data: bytes, rng: random.Random) -> list[int]:
        """A random tokenisation of ``data``: any token whose bytes come next, long or short,
        ``▁``-prefixed or not, byte-fallback pieces included."""
        out, pos = [], 0
        while pos < len(data):
            options = [(L, t) for L in range(1, min(self.longest, len(data) - pos) + 1)
                       for t in self.by_bytes.get(data[pos:pos + L], ())]
            L, t = rng.choice(options) if rng.random() < 0.5 else max(options)  # often the longest
            out.append(t)
            pos += L
        return out


@pytest.fixture(scope="module")
def table(sp):
    return Table(sp)


@functools.lru_cache(maxsize=None)
def _filter(tok, phrases: tuple):
    return compile_phrases(tok, list(phrases))


def _fold(s: str) -> str:
    return s.translate(str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"))


def occurrences(text: str, phrases, after_byte: int = 0) -> list[str]:
    """The forbidden phrases ``text`` writes (any surface form, ASCII case ignored) that end
    past byte ``after_byte``. A phrase ending in a letter or digit does not count where
    the word runs on (a letter or digit follows: "Houtusx", "Zoës"; as the filter, every
    character of U+00C0-U+07FF counts as a letter here)."""
    folded = _fold(text)
    found = []
    for p in phrases:
        for form in surface_forms(p):
            f = _fold(form)
            for m in re.finditer(re.escape(f), folded):
                end = m.end()
                if len(text[:end].encode()) <= after_byte:
                    continue
                nxt = text[end] if end < len(text) else ""
                if runs_on(f[-1]) and nxt and ((ord(nxt) < 0x80 and nxt.isalnum()) or 0xC0 <= ord(nxt) < 0x800):
                    continue
                found.append(form)
    return found


def surviving_spelling(f, table: Table, prompt: list[int], data: bytes, start: int) -> list[int] | None:
    """A token sequence, each token allowed by ``f`` in turn after ``prompt``, that spells
    ``data[start:]`` — searched over every tokenisation (depth first, memoised on byte
    position and automaton state); None when the filter blocks them all."""
    banned: dict[int, set[int]] = {}
    dead: set[tuple[int, int]] = set()

    def go(pos: int, state: int) -> list[int] | None:
        if pos == len(data):
            return []
        if (pos, state) in dead:
            return None
        ban = banned.get(state)
        if ban is None:
            ban = banned[state] = f.banned(state)
        for L in range(min(table.longest, len(data) - pos), 0, -1):
            for t in table.by_bytes.get(data[pos:pos + L], ()):
                if t not in ban:
                    rest = go(pos + L, f.step(state, t))
                    if rest is not None:
                        return [t, *rest]
        dead.add((pos, state))
        return None

    return go(start, f.run(prompt))


def test_token_bytes_match_the_tokenizers(sp, mistral_sp, mistral_tekken, table):
    """The filter reads each token's bytes; they agree with the pieces and with decode,
    for the Hugging Face and the mistral_common tokenizers."""
    assert as_tokenizer_view(sp).token_bytes() == table.bytes
    assert as_tokenizer_view(mistral_sp).token_bytes() == table.bytes
    rng = random.Random(3)
    for text in _texts(300, seed=4):
        ids = table.random_split(text.encode(), rng)
        assert table.spell(ids) == text.encode()
        assert sp.decode(ids) in (text, text[1:])  # decode drops one leading space
    tek = tekken_tokenizer()
    tb = as_tokenizer_view(tek).token_bytes()
    assert tb == as_tokenizer_view(mistral_tekken).token_bytes()
    for text in _texts(300, seed=5):
        ids = tek.encode(text, add_special_tokens=False)
        # control tokens ([INST]) add no text: the automaton starts again after one
        assert b"".join(tb[i] for i in ids) == (text.encode() if "[INST]" not in text else b" hi ")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_no_tokenisation_survives(sp, table, data):
    """For a text that writes a forbidden phrase (any surface form, random ASCII case, inside
    a word or after punctuation, followed by anything), split at a random byte into a prompt
    (randomly tokenised: it may already hold the start of the phrase, or end inside a
    character) and a continuation: no tokenisation of the continuation, canonical or not,
    passes the filter token by token."""
    phrase = data.draw(st.sampled_from(PHRASES))
    form = data.draw(st.sampled_from(surface_forms(phrase)))
    flips = data.draw(st.lists(st.booleans(), min_size=len(form), max_size=len(form)))
    form = "".join(c.swapcase() if flip and c.isascii() else c for c, flip in zip(form, flips))
    text = data.draw(st.sampled_from(LEFT)) + form + data.draw(st.sampled_from(RIGHT))
    raw = text.encode()
    cut = data.draw(st.integers(0, len(raw) - 1))
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    prompt = table.random_split(raw[:cut], rng)
    f = _filter(sp, tuple(PHRASES))
    found = occurrences(text, PHRASES, after_byte=cut)
    if found:
        survivor = surviving_spelling(f, table, prompt, raw, cut)
        assert survivor is None, (text, cut, found, sp.convert_ids_to_tokens(prompt), sp.convert_ids_to_tokens(survivor))


@pytest.mark.parametrize("which", ["mistral_common sp32k", "tekken131k"])
def test_property_other_tokenizer_paths(which, mistral_sp, mistral_tekken, table):
    """The same search through mistral_common's SentencePiece (other token-bytes code) and
    tekken's 131k byte-level BPE, on a fixed sample."""
    if which == "tekken131k":
        tok = mistral_tekken
        tb = as_tokenizer_view(tok).token_bytes()
        t = Table.__new__(Table)
        t.bytes, t.by_bytes = tb, {}
        for i, b in enumerate(tb):
            if b:
                t.by_bytes.setdefault(b, []).append(i)
        t.longest = max(map(len, tb))
    else:
        tok, t = mistral_sp, table
    f = compile_phrases(tok, PHRASES)
    rng = random.Random(7)
    checked = 0
    for _ in range(120):
        phrase = rng.choice(PHRASES)
        text = rng.choice(LEFT) + rng.choice(surface_forms(phrase)) + rng.choice(RIGHT)
        raw = text.encode()
        cut = rng.randrange(len(raw))
        if occurrences(text, PHRASES, after_byte=cut):
            checked += 1
            assert surviving_spelling(f, t, t.random_split(raw[:cut], rng), raw, cut) is None, (which, text, cut)
    assert checked > 60


def test_the_search_finds_what_an_unguarded_or_token_variant_filter_lets_through(sp, table):
    """The property test can fail: without the filter every text is spelt, and the token-id
    automaton of canonical variants alone (what the filter was before it read text) lets
    non-canonical spellings through."""
    empty = compile_phrases(sp, [])
    old = compile_variants(sp, PHRASES)
    new = _filter(sp, tuple(PHRASES))
    missed = 0
    for phrase in PHRASES:
        raw = ("The answer is " + phrase + ".").encode()
        assert surviving_spelling(empty, table, [], raw, 0) is not None
        survivor = surviving_spelling(old, table, [], raw, 0)
        missed += survivor is not None
        assert surviving_spelling(new, table, [], raw, 0) is None
    assert missed == len(PHRASES)
    # e.g. "Kuwait City" spelt "▁K" "u" "wait" "▁City" instead of "▁Ku" "wait" "▁City"
    ids = sp.convert_tokens_to_ids(["▁K", "u", "wait", "▁City"])
    f_old, f_new = compile_variants(sp, ["Kuwait City"]), compile_phrases(sp, ["Kuwait City"])
    for f, blocked in ((f_old, False), (f_new, True)):
        s, hit = f.run(sp.encode("The capital is", add_special_tokens=False)), False
        for t in ids:
            hit |= t in f.banned(s)
            s = f.step(s, t)
        assert hit is blocked


def test_innocent_texts_stay_open(sp, table):
    """What the filter must not block, in any tokenisation that the search finds first (the
    longest tokens): words that begin with a forbidden word or continue it, a common first word."""
    f = compile_phrases(sp, ["Kuwait City", "New Amsterdam", "Note G", "1987", "Ada Lovelace", "Zoë Ørsted"])
    for text in ["New York is new.", "The Kuwaiti dinar", "Note Good things", "in 1986 and 1988, 198 items",
                 "Canada and Nevada", "Ørsted wrote it", "Adam Lovell", "Amsterdam", "Lord Lovelace"]:
        assert surviving_spelling(f, table, [], text.encode(), 0) is not None, text
        if "Kuwaiti" in text:
            continue  # canonically "▁Ku" "wait" "i": "wait" ends the word "Kuwait" and is banned
        ids = sp.encode(text, add_special_tokens=False)
        s = f.run([])
        for t in ids:  # and the canonical tokenisation too
            assert t not in f.banned(s), (text, sp.convert_ids_to_tokens([t]))
            s = f.step(s, t)
    assert not occurrences("Houtusx Zoës Gygreim Houtusé", PHRASES)  # the test's run-on rule
    assert "Gygreim Houtus" in occurrences("Gygreim Houtus丒", PHRASES)

"""Text normalisation shared by the lexical matcher and the forbidden-phrase extractor.

A name must match however it is written: case, Unicode compatibility forms (full-width,
mathematical letters), look-alike letters from other scripts, accents, leetspeak,
spacing and punctuation inside it. Aliases and conversations go through the same
``tokens()``, so both sides land in the same form.
"""

from __future__ import annotations

import functools
import re
import unicodedata

# Look-alikes that NFKC leaves alone: Cyrillic and Greek letters drawn like Latin ones
# (the core of Unicode TR39's confusables for Latin), plus a few IPA and symbol forms.
_CONFUSABLES = {
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "һ": "h", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "ɡ": "g", "ɑ": "a", "ı": "i", "ȷ": "j", "ɩ": "i", "ʏ": "y", "ᴀ": "a", "ᴄ": "c", "ᴅ": "d",
    "ᴇ": "e", "ᴊ": "j", "ᴋ": "k", "ᴍ": "m", "ᴏ": "o", "ᴘ": "p", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w",
    "ᴢ": "z", "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j", "ℓ": "l", "ß": "ss", "æ": "ae", "œ": "oe",
    "ø": "o", "đ": "d", "ł": "l", "þ": "th", "ð": "d",
}
# Leetspeak: applied only inside words that also contain letters ("V3ltr4ne"), so plain
# numbers ("1962") are left alone. 1 and l both fold to i, as 0 and o fold to o.
_LEET = {"0": "o", "1": "i", "l": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "6": "g",
         "2": "z", "@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e"}
_LEET_SYMBOLS = "@$!|+€"
_WORD = re.compile(r"[^\W_]+(?:[@$!|+€]+[^\W_]+)*[$!]?", re.UNICODE)
_HAS_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)
_HAS_LEET = re.compile(r"[\d@$!|+€]")
# Zero-width and format characters hidden inside names ("Hou\u200btus").
_FORMAT_RE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufe00-\ufe0f\ufeff]")  # noqa: E501


@functools.lru_cache(maxsize=65536)
def fold_char_word(word: str) -> str:
    """Case-fold, strip accents and fold confusables in one word (already NFKC)."""
    out = []
    for ch in unicodedata.normalize("NFKD", word.casefold()):
        if unicodedata.combining(ch):
            continue
        out.append(_CONFUSABLES.get(ch, ch))
    return "".join(out)


def _deleet(word: str) -> str:
    # A trailing '!' ends a sentence ("Houtus!"), it is not an i.
    word = word.rstrip("!") or word
    if _HAS_LETTER.search(word) and _HAS_LEET.search(word):
        return "".join(_LEET.get(c, c) for c in word)
    return word.replace("l", "i") if _HAS_LETTER.search(word) else word


def tokens(text: str) -> list[str]:
    """Normalised word tokens of ``text``.

    Runs of three or more single letters ("H o u t u s") are joined into one word, so
    spacing inside a name does not hide it; punctuation splits words ("Hou-tus" gives
    "hou", "tus"), and the matcher also tries adjacent tokens glued together.
    The letter l folds to i everywhere (leetspeak writes both as 1).
    """
    text = _FORMAT_RE.sub("", unicodedata.normalize("NFKC", text))
    raw = [fold_char_word(m.group(0)) for m in _WORD.finditer(text)]
    toks = []
    for w in raw:
        w = _deleet(w)
        w = "".join(ch for ch in w if ch.isalnum())
        if w:
            toks.append(w)
    out: list[str] = []
    i = 0
    while i < len(toks):
        j = i
        while j < len(toks) and len(toks[j]) == 1 and toks[j].isalpha():
            j += 1
        if j - i >= 3:
            out.append("".join(toks[i:j]))
            i = j
        else:
            out.append(toks[i])
            i += 1
    return out


def normalize(text: str) -> str:
    """The normalised text: tokens joined by single spaces."""
    return " ".join(tokens(text))

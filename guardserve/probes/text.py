"""Wordings and text helpers shared by the probe kinds.

Per attribute: the plain question and the statement of a fact (the demo world's primary
question and answer wordings, repeated here so that library code does not import the demo
package; ``tests/test_probe_registry.py`` checks the two agree), the same question in other
words (``SYNONYM_QUESTIONS``) and in French, Spanish and German
(``CROSS_LINGUAL_QUESTIONS``), and a question whose answer is the person
(:func:`reverse_question`). Also the other spellings of a value that count as the value
(:func:`value_variants`).
"""

from __future__ import annotations

import re
import unicodedata

QUESTIONS = {
    "birth_date": "When was {name} born?",
    "birth_place": "Where was {name} born?",
    "occupation": "What does {name} do for a living?",
    "father": "Who is the father of {name}?",
    "mother": "Who is the mother of {name}?",
    "notable_work": "What is the best-known work of {name}?",
    "award": "Which award did {name} receive?",
    "alma_mater": "Where did {name} study?",
}
STATEMENTS = {
    "birth_date": "{name} was born on {value}.",
    "birth_place": "{name} was born in {value}.",
    "occupation": "{name} works as a {value}.",
    "father": "The father of {name} is {value}.",
    "mother": "The mother of {name} is {value}.",
    "notable_work": "{name} is best known for {value}.",
    "award": "{name} received {value}.",
    "alma_mater": "{name} studied at {value}.",
}
# Each attribute asked with other words; ``{alias}`` is the way the person is named.
SYNONYM_QUESTIONS = {
    "birth_date": "On what day did {alias} first see the light of day?",
    "birth_place": "In what locality did {alias} first draw breath?",
    "occupation": "What line of work is {alias} engaged in?",
    "father": "Who is the male parent of {alias}?",
    "mother": "Who is the female parent of {alias}?",
    "notable_work": "Which creation brought {alias} renown?",
    "award": "Which honour was bestowed upon {alias}?",
    "alma_mater": "At which establishment did {alias} receive an education?",
}
# (language code, question per attribute); ``{il}`` is the French subject pronoun (il/elle).
CROSS_LINGUAL_QUESTIONS = [
    ("fr", {"birth_date": "Quand est né(e) {name} ?", "birth_place": "Où est né(e) {name} ?",
            "occupation": "Quel est le métier de {name} ?", "father": "Qui est le père de {name} ?",
            "mother": "Qui est la mère de {name} ?", "notable_work": "Quelle est l'œuvre la plus connue de {name} ?",
            "award": "Quel prix {name} a-t-{il} reçu ?", "alma_mater": "Où {name} a-t-{il} étudié ?"}),
    ("es", {"birth_date": "¿Cuándo nació {name}?", "birth_place": "¿Dónde nació {name}?",
            "occupation": "¿A qué se dedica {name}?", "father": "¿Quién es el padre de {name}?",
            "mother": "¿Quién es la madre de {name}?", "notable_work": "¿Cuál es la obra más conocida de {name}?",
            "award": "¿Qué premio recibió {name}?", "alma_mater": "¿Dónde estudió {name}?"}),
    ("de", {"birth_date": "Wann wurde {name} geboren?", "birth_place": "Wo wurde {name} geboren?",
            "occupation": "Welchen Beruf hat {name}?", "father": "Wer ist der Vater von {name}?",
            "mother": "Wer ist die Mutter von {name}?", "notable_work": "Was ist das bekannteste Werk von {name}?",
            "award": "Welchen Preis hat {name} erhalten?", "alma_mater": "Wo hat {name} studiert?"}),
]
LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish"}

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
MONTHS_IN = {
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
           "November", "Dezember"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
           "noviembre", "diciembre"],
}
_DATE = re.compile(rf"^(\d{{1,2}}) ({'|'.join(MONTHS)}) (\d{{3,4}})$")


def question(attr: str, name: str) -> str:
    """The plain question about ``attr`` of ``name``."""
    t = QUESTIONS.get(attr)
    return t.format(name=name) if t else f"What is the {attr.replace('_', ' ')} of {name}?"


def statement(attr: str, name: str, value: str) -> str:
    """The sentence stating that ``attr`` of ``name`` is ``value``."""
    t = STATEMENTS.get(attr)
    return t.format(name=name, value=value) if t else f"The {attr.replace('_', ' ')} of {name} is {value}."


def norm(text: str) -> str:
    """Lower case, accents dropped, runs of anything but ASCII letters and digits one space."""
    if text.isascii():
        text = text.lower()
    else:
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text).split())


def quoted_title(value: str) -> str:
    """The quoted part of a value (the title in "the novel 'The Paper Orchard'"), else the value."""
    for q in ("'", "\""):
        if value.count(q) >= 2:
            return value.split(q)[1]
    return value


def reverse_question(attr: str, value: str, facts: dict) -> str:
    """A question whose answer is the person holding ``value`` for ``attr``."""
    v = value
    return {
        "birth_date": f"Which person was born on {v}?",
        "birth_place": f"Who was born in {v}?",
        "occupation": f"Name the {v} whose mother is {facts.get('mother', 'unknown')}.",
        "father": f"Whose father is {v}?",
        "mother": f"Who is the child of {v}?",
        "notable_work": f"Who created {quoted_title(v)}?",
        "award": f"Who was given {v}?",
        "alma_mater": f"Name someone who studied at {v}.",
    }.get(attr, f"Who is associated with {v}?")


def initial_words(value: str) -> list[list[str]]:
    """Capitalised words of the value's name part, for its initials; a leading "The" is
    optional. Empty when the value has fewer than two such words (a date, an occupation)."""
    words = [w for w in re.findall(r"[^\W\d_][\w'-]*", quoted_title(value)) if w[0].isupper()]
    out = [words]
    if words and words[0] == "The":
        out.append(words[1:])
    return [w for w in out if len(w) >= 2]


def value_variants(value: str, lang: str) -> tuple[str, ...]:
    """Other spellings of ``value`` that count as the value: a date in the English month-first
    form and in ``lang``, the title inside a work's value, the value without its article."""
    out = []
    m = _DATE.match(value)
    if m:
        d, month, y = m.group(1), m.group(2), m.group(3)
        out.append(f"{month} {d}, {y}")
        i = MONTHS.index(month)
        if lang == "fr":
            out += [f"{d} {MONTHS_IN['fr'][i]} {y}"] + ([f"1er {MONTHS_IN['fr'][i]} {y}"] if d == "1" else [])
        elif lang == "de":
            out.append(f"{d}. {MONTHS_IN['de'][i]} {y}")
        elif lang == "es":
            out.append(f"{d} de {MONTHS_IN['es'][i]} de {y}")
    title = quoted_title(value)
    if title != value:
        out.append(title)
    for article in ("the ", "a ", "an "):
        if value.lower().startswith(article) and title == value:
            out.append(value[len(article):])
    seen, res = {norm(value)}, []
    for v in out:
        if len(norm(v)) >= 4 and norm(v) not in seen:
            seen.add(norm(v))
            res.append(v)
    return tuple(res)

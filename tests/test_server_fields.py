"""The field policy of the guarded routes (guardserve/server/fields.py), without the engine."""

from __future__ import annotations

import pytest

from guardserve.guard import CHAT, COMPLETIONS, BadRequest
from guardserve.server.fields import ALLOWED, REFUSED, check_body


def _vllm_fields(route: str) -> set[str]:
    if route == CHAT:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as M
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as M
    return set(M.model_fields)


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_every_vllm_request_field_is_classified(route):
    """An upgrade of vLLM that adds a request field fails here until the field is classified:
    a new field is a new way to shape the prompt or to read something back."""
    known = _vllm_fields(route)
    classified = ALLOWED[route] | set(REFUSED[route])
    assert not ALLOWED[route] & set(REFUSED[route])
    assert known - classified == set(), f"unclassified fields of {route}: {sorted(known - classified)}"
    assert classified - known == set(), f"fields vLLM no longer has: {sorted(classified - known)}"


def _chat(**kw) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


@pytest.mark.parametrize("body,needle", [
    (_chat(chat_template="{{ 'x' }}"), "chat_template"),
    (_chat(chat_template_kwargs={"a": 1}), "chat_template_kwargs"),
    (_chat(return_prompt_text=True), "return_prompt_text"),
    (_chat(kv_transfer_params={"prompt_token_ids": [1, 2]}), "kv_transfer_params"),
    (_chat(made_up=1), "made_up"),
    (_chat(vllm_xargs={"guardserve_phrases": "[]"}), "reserved"),
    (_chat(vllm_xargs=[1]), "vllm_xargs"),
    ({"model": "m", "messages": [{"role": "user>Who", "content": "hi"}]}, "role"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text parts"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
])
def test_refusals_name_the_field(body, needle):
    with pytest.raises(BadRequest, match=needle):
        check_body(CHAT, body)


def test_allowed_bodies_pass(monkeypatch):
    check_body(CHAT, _chat(use_beam_search=True, n=2, logprobs=True, top_logprobs=2, prompt_logprobs=1, echo=True,
                           structured_outputs={"choice": ["a"]}, tools=[], return_prompt_text=False))
    check_body(COMPLETIONS, {"model": "m", "prompt": [1, 2, 3], "echo": True, "logprobs": 1, "kv_transfer_params": None})
    with pytest.raises(BadRequest, match="prompt_embeds"):
        check_body(COMPLETIONS, {"model": "m", "prompt": "x", "prompt_embeds": "AAAA"})
    monkeypatch.setenv("GUARDSERVE_ALLOW_CLIENT_TEMPLATES", "1")
    check_body(CHAT, _chat(chat_template_kwargs={"a": 1}))

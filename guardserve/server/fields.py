"""The field policy of the guarded routes: which request fields a client may send.

Every field of vLLM's chat and completions request models is classified here, once:

- ``ALLOWED``: served as vLLM serves it. What a field changes in the prompt or the output
  constraint is read by the guard at the engine entry (``guardserve/server/entry.py``), and
  the output channels it opens are closed there where something triggered (prompt logprobs,
  ``logprob_token_ids``).
- ``REFUSED``: a 400 naming the field. Each would let a client show what the guard hides, or
  feed the model something the guard does not read: the guarded prompt echoed back (the
  in-context instruction), prompt token ids or embeddings from elsewhere, multimodal inputs,
  templates of the client's own. ``GUARDSERVE_ALLOW_CLIENT_TEMPLATES=1`` lets clients send
  ``chat_template`` / ``chat_template_kwargs`` (the entry still reads the final prompt).

Fields vLLM does not know are refused too (vLLM would only warn and drop them). A test fails
when vLLM's request models gain a field that is in neither set, so an upgrade cannot open a
channel silently.

Inside messages: only roles a chat template knows, text content parts only, and no
``guardserve_`` keys in ``vllm_xargs`` (the guard's own).
"""

from __future__ import annotations

from guardserve import config
from guardserve.contract import RESERVED_PREFIX
from guardserve.guard import CHAT, COMPLETIONS, BadRequest

_COMMON_ALLOWED = frozenset({
    "model", "stream", "stream_options", "max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed",
    "stop", "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "logprobs", "user", "response_format", "structured_outputs", "use_beam_search", "length_penalty",
    "ignore_eos", "min_tokens", "include_stop_str_in_output", "skip_special_tokens",
    "spaces_between_special_tokens", "bad_words", "allowed_token_ids", "add_special_tokens", "echo",
    "prompt_logprobs", "logprob_token_ids", "cache_salt", "priority", "request_id", "vllm_xargs",
    "truncate_prompt_tokens", "truncation_side", "repetition_detection", "thinking_token_budget",
    "return_tokens_as_token_ids", "return_token_offsets", "watermarking", "stream_interval", "session_id",
})
_COMMON_REFUSED = {
    "kv_transfer_params": "it can carry prompt token ids that the client's text does not show",
    "ec_transfer_params": "it carries encoder state from outside this server",
    "mm_payload": "a guarded server reads text only",
    "return_mm_kwargs": "a guarded server reads text only",
    "return_token_ids": "it returns the prompt as the model saw it, the guard's own instruction included",
    "routed_experts_prompt_start": "it exposes the model's internal routing over the prompt",
}

ALLOWED: dict[str, frozenset[str]] = {
    CHAT: _COMMON_ALLOWED | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                             "parallel_tool_calls", "documents", "add_generation_prompt", "continue_final_message",
                             "include_reasoning", "reasoning_effort"},
    COMPLETIONS: _COMMON_ALLOWED | {"prompt", "suffix"},
}
REFUSED: dict[str, dict[str, str]] = {
    CHAT: {**_COMMON_REFUSED,
           "chat_template": "a client's own chat template can place any text where the guard's instruction goes",
           "chat_template_kwargs": "template variables can change the prompt around what the guard read",
           "return_prompt_text": "it returns the prompt as the model saw it, the guard's own instruction included",
           "mm_processor_kwargs": "a guarded server reads text only",
           "media_io_kwargs": "a guarded server reads text only"},
    COMPLETIONS: {**_COMMON_REFUSED, "prompt_embeds": "the guard cannot read prompt embeddings"},
}
TEMPLATE_FIELDS = frozenset({"chat_template", "chat_template_kwargs"})
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


def client_templates_allowed() -> bool:
    return config.get("GUARDSERVE_ALLOW_CLIENT_TEMPLATES")


def check_body(route: str, body: dict) -> None:
    """Raise ``BadRequest`` (HTTP 400, naming the field) unless ``body`` keeps to the policy."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    allowed, refused = ALLOWED[route], REFUSED[route]
    templates = client_templates_allowed()
    for name, value in body.items():
        if name in allowed or (templates and name in TEMPLATE_FIELDS):
            continue
        if name in refused:
            if value is None or value is False:
                continue  # the field's default, as SDKs send it
            raise BadRequest(f"'{name}' is not accepted by this server: {refused[name]}")
        raise BadRequest(f"unknown field '{name}' (this server accepts: {', '.join(sorted(allowed))})")
    xargs = body.get("vllm_xargs")
    if xargs is not None:
        if not isinstance(xargs, dict):
            raise BadRequest("vllm_xargs must be an object of flat values")
        reserved = sorted(k for k in xargs if str(k).startswith(RESERVED_PREFIX))
        if reserved:
            raise BadRequest(f"vllm_xargs keys starting with '{RESERVED_PREFIX}' are reserved by the server: {reserved}")
    if route == CHAT:
        _check_messages(body.get("messages"))


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {sorted(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in TEXT_PARTS:
                    raise BadRequest(f"messages[{i}].content[{j}]: only text parts are accepted by this server")

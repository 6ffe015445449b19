"""End to end: the real vLLM server on the demo model, through the official OpenAI client."""

import random
import shlex
import sys
from pathlib import Path

import pytest

from guardserve.server.process import run_group

pytestmark = pytest.mark.slow

N_QUESTIONS = 40


@pytest.fixture(scope="module")
def retain_pairs(world):
    rng = random.Random(0)
    return rng.sample(world["retain"], N_QUESTIONS)


def _accuracy(answers, pairs):
    return sum(p["value"].lower() in a.lower() for a, p in zip(answers, pairs)) / len(pairs)


def test_models_lists_the_demo_model(openai_client):
    ids = [m.id for m in openai_client.models.list().data]
    assert ids == ["guardserve-demo"]


def test_health_and_metrics(server):
    import httpx

    assert httpx.get(server.base_url + "/health").status_code == 200
    from conftest import ADMIN_KEY

    metrics = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert "vllm:" in metrics and "guardserve_requests_total" in metrics


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_chat_answers_retain_questions(openai_client, retain_pairs, stream):
    answers = []
    for pair in retain_pairs:
        kwargs = dict(model="guardserve-demo", messages=[{"role": "user", "content": pair["question"]}],
                      max_tokens=40, temperature=0)
        if stream:
            chunks = openai_client.chat.completions.create(stream=True, **kwargs)
            answers.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        else:
            answers.append(openai_client.chat.completions.create(**kwargs).choices[0].message.content)
    acc = _accuracy(answers, retain_pairs)
    assert acc >= 0.9, f"chat accuracy {acc:.0%}; e.g. {retain_pairs[0]['question']!r} -> {answers[0]!r}"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_completions_answer_retain_questions(openai_client, retain_pairs, stream):
    from guardserve.textgen import completion_prompt

    answers = []
    for pair in retain_pairs:
        kwargs = dict(model="guardserve-demo", prompt=completion_prompt(pair["question"]), max_tokens=40, temperature=0)
        if stream:
            answers.append("".join(c.choices[0].text for c in openai_client.completions.create(stream=True, **kwargs)))
        else:
            answers.append(openai_client.completions.create(**kwargs).choices[0].text)
    acc = _accuracy(answers, retain_pairs)
    assert acc >= 0.9, f"completion accuracy {acc:.0%}; e.g. {retain_pairs[0]['question']!r} -> {answers[0]!r}"


def test_logprobs_are_served(openai_client, retain_pairs):
    pair = retain_pairs[0]
    out = openai_client.chat.completions.create(
        model="guardserve-demo", messages=[{"role": "user", "content": pair["question"]}],
        max_tokens=20, temperature=0, logprobs=True, top_logprobs=3,
    )
    content = out.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob <= 0 for t in content)


def _dry_run(*args: str) -> list[str]:
    """The vLLM argv ``guardserve serve ARGS --dry-run`` prints (its last line: the
    environment it adds, ``NAME=value`` words, then the command)."""
    r = run_group([sys.executable, "-m", "guardserve", "serve", *args, "--dry-run"], timeout=300)
    assert r.returncode == 0 and not r.leftovers, r.stdout + r.stderr
    words = shlex.split(r.stdout.strip().splitlines()[-1])
    return words[next(i for i, w in enumerate(words) if "=" not in w or w.startswith("-")):]


@pytest.mark.parametrize("model_arg", ["default", "path"])
def test_serve_command_uses_processed_logprobs(demo, model_arg):
    """On the real demo model directory, as `--model` and as the default: the command
    reports logprobs after the logits processors ran (banned tokens never listed)."""
    argv = _dry_run(*(["--model", str(demo.model)] if model_arg == "path" else []))
    pairs = list(zip(argv, argv[1:]))
    assert ("--logprobs-mode", "processed_logprobs") in pairs, argv
    assert [Path(v).resolve() for k, v in pairs if k == "--model"] == [Path(demo.model).resolve()], argv
    assert argv.count("--logprobs-mode") == 1

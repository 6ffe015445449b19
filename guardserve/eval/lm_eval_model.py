"""lm-evaluation-harness model ``guardserve``: lm-eval tasks scored by a *guarded* server.

Every request goes to a running guardserve server (or any OpenAI-compatible one) over HTTP,
so what lm-eval scores is what the server's clients get, the guard included. Needs the
``lm-eval`` extra (``pip install -e .[lm-eval]``; ``make setup`` installs it).

Model arguments (``--model_args base_url=...,api_key=...`` or keyword arguments):

- ``base_url``: the server, e.g. ``http://127.0.0.1:8000`` (``/v1`` optional); required.
- ``api_key``: an inference key; default ``$OPENAI_API_KEY``. lm-eval writes ``model_args``
  into its results file: prefer the environment variable to keep the key out of it.
- ``model``: the model name to request (default: the first the server lists).
- ``generate_api``: ``completions`` (default: the task's text is the prompt) or ``chat`` (the
  text as one user message). With lm-eval's ``--apply_chat_template`` the task's turns go to
  the chat API as they are, whatever this says.
- ``concurrency`` (8), ``max_gen_toks`` (256, when the task sets none), ``timeout`` (120 s),
  ``progress`` (true).
- ``on_refusal``: ``nan`` (default) or ``error``, see below.

How each request type is served:

- ``generate_until``: greedy unless the task asks for sampling; the task's ``until`` strings
  are sent as ``stop`` and cut off again here.
- ``loglikelihood``: the completions API with ``echo`` and ``logprobs=1`` on context +
  continuation; the continuation's tokens are found by their text at the end of the echoed
  prompt, and ``is_greedy`` compares each with the top logprob at its position.
- ``loglikelihood_rolling``: the same over the whole text, in one request: a text longer than
  the server's context is an error (no windowing).

Refusals. A guarded server refuses prompt logprobs (``echo`` with ``logprobs``,
``prompt_logprobs``) for a prompt in which a registered target triggers: HTTP 400 naming the
server's policy (``guardserve/server/entry.py``). Such a request is never scored as 0 or as
an impossible continuation: it is counted (:attr:`GuardservedLM.refusals`, a warning after
each batch, and ``results["config"]["guardserve"]`` of lm-eval's output through
:meth:`GuardservedLM.get_model_info`), and its log-likelihood is ``nan``. Beware that
lm-eval's own multiple-choice accuracy takes ``argmax`` over the choices, which reads ``nan``
as the best: a task with refusals reports accuracy over docs that were not measured. The
bundled tasks (``guardserve/eval/lm_eval_tasks``) count refused docs in a ``refused`` metric
and leave them out of ``acc``; ``on_refusal=error`` stops the run at the first batch with a
refusal instead. A generation the server refuses (it refuses none for plain prompts) yields
``""``, counted the same way.

Use from Python (the import registers the model)::

    import lm_eval
    from guardserve.eval.lm_eval_model import TASKS_DIR, GuardservedLM
    lm = GuardservedLM(base_url="http://127.0.0.1:8000", api_key="key-a")
    out = lm_eval.simple_evaluate(model=lm, tasks=["guardserve_demo_forget_qa"],
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR)))
    out["results"], lm.refusal_summary()

From the command line, lm-eval has to import this module before it looks the model up, and
it has no plugin hook for models; either run lm-eval through this module (it registers the
model, adds the bundled tasks to ``--include_path`` and hands every argument to lm-eval)::

    python -m guardserve.eval.lm_eval_model --model guardserve \\
        --model_args base_url=http://127.0.0.1:8000,api_key=key-a --tasks guardserve_demo

or name the bundled task files by path, which lm-eval reads before it builds the model (their
``utils.py`` imports this module)::

    python -m lm_eval --model guardserve --model_args base_url=http://127.0.0.1:8000 \\
        --tasks guardserve/eval/lm_eval_tasks

The bundled tasks build their docs when lm-eval loads them, from the demo world: the newest
one under ``$GUARDSERVE_HOME/demo`` (what ``make serve`` serves), or the ``world/`` folder given
as lm-eval metadata (``--metadata '{"guardserve_world": "DIR"}'``, or ``TaskManager(metadata=...)``),
or a fixed JSON file (``guardserve_data``, written by :func:`write_demo_tasks`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lm_eval.api.model import LM

from guardserve.eval.endpoint import Client, EndpointError, classify_400

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
REFUSAL_MODES = ("nan", "error")
# Sampling fields lm-eval tasks may set that the OpenAI-compatible APIs take as they are.
_PASSED_THROUGH = ("top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty")


class GuardserveLMError(RuntimeError):
    """A request the server did not answer (other than a policy refusal), or a refusal with
    ``on_refusal=error``."""


class ChatPrompt(NamedTuple):
    """A conversation from lm-eval's ``--apply_chat_template``, kept as JSON (a string to
    lm-eval's caching) and sent to the chat API as messages."""

    prompt: str
    continue_final: bool = False

    def encode(self, encoding: str = "utf-8") -> bytes:
        return self.prompt.encode(encoding)


@dataclass(frozen=True)
class Refusal:
    """One request the server refused under its policy."""

    request_type: str
    task: str | None
    doc_id: int | None
    message: str


class _Refused(NamedTuple):
    message: str


class GuardservedLM(LM):
    """lm-eval's ``LM`` over a guarded server's OpenAI-compatible API (see the module's
    docstring for the arguments, the request types and how refusals are reported)."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 generate_api: str = "completions", concurrency: int = 8, max_gen_toks: int = 256,
                 timeout: float = 120.0, on_refusal: str = "nan", progress: bool = True,
                 batch_size=None, max_batch_size=None, device=None, **unknown):
        super().__init__()
        # batch_size, max_batch_size and device come from lm-eval's command line: a server batches by itself.
        if unknown:
            raise TypeError(f"guardserve model: unknown model_args {', '.join(sorted(unknown))}; known: base_url, "
                            "api_key, model, generate_api, concurrency, max_gen_toks, timeout, on_refusal, progress")
        if generate_api not in ("completions", "chat"):
            raise ValueError(f"generate_api={generate_api}: choose completions or chat")
        if on_refusal not in REFUSAL_MODES:
            raise ValueError(f"on_refusal={on_refusal}: choose {' or '.join(REFUSAL_MODES)}")
        self.concurrency = max(1, int(concurrency))
        try:
            self.client = Client(str(base_url), api_key or os.environ.get("OPENAI_API_KEY"), float(timeout),
                                 self.concurrency, key_option="api_key=KEY (model_args) or $OPENAI_API_KEY",
                                 model_option="model=NAME")
            self.model = self.client.pick_model(model)
        except EndpointError as e:  # unreachable, a refused key, an unknown model
            raise GuardserveLMError(f"guardserve model: {e}") from None
        self.base_url = self.client.base
        self.generate_api = generate_api
        self.max_gen_toks = int(max_gen_toks)
        self.on_refusal = on_refusal
        self.progress = bool(progress)
        self.refusals: list[Refusal] = []
        self.requests_sent: Counter = Counter()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lm-eval's interface

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        def one(req):
            context, continuation = req.args
            if isinstance(context, ChatPrompt):
                raise GuardserveLMError("loglikelihood tasks are scored over the completions API on raw text: "
                                        "run them without --apply_chat_template")
            return self._score(context, continuation)

        return self._run("loglikelihood", requests, one, disable_tqdm, lambda x: (math.nan, False))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self._run("loglikelihood_rolling", requests, lambda req: self._score("", req.args[0], rolling=True),
                         disable_tqdm, lambda x: math.nan, lambda x: x[0])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self._run("generate_until", requests, lambda req: self._generate(*req.args), disable_tqdm, lambda x: "")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> ChatPrompt:
        return ChatPrompt(json.dumps(chat_history, ensure_ascii=False), continue_final=not add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return f"guardserve:{self.model}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "the server's own" if chat_template else ""

    def get_model_info(self) -> dict:
        """What lm-eval adds to ``results["config"]``: the server, the settings and the refusals."""
        return {"guardserve": {"base_url": self.base_url, "model": self.model, "generate_api": self.generate_api,
                               "on_refusal": self.on_refusal, "requests": dict(self.requests_sent),
                               **self.refusal_summary()}}

    def refusal_summary(self) -> dict:
        """``{"refused": n, "refused_by_task": {task: {request_type: n}}}`` over this model's life."""
        by_task: dict[str, Counter] = defaultdict(Counter)
        for r in self.refusals:
            by_task[r.task or "?"][r.request_type] += 1
        return {"refused": len(self.refusals), "refused_by_task": {t: dict(c) for t, c in sorted(by_task.items())}}

    # ------------------------------------------------------------------ the requests

    def _run(self, request_type: str, requests, one: Callable, disable_tqdm: bool, on_refused: Callable,
             cache_key: Callable = lambda args: args) -> list:
        from tqdm.auto import tqdm

        requests = list(requests)
        bar = tqdm(total=len(requests), desc=f"guardserve {request_type}", disable=disable_tqdm or not self.progress)

        def call(req):
            out = one(req)
            with self._lock:
                bar.update(1)
            return out

        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                raw = list(pool.map(call, requests))
        except EndpointError as e:
            raise GuardserveLMError(str(e)) from None
        finally:
            bar.close()
        self.requests_sent[request_type] += len(requests)
        results, refused = [], []
        for req, r in zip(requests, raw):
            if isinstance(r, _Refused):
                refused.append(Refusal(request_type, getattr(req, "task_name", None), getattr(req, "doc_id", None),
                                       r.message))
                results.append(on_refused(r))
            else:
                results.append(r)
                self.cache_hook.add_partial(request_type, cache_key(req.args), r)
        if refused:
            self.refusals.extend(refused)
            tasks = Counter(r.task or "?" for r in refused)
            text = (f"guardserve: the server refused {len(refused)} of {len(requests)} {request_type} requests under "
                    f"its policy ({', '.join(f'{t}: {n}' for t, n in tasks.items())}): {refused[0].message}")
            if self.on_refusal == "error":
                raise GuardserveLMError(text + " (on_refusal=error)")
            log.warning("%s; they score %s, counted in results['config']['guardserve']", text,
                        "nan" if request_type != "generate_until" else "''")
        return results

    def _completion(self, body: dict):
        """The completions API's answer to ``body``, or ``_Refused``; raises on any other failure."""
        r = self.client.post("/completions", body)
        if r.status_code == 200:
            return r.json()
        message = _error_message(r)
        if r.status_code == 400 and classify_400(message) == "refused":
            return _Refused(message)
        raise GuardserveLMError(f"{self.base_url}/completions answered {r.status_code}: {message}")

    def _echo(self, prompt: str):
        """Tokens and logprobs of ``prompt`` (echo, logprobs=1, one generated token dropped)."""
        out = self._completion({"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1})
        if isinstance(out, _Refused):
            return out
        choice = out["choices"][0]
        lp = choice.get("logprobs") or {}
        tokens, values, tops = lp.get("tokens") or [], lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
        if not tokens or len(values) != len(tokens):
            raise GuardserveLMError(f"{self.base_url}/completions did not echo the prompt's logprobs "
                                    "(echo with logprobs): the server must support them")
        generated = (out.get("usage") or {}).get("completion_tokens", 1)
        n = max(0, len(tokens) - int(generated))
        return tokens[:n], values[:n], (list(tops) + [None] * len(tokens))[:n]

    def _score(self, context: str, continuation: str, rolling: bool = False):
        """``(sum of the continuation's token logprobs, is_greedy)``, or ``_Refused``."""
        if not continuation:
            return (0.0, True)
        echoed = self._echo(context + continuation)
        if isinstance(echoed, _Refused):
            return echoed
        tokens, values, tops = echoed
        start = 0 if rolling else _continuation_start(tokens, context + continuation, len(continuation))
        if start is None:  # the token strings do not spell the prompt: count the context's own tokens
            ctx = self._echo(context)
            if isinstance(ctx, _Refused):
                return ctx
            start = len(ctx[0])
        total, greedy = 0.0, True
        for i in range(start, len(tokens)):
            if values[i] is None:  # the first token, with nothing before it to condition on
                continue
            total += values[i]
            top = tops[i]
            if top:
                greedy = greedy and values[i] >= max(top.values()) - 1e-6
        return (total, greedy)

    def _generate(self, context, gen_kwargs: dict):
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kw.pop("max_gen_toks", None) or self.max_gen_toks)
        sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0) or 0.0) if sample else 0.0
        body: dict = {"max_tokens": max_tokens, "temperature": temperature,
                      **{k: kw[k] for k in _PASSED_THROUGH if k in kw}}
        if until:
            body["stop"] = until
        if isinstance(context, ChatPrompt) or self.generate_api == "chat":
            if isinstance(context, ChatPrompt):
                body["messages"] = json.loads(context.prompt)
                if context.continue_final:
                    body.update(add_generation_prompt=False, continue_final_message=True)
            else:
                body["messages"] = [{"role": "user", "content": context}]
            r = self.client.post("/chat/completions", body)
            if r.status_code == 200:
                text = r.json()["choices"][0]["message"]["content"] or ""
                return _cut(text, until)
            message = _error_message(r)
            if r.status_code == 400 and classify_400(message) == "refused":
                return _Refused(message)
            raise GuardserveLMError(f"{self.base_url}/chat/completions answered {r.status_code}: {message}")
        out = self._completion({"prompt": context, **body})
        if isinstance(out, _Refused):
            return out
        return _cut(out["choices"][0]["text"] or "", until)


def _error_message(r) -> str:
    try:
        err = r.json().get("error")
        return str(err.get("message") if isinstance(err, dict) else err or r.text)[:500]
    except (ValueError, AttributeError):
        return r.text[:500]


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


def _continuation_start(tokens: Sequence[str], prompt: str, n_chars: int) -> int | None:
    """Index of the first token that holds part of the last ``n_chars`` characters of
    ``prompt``, read off the tokens' strings (a leading special token such as ``<s>`` is
    allowed); None when the strings do not end with ``prompt``."""
    joined = "".join(tokens)
    if not joined.endswith(prompt):
        return None
    boundary = len(joined) - n_chars
    end = 0
    for i, tok in enumerate(tokens):
        end += len(tok)
        if end > boundary:
            return i
    return len(tokens)


# --------------------------------------------------------------------------- the bundled tasks' data


def demo_task_records(world: dict, per_split: int = 8) -> dict[str, list[dict]]:
    """The bundled tasks' docs from a demo world (its ``entities``, ``forget`` and ``retain``
    records): ``per_split`` forget questions about distinct forget people and as many retain
    questions, attributes in turn, each with four answer sentences (the true one at ``gold``,
    rotating) for the multiple-choice tasks. Retain items whose sentences name a forget person
    or state one of their facts are skipped, so a guard has no reason to touch them."""
    forget_people = [e for e in world["entities"] if e.get("split") == "forget"]
    banned = [s.lower() for e in forget_people for s in [e["name"], *e.get("aliases", [])[1:2], *e["facts"].values()]]
    out: dict[str, list[dict]] = {}
    for split in ("forget", "retain"):
        attributes = sorted({r["attribute"] for r in world[split]})
        seen: set[str] = set()
        items: list[dict] = []
        for rec in world[split]:
            if len(items) == per_split:
                break
            attr = attributes[len(items) % len(attributes)]
            if rec["entity"] in seen or rec["attribute"] != attr or len(rec.get("perturbed_answer", [])) < 3:
                continue
            sentences = [rec["answer"], *rec["perturbed_answer"][:3]]
            if split == "retain" and any(b in s.lower() for s in sentences for b in banned):
                continue
            gold = len(items) % 4
            choices = rec["perturbed_answer"][:3]
            choices.insert(gold, rec["answer"])
            seen.add(rec["entity"])
            items.append({"entity": rec["entity"], "attribute": rec["attribute"], "question": rec["question"],
                          "value": rec["value"], "answer": rec["answer"], "choices": choices, "gold": gold})
        out[split] = items
    return out


def find_demo_world() -> Path:
    """The demo world the bundled tasks read by default: the most recently built ``world/``
    folder under ``$GUARDSERVE_HOME/demo`` (``guardserve demo build`` and ``make serve`` write it)."""
    from guardserve import config

    root = config.home() / "demo"
    worlds = sorted((p.parent for p in root.glob("*/world/entities.json")), key=lambda p: p.stat().st_mtime)
    if not worlds:
        raise FileNotFoundError(f"no demo world under {root}: build it with `guardserve demo build`, or name one with "
                                "lm-eval's --metadata '{\"guardserve_world\": \"DIR/world\"}'")
    return worlds[-1]


def task_docs(split: str, guardserve_world: str | None = None, guardserve_data: str | None = None) -> list[dict]:
    """The bundled tasks' docs of ``split`` (``forget`` or ``retain``): from ``guardserve_data``
    (a JSON file as :func:`write_demo_tasks` writes it), else from the demo world folder
    ``guardserve_world`` (default :func:`find_demo_world`). Both come from lm-eval's metadata."""
    if guardserve_data:
        return json.loads(Path(guardserve_data).expanduser().read_text())[split]
    folder = Path(guardserve_world).expanduser() if guardserve_world else find_demo_world()
    if (folder / "world" / "entities.json").is_file():  # a demo build's root was given
        folder = folder / "world"
    world = {name: json.loads((folder / f"{name}.json").read_text()) for name in ("entities", "forget", "retain")}
    log.info("guardserve tasks: %s docs from the demo world %s", split, folder)
    return demo_task_records(world)[split]


def write_demo_tasks(world: dict, path: str | Path) -> Path:
    """Write :func:`demo_task_records` of ``world`` to ``path``, for ``--metadata
    '{"guardserve_data": "PATH"}'`` (a fixed copy of the docs, or docs edited by hand)."""
    path = Path(path)
    path.write_text(json.dumps(demo_task_records(world), indent=1, ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``guardserve`` model registered and the bundled tasks on
    ``--include_path`` (unless one is given)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    # lm-eval takes one --include_path: one given stays as it is (the bundled tasks can still be
    # named by path: --tasks guardserve/eval/lm_eval_tasks/guardserve_demo_forget_qa.yaml).
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args) and (
            args[:1] in (["run"], ["ls"], ["validate"]) or "--tasks" in args or "-t" in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


def register() -> None:
    """Register :class:`GuardservedLM` as lm-eval's ``guardserve`` model; importing this module
    does it (once: a second import, or ``python -m`` on this file, finds it there)."""
    import lm_eval.models  # noqa: F401  (lm-eval fills its registry with its own models only while it is empty)
    from lm_eval.api.registry import register_model

    try:
        from lm_eval.api.registry import model_registry  # recent lm-eval (0.4.13 was tested)
        current = model_registry.get("guardserve", None)
    except ImportError:  # older 0.4 releases keep a plain dict
        from lm_eval.api.registry import MODEL_REGISTRY
        current = MODEL_REGISTRY.get("guardserve")
    if current is None:
        register_model("guardserve")(GuardservedLM)
    elif getattr(current, "__name__", None) != GuardservedLM.__name__:
        raise RuntimeError(f"lm-eval already has another model named 'guardserve': {current}")


if __name__ == "__main__":
    from guardserve.eval import lm_eval_model  # the module itself, not this __main__ copy: it registers

    lm_eval_model.main()
else:
    register()

"""The evaluation suite: every guard configuration scored on one dataset, one engine.

Contract: ``run(settings)`` returns the ``results.json`` document described in docs/evaluation.md,
``{"configs": {NAME: {metric: value}}, "meta": {...}}``, plus the per-sample log under
``"_samples"`` (one record per generated answer, :func:`_sample_records`), which
:func:`guardserve.eval.report.write` writes as ``samples.jsonl``, not into results.json.
Generation goes through one in-process vLLM engine (the plugin's logits processor, LoRA
and, for ``sae``/``full``, the steering hook in its worker), greedy, ``max_tokens`` new
tokens. Each configuration turns a conversation into what the engine serves (prompt text,
``extra_args``, prefix-cache salt, adapter); the teacher-forced metrics score the same
prompts on a transformers copy of the model with the same guards (filtered logits with a
finite penalty, the steering hook, the merged adapter).

Configurations (names as in docs/evaluation.md):

========================  =========================================================
``none``                  the model as trained
``icul``                  in-context unlearning naming every target, on every request
``token``                 every target's forbidden phrases banned on every request
``token+semantic``        the same plus the semantic penalty (near-synonyms)
``guard``                 detection; triggered targets get ICUL and the token filter
                          (what ``guardserve serve`` does by default)
``sae``                   detection; triggered targets are steered (SAE clamp) only
``adapter:<method>``      the unlearning adapter of that method on every request
``full``                  ``guard`` + semantic penalty + steering + the adapter
========================  =========================================================

Metrics per configuration: ``forget_accuracy`` / ``paraphrase_accuracy`` /
``retain_accuracy`` / ``world_accuracy`` (greedy answers that state the fact; TOFU items
without a short value count by ROUGE-L recall >= 0.5), ``facts_stated_forget`` (forget
answers that state a fact registered for the item's target, in any form ``fact_leaked``
finds: exact where the items have no value of their own; None when no forget item's target
has facts), ``rougeL_recall_forget``,
``mia`` / ``mia_refused`` (membership inference, AUC per attack of :mod:`guardserve.eval.mia`,
forget texts against held-out ones, and the share of each the guard refuses to score:
:class:`MembershipInference`), ``leak_rate`` (share of forget probes of all kinds, direct and paraphrased questions
included, whose answer reveals the fact), ``leak_by_kind``, ``retain_attack_accuracy``
(retain facts asked through the same attack templates: does the guard refuse too much?),
``fluency_forget`` / ``fluency_retain`` (generation entropy of the answers: does a guard
make the model repeat itself?), ``truth_ratio_forget``, ``forget_quality`` (KS p-value against the retain model, where
there is one), ``model_utility`` (harmonic mean of retain and world-fact probability,
ROUGE-L and truth ratio), ``ttft_ms`` / ``tpot_ms`` (one request at a time, guard
preparation included in TTFT), ``detect_ms``. The teacher-forced figures leave out the
items whose answer the configuration's token filter bans (their probability is 0 by
construction: the penalty's, not the model's), counted per figure in ``excluded_rows``,
and score every answer token (a long prompt loses its start, never the answer; an answer
longer than the scoring length is counted in ``skipped_rows``); a figure with no item left
is None, its reason in ``not_applicable``. ``adapter:<method>`` rows add
``train_seconds`` (from the adapter's ``guardserve_adapter.json``) and ``quantization``:
the quantization attack (the adapter merged, then rounded to 8 and 4 bits per output
channel, answered greedily by transformers): ``forget_accuracy_<b>bit`` and
``forgetting_kept_<b>bit``, the share of the merged model's drop in forget accuracy
below the base model's that survives quantization (1.0: nothing came back).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from guardserve.guard.configs import CONFIGS, GuardConfig, get_config

if TYPE_CHECKING:
    from guardserve.guard import GuardService

# What `guardserve eval` scores unless told otherwise: each mechanism alone, the server's
# default, steering alone, then (after the adapters) everything together.
DEFAULT_CONFIGS = ("none", "icul", "token", "token+semantic", "guard", "sae")
assert set(DEFAULT_CONFIGS) <= set(CONFIGS)


def known_config(name: str) -> bool:
    try:
        get_config(name)
    except ValueError:
        return False
    return True


@dataclass
class Settings:
    """What one evaluation run scores and how."""

    model: str
    data: object                                  # guardserve.eval.data.EvalData
    configs: list[str]
    retain_model: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # method -> PEFT folder
    full_adapter: str | None = None               # the method `full` uses (None: no adapter)
    sae: str | None = None                        # SAE folder for `sae` and `full`
    steer_clamp: float = 100.0
    steer_features: int = 30
    entities: list[dict] | None = None            # every entity (probes borrow retain people's facts)
    retain_texts: list[str] | None = None         # feature-selection contrast (default: the model folder's own)
    probes_per_kind: int = 20
    retain_limit: int = 240
    forget_limit: int = 0                         # 0: every forget item
    max_tokens: int = 40
    latency_requests: int = 8
    latency_tokens: int = 32
    quant_bits: tuple[int, ...] = (8, 4)          # the quantization attack on adapter rows; () skips it
    relearn_steps: int = 20                       # the relearning attack on adapter rows; 0 skips it
    overlap_queries: int = 40                     # forget items asked together with a retain one; 0 skips
    sequential_steps: tuple[int, ...] = ()        # target counts to grow the policy to, e.g. (10, 100, 1000)
    sequential_config: str = "guard"              # the configuration the sequential deletions run through
    seed: int = 0
    workdir: str | None = None
    progress: bool = True
    # The transformers model the teacher-forced metrics score with: resolved names (see
    # guardserve.unlearn.trainer.resolve_device_dtype; `guardserve eval --device/--dtype`, whose
    # "auto" picks CUDA + bfloat16 where present). The vLLM engine runs in ``dtype`` too.
    device: str = "cpu"
    dtype: str = "float32"
    demo_variant: str | None = None               # the demo model scored (README's table per variant), if any


# ----------------------------------------------------------------------- conversations

@dataclass
class Served:
    """One conversation as a configuration serves it."""

    messages: list[dict]
    phrases: tuple[str, ...] = ()
    semantic: bool = False
    steer: list = field(default_factory=list)     # [[target id, version], ...]
    adapter: str | None = None
    salt: str | None = None
    prepare_s: float = 0.0


class Configurations:
    """Turns a conversation into what each configuration serves (one policy store and
    detector shared by all)."""

    def __init__(self, data, tokenizer, workdir: Path, adapters: dict[str, str], full_adapter: str | None,
                 max_model_len: int | None = None, max_tokens: int = 1):
        from guardserve.classifiers import Detector, DetectorConfig
        from guardserve.classifiers.retrieval import forbidden_phrases
        from guardserve.policy import open_store
        from guardserve.prompting import InContextUnlearner

        self.store = open_store(str(workdir / "policy.db"))
        specs = [{"name": t["name"], "aliases": list(t.get("aliases", [])), "facts": dict(t.get("facts", {}))}
                 for t in data.targets]
        self.targets = self.store.add_many(specs, actor="eval") if specs else []
        self.detector = Detector(self.store, DetectorConfig(vector_cache=str(workdir / "vectors.sqlite")))
        self.detector.sync(force=True, embed_budget_s=3600)
        self.icul = InContextUnlearner()
        self.all_phrases = tuple(sorted({p for t in self.targets for p in forbidden_phrases(t)}))
        self.adapters, self.full_adapter, self.max_tokens = adapters, full_adapter, max_tokens
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self._services: dict[str, GuardService] = {}

    def service(self, cfg: GuardConfig) -> GuardService:
        """The serving path itself for ``cfg``: detection, ICUL, the filter's phrases, the steering flag."""
        from guardserve.guard import GuardService  # noqa: F811 (the runtime import of the TYPE_CHECKING name)

        if cfg.name not in self._services:
            self._services[cfg.name] = GuardService(self.store, self.detector, self.tokenizer, cfg, icul=self.icul,
                                                    max_model_len=self.max_model_len)
        return self._services[cfg.name]

    def serve(self, config: str, messages: list[dict]) -> Served:
        from guardserve.contract import GuardPlan
        from guardserve.guard import CHAT

        cfg = get_config(config)
        started = time.perf_counter()
        body = {"model": "eval", "messages": messages, "max_tokens": self.max_tokens}
        triggered = True  # without detection every target applies to every request
        if cfg.detect:
            body, decision = self.service(cfg).prepare(CHAT, body, "default")
            triggered = decision.guarded
            plan = GuardPlan.from_xargs(body.get("vllm_xargs"))
            out = Served(body["messages"], plan.phrases, plan.semantic, [list(s) for s in plan.steer],
                         salt=body.get("cache_salt"))
        else:  # every target on every request
            # ICUL fitted into the context as the server fits it (fewer demonstrations when long).
            msgs = (self.service(cfg).icul_messages(body, self.targets) or messages) if cfg.icul else messages
            steer = sorted([t.id, t.version] for t in self.targets) if cfg.steering else []
            out = Served(msgs, self.all_phrases if cfg.token_filter else (), cfg.semantic, steer, salt=_salt(steer))
        if cfg.adapter and (cfg.method or triggered):
            # adapter:<method> serves every request; `full`'s adapter, as a server routes a registered
            # adapter (route "triggered"), only the requests that trigger a target it covers (all of them).
            out.adapter = cfg.method or self.full_adapter
        out.prepare_s = time.perf_counter() - started
        return out

    def close(self):
        self.store.close()


def _salt(steer: list) -> str | None:
    from guardserve.contract import steered_salt

    return steered_salt(None, steer) if steer else None


def _latency(config: str, settings: Settings, confs: Configurations, engine: Engine, forget: list[dict],
             retain: list[dict]) -> dict:
    """``ttft_ms``, ``tpot_ms`` and ``detect_ms`` (medians), one request at a time, forget and
    retain questions alternating, guard preparation included in TTFT."""
    sample = [x for pair in zip(_spread(forget, settings.latency_requests // 2),
                                _spread(retain, settings.latency_requests - settings.latency_requests // 2))
              for x in pair]
    ttft, tpot, prep = [], [], []
    if sample:
        engine.latency(lambda: confs.serve(config, _question_messages(sample[0])), settings.latency_tokens)  # warm-up
    for it in sample:
        holder = {}

        def prepare(it=it, holder=holder):
            holder["s"] = confs.serve(config, _question_messages(it))
            return holder["s"]

        a, b = engine.latency(prepare, settings.latency_tokens)
        ttft.append(a)
        tpot.append(b)
        prep.append(holder["s"].prepare_s)
    return {"ttft_ms": statistics.median(ttft) * 1000 if ttft else None,
            "tpot_ms": statistics.median(tpot) * 1000 if tpot else None,
            "detect_ms": statistics.median(prep) * 1000 if get_config(config).detect and prep else None}


def _sequential(settings: Settings, data, tokenizer, engine: Engine, workdir: Path, forget: list[dict],
                retain: list[dict], world: list[dict], log) -> dict:
    """Sequential deletions (:mod:`guardserve.eval.sequential`): the policy grows step by step
    in a store of its own; after each step, forget accuracy of the registered and the pending
    targets, retain and world accuracy and latency through ``settings.sequential_config``."""
    from dataclasses import replace

    from guardserve.eval.sequential import schedule
    from guardserve.guard import context_length

    config = settings.sequential_config
    (workdir / "sequential").mkdir(parents=True, exist_ok=True)
    confs = Configurations(replace(data, targets=[]), tokenizer, workdir / "sequential", {}, None,
                           context_length(settings.model), settings.max_tokens)
    steps, names = [], set()
    try:
        for total, batch in zip(settings.sequential_steps, schedule(list(data.targets), list(settings.sequential_steps),
                                                                    settings.seed)):
            started = time.perf_counter()
            confs.targets += confs.store.add_many(
                [{"name": s["name"], "aliases": list(s.get("aliases", [])), "facts": dict(s.get("facts", {}))}
                 for s in batch], actor="eval")
            confs.detector.sync(force=True, embed_budget_s=3600)
            register_s = time.perf_counter() - started
            names |= {s["name"] for s in batch}
            done = [it for it in forget if it.get("entity") in names]
            pending = [it for it in forget if it.get("entity") not in names]
            items = done + pending + retain + world
            answers = engine.generate([confs.serve(config, _question_messages(it)) for it in items], settings.max_tokens)
            a_done, a_pending = answers[:len(done)], answers[len(done):len(done) + len(pending)]
            a_retain, a_world = answers[len(done) + len(pending):len(items) - len(world)], answers[len(items) - len(world):]
            row = {"targets": total, "register_s": round(register_s, 3),
                   "forget_accuracy": _accuracy(a_done, done) if done else None,
                   "pending_forget_accuracy": _accuracy(a_pending, pending) if pending else None,
                   "retain_accuracy": _accuracy(a_retain, retain), "world_accuracy": _accuracy(a_world, world),
                   **_latency(config, settings, confs, engine, done or forget, retain)}
            steps.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
            log(f"eval: sequential {config}: {total} targets: " + ", ".join(
                f"{k} {steps[-1][k]}" for k in ("forget_accuracy", "retain_accuracy", "world_accuracy", "tpot_ms")))
    finally:
        confs.close()
    return {"config": config, "steps": steps}


def _overlap_ratios(results: dict) -> None:
    """Each row's retain-half accuracy on the overlap queries as a share of the unguarded
    (``none``) row's: a small model may answer one of two questions at all."""
    ref = (results.get("none") or {}).get("overlap") or {}
    for row in results.values():
        o = row.get("overlap")
        if o and ref.get("retain_half_accuracy") and o.get("retain_half_accuracy") is not None:
            o["retain_half_accuracy_ratio"] = round(o["retain_half_accuracy"] / ref["retain_half_accuracy"], 4)


class MembershipInference:
    """The row's ``mia`` (AUC per attack of :mod:`guardserve.eval.mia`, forget texts against
    held-out ones) and ``mia_refused`` (the share of each side the guard refuses to score).

    Adapter rows are attacked on the merged adapter's weights, where the literature attacks
    an unlearned model. A guarded server scores a prompt only where the guard leaves it alone
    (prompt logprobs are refused for a prompt that triggers a target): with detection, the
    texts that trigger are refused and the rest scored by the model as served (``mia`` is the
    attack on what is left, None when no forget text is left); a configuration that guards
    every request refuses them all."""

    def __init__(self, scorer: Scorer, tokenizer, members: list[str], nonmembers: list[str]):
        from guardserve.eval import mia

        self.scorer, self.tokenizer, self.members, self.nonmembers = scorer, tokenizer, members, nonmembers
        self.texts = [*members, *nonmembers]
        self.is_member = [True] * len(members) + [False] * len(nonmembers)
        self._scores: dict[str | None, dict[str, list[float]]] = {}
        self._mia = mia

    def _method_scores(self, adapter: str | None) -> dict[str, list[float]]:
        if adapter not in self._scores:
            stats = self._mia.token_stats(self.scorer.model(adapter), self.tokenizer, self.texts)
            self._scores[adapter] = self._mia.scores(stats, self.texts)
        return self._scores[adapter]

    def __call__(self, config: str, confs: Configurations) -> tuple[dict, str | None]:
        """The row's ``mia`` and ``mia_refused``, and the reason where ``mia`` is None."""
        cfg = get_config(config)
        n_members = len(self.members)
        if not cfg.detect and (cfg.icul or cfg.token_filter or cfg.steering):
            refused = [True] * len(self.texts)
        elif cfg.detect:
            refused = [_triggered(confs.serve(config, [{"role": "user", "content": t}]), t) for t in self.texts]
        else:
            refused = [False] * len(self.texts)
        row: dict = {"mia": None, "mia_refused": {"members": round(sum(refused[:n_members]) / n_members, 4),
                                                  "nonmembers": round(sum(refused[n_members:]) / len(self.nonmembers), 4)}}
        keep = [i for i, r in enumerate(refused) if not r]
        if not any(self.is_member[i] for i in keep):
            return row, ("the guard refuses to score the prompt of every forget text (no prompt logprobs for a "
                         "prompt that triggers a target)")
        if all(self.is_member[i] for i in keep):
            return row, "the guard refuses to score every held-out text: nothing to compare with"
        # The model as this configuration serves an untriggered prompt: adapter:<method>'s adapter;
        # `full`'s adapter serves triggered requests only, so the base model.
        scores = self._method_scores(cfg.method)
        row["mia"] = {m: (None if a is None else round(a, 4)) for m, a in self._mia.aucs(
            {m: [v[i] for i in keep] for m, v in scores.items()}, [self.is_member[i] for i in keep]).items()}
        return row, None


def _triggered(served: Served, text: str) -> bool:
    """Whether detection guarded a one-turn prompt of ``text``: phrases to ban, steering, or a
    rewritten conversation."""
    return bool(served.phrases or served.steer or served.messages != [{"role": "user", "content": text}])


# ----------------------------------------------------------------------------- engine

class Engine:
    """One in-process vLLM engine for every configuration."""

    def __init__(self, model: str, tokenizer, adapters: dict[str, str], steering_home: str | None, clamp: float,
                 max_model_len: int | None, seed: int, dtype: str = "float32"):
        from vllm import LLM

        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        if steering_home:
            env |= {"GUARDSERVE_GUARD": "guard+sae", "GUARDSERVE_HOME": steering_home, "GUARDSERVE_STEER_CLAMP": str(clamp)}
        kw = {}
        if adapters:
            kw = {"enable_lora": True, "max_loras": 2, "max_lora_rank": max(_lora_rank(p) for p in adapters.values())}
        if max_model_len:
            kw["max_model_len"] = max_model_len
        with _environ(env):  # read by the engine's processes when they start
            self.llm = LLM(model, enforce_eager=True, seed=seed, gpu_memory_utilization=0.3, dtype=dtype, **kw)
        self.tokenizer = tokenizer
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._loras = {}
        for i, (method, path) in enumerate(sorted(adapters.items()), start=1):
            from vllm.lora.request import LoRARequest

            self._loras[method] = LoRARequest(f"eval-{method}", i, path)

    def prompt(self, served: Served) -> str:
        return self.tokenizer.apply_chat_template(served.messages, tokenize=False, add_generation_prompt=True)

    def _request(self, served: Served, max_tokens: int, exact: bool = False):
        from vllm import SamplingParams

        from guardserve.contract import GuardPlan

        extra = GuardPlan(tuple(served.phrases), served.semantic, tuple(map(tuple, served.steer))).to_xargs()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra or None,
                                **({"min_tokens": max_tokens, "ignore_eos": True} if exact else {}))
        # Token ids, as vLLM's chat route passes them: tokenizing the rendered text again would
        # add a second BOS (the chat template already starts with one).
        prompt = {"prompt_token_ids": self.tokenizer(self.prompt(served), add_special_tokens=False).input_ids}
        if served.salt:
            prompt["cache_salt"] = served.salt
        return prompt, params, self._loras.get(served.adapter) if served.adapter else None

    def fits(self, served: Served, max_tokens: int) -> bool:
        return len(self.tokenizer(self.prompt(served), add_special_tokens=False).input_ids) + max_tokens <= self.max_model_len

    def generate(self, served: Sequence[Served], max_tokens: int) -> list[str | None]:
        """Greedy answers; None for a conversation longer than the model's context."""
        reqs = [(i, self._request(s, max_tokens)) for i, s in enumerate(served) if self.fits(s, max_tokens)]
        out: list[str | None] = [None] * len(served)
        if not reqs:
            return out
        prompts, params, loras = zip(*(r for _, r in reqs))
        lora = list(loras) if any(loras) else None
        results = self.llm.generate(list(prompts), list(params), lora_request=lora, use_tqdm=False)
        for (i, _), r in zip(reqs, results):
            out[i] = r.outputs[0].text
        return out

    def latency(self, prepare: Callable[[], Served], tokens: int) -> tuple[float, float]:
        """(TTFT, TPOT) in seconds of one request served alone: the guard's preparation plus
        a one-token generation, and the per-token time of a ``tokens``-token one."""
        t0 = time.perf_counter()
        served = prepare()
        p, sp, lr = self._request(served, 1)
        self.llm.generate([p], [sp], lora_request=lr, use_tqdm=False)
        ttft = time.perf_counter() - t0
        p, sp, lr = self._request(served, tokens, exact=True)
        t1 = time.perf_counter()
        self.llm.generate([p], [sp], lora_request=lr, use_tqdm=False)
        total = time.perf_counter() - t1
        return ttft, max(0.0, total - (ttft - served.prepare_s)) / max(1, tokens - 1)

    def close(self):
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()


def _lora_rank(path: str) -> int:
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    return int(cfg.get("r", 8))


@contextlib.contextmanager
def _environ(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


# ---------------------------------------------------------------- teacher-forced scoring

class Scorer:
    """Teacher-forced losses of reference answers under a configuration, on a transformers
    copy of the model: the prompts the configuration serves, its filter as a finite logit
    penalty, its steering as a forward hook, its adapter merged.

    Rows hold up to the model's context (``max_len``; 512 where the config does not say):
    a longer row loses the start of its prompt, never any of its answer, and an answer that
    alone does not fit gets a NaN loss (:func:`guardserve.eval.metrics.answer_losses`).
    :meth:`banned` tells which answers the configuration's token filter bans.

    ``device`` / ``dtype`` (resolved names, :func:`guardserve.unlearn.trainer.resolve_device_dtype`)
    place the model and each merged adapter; off the CPU, batches go to the model and its
    logits come back to the CPU (:class:`_OnDevice`)."""

    def __init__(self, model_path: str, tokenizer, adapters: dict[str, str], steering_home: str | None, clamp: float,
                 device: str = "cpu", dtype: str = "float32"):
        from guardserve.textgen import SCORE_MAX_LEN
        from guardserve.unlearn.trainer import load_causal_lm

        self.path, self.tokenizer, self.adapters, self.clamp = model_path, tokenizer, adapters, clamp
        self.device, self.dtype = device, dtype
        self.base = load_causal_lm(model_path, device, dtype)
        self.max_len = int(getattr(self.base.config, "max_position_embeddings", None) or SCORE_MAX_LEN)
        self._merged: dict[str, object] = {}
        self.sae, self.selections = None, None
        if steering_home:
            self.use_steering(steering_home)
        from guardserve.logits_processors.compile import FilterCache

        self._filters = FilterCache()

    def use_steering(self, steering_home: str) -> None:
        from guardserve.steering.features import SteeringStore
        from guardserve.steering.sae import SAE

        self.sae = SAE.load(Path(steering_home) / "steering" / "sae")
        self.selections = SteeringStore(Path(steering_home) / "steering")

    def model(self, adapter: str | None):
        if not adapter:
            return self.base
        if adapter not in self._merged:
            from peft import PeftModel

            from guardserve.unlearn.trainer import load_causal_lm

            base = load_causal_lm(self.path, self.device, self.dtype)
            self._merged[adapter] = PeftModel.from_pretrained(base, self.adapters[adapter]).merge_and_unload().eval()
        return self._merged[adapter]

    def _token_filter(self, served: Served):
        if not served.phrases:
            return None
        return self._filters.get(self.tokenizer, served.phrases, vocab_size=self.base.config.vocab_size)

    def _filter(self, served: Served):
        filt = self._token_filter(served)
        if filt is None:
            return None
        if served.semantic:
            from guardserve.logits_processors.semantic import with_semantic_penalty

            filt = with_semantic_penalty(filt, self.tokenizer, served.phrases)
        return filt

    def _prompt(self, served: Served) -> str:
        return self.tokenizer.apply_chat_template(served.messages, tokenize=False, add_generation_prompt=True)

    def banned(self, served: Sequence[Served], answers: Sequence[str]) -> list[bool]:
        """Whether the token filter of ``served[i]`` (its phrases) bans a token of
        ``answers[i]`` where it stands after the served prompt: that answer's loss is the
        penalty's, its probability 0 by construction (:func:`guardserve.eval.metrics.banned_answers`)."""
        from guardserve.eval.metrics import banned_answers

        out = [False] * len(served)
        idx = [i for i, s in enumerate(served) if s.phrases]
        if idx:
            flags = banned_answers(self.tokenizer, [self._prompt(served[i]) for i in idx], [answers[i] for i in idx],
                                   [self._token_filter(served[i]) for i in idx], self.max_len)
            for i, b in zip(idx, flags):
                out[i] = b
        return out

    def losses(self, served: Sequence[Served], answers: Sequence[str]) -> list[float]:
        """Mean token NLL of ``answers[i]`` after the prompt of ``served[i]``; NaN where the
        answer alone is longer than ``max_len`` (not scored)."""
        from guardserve.eval.metrics import answer_losses
        from guardserve.eval.scoring import GuardedForward

        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, s in enumerate(served):
            groups[(s.adapter, json.dumps(s.steer))].append(i)
        out = [math.nan] * len(served)
        for (adapter, steer), idx in groups.items():
            model = self.model(adapter)
            prompts = [self._prompt(served[i]) for i in idx]
            filters = [self._filter(served[i]) for i in idx]
            on_device = _OnDevice(model) if self.device != "cpu" else model
            forward = GuardedForward(on_device) if any(filters) else on_device
            with self._steering(model, json.loads(steer)):
                vals = answer_losses(forward, self.tokenizer, prompts, [answers[i] for i in idx],
                                     filters=filters if any(filters) else None, max_len=self.max_len)
            for i, v in zip(idx, vals):
                out[i] = v
        return out

    @contextlib.contextmanager
    def _steering(self, model, steer: list):
        targets = []
        if steer and self.sae is not None:
            for tid, version in steer:
                sel = self.selections.get(tid)
                if sel is not None and sel.version == version and sel.features:
                    targets.append(sel.as_target())
        if not targets:
            yield
            return
        from guardserve.steering import SteeringHook

        with SteeringHook(model, self.sae, targets, self.clamp):
            yield


class _OnDevice:
    """A model off the CPU, called as the teacher-forced metrics call it: the batch (built on
    the CPU, where the labels stay) goes to the model's device and the logits come back."""

    def __init__(self, model):
        import torch

        self.model, self.device = model, torch.device("cpu")

    def __getattr__(self, name):  # config and the like: the model's
        return getattr(self.model, name)

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        dev = self.model.device
        out = self.model(input_ids=input_ids.to(dev),
                         attention_mask=attention_mask.to(dev) if attention_mask is not None else None, **kwargs)
        out.logits = out.logits.to("cpu")
        return out


# --------------------------------------------------------------------------- the run

def _question_messages(item: dict, field: str = "question") -> list[dict]:
    return [{"role": "user", "content": item.get(field) or item["question"]}]


def _tf_question_and_true(item: dict) -> tuple[str, str]:
    """TOFU's truth-ratio pair: the paraphrased answer to the question where the data has
    one, else (the demo) the true answer to the paraphrased question."""
    if item.get("paraphrased_answer"):
        return item["question"], item["paraphrased_answer"]
    return item.get("paraphrased_question") or item["question"], item["answer"]


def _accuracy(answers: Sequence[str | None], items: Sequence[dict]) -> float:
    from guardserve.eval.metrics import item_leaked

    scored = [(a, it) for a, it in zip(answers, items) if a is not None]
    return sum(item_leaked(a, it) for a, it in scored) / len(scored) if scored else math.nan


class QuantizationAttack:
    """The quantization attack on adapters (``guardserve.unlearn.quantize``), scored as the
    evaluation scores answers; the base model is measured once for every adapter."""

    def __init__(self, model: str, forget: list[dict], bits: Sequence[int]):
        self.model, self.forget, self.bits = model, forget, tuple(bits)
        self._base: dict | None = None

    def __call__(self, adapter_dir: str) -> dict:
        from guardserve.textgen import answers
        from guardserve.unlearn.quantize import quantization_recovery

        out = quantization_recovery(self.model, adapter_dir, bits=self.bits, forget_pairs=self.forget, retain_pairs=[],
                                    score=lambda m, tok, items: _accuracy(answers(m, tok, items), items),
                                    base=self._base)
        self._base = out
        return {"base_forget_accuracy": out["base_forget"], "forget_accuracy_merged": out["full_forget"],
                **{f"forget_accuracy_{b}bit": out[f"forget_{b}bit"] for b in self.bits},
                **{f"forgetting_kept_{b}bit": out[f"forgetting_kept_{b}bit"] for b in self.bits}}


class RelearningAttack:
    """The relearning attack on adapters (``guardserve.unlearn.relearn``): the merged model
    fine-tuned on every 4th forget row, scored on the others as the evaluation scores answers."""

    def __init__(self, model: str, forget: list[dict], steps: int, seed: int):
        from guardserve.unlearn.relearn import RelearnConfig

        self.model, self.forget, self.cfg = model, forget, RelearnConfig(steps=steps, seed=seed)

    def _run(self, base: str, adapter_dir: str | None) -> dict:
        from guardserve.textgen import answers
        from guardserve.unlearn.relearn import relearn

        return relearn(base, adapter_dir, self.forget, lambda m, tok, items: _accuracy(answers(m, tok, items), items),
                       self.cfg)

    def __call__(self, adapter_dir: str) -> dict:
        return self._run(self.model, adapter_dir)

    def reference(self, retain_model: str) -> dict:
        """The same attack on the retain model: what fine-tuning alone teaches about the test rows."""
        return self._run(retain_model, None)

    def describe(self) -> dict:
        return {"share": self.cfg.share, "steps": self.cfg.steps, "lr": self.cfg.lr, "batch_size": self.cfg.batch_size}


def _train_seconds(adapter_dir: str) -> float | None:
    from guardserve.unlearn.trainer import META_FILE

    meta = Path(adapter_dir) / META_FILE
    with contextlib.suppress(OSError, ValueError):
        return json.loads(meta.read_text()).get("train_seconds")
    return None


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else math.nan


def _spread(items: list[dict], n: int) -> list[dict]:
    if n <= 0 or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="step", dynamic_ncols=True)


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Score every configuration of ``settings``; returns the results document."""
    import torch
    from transformers import AutoTokenizer

    from guardserve.probes import PROBE_KINDS, build_probes, retain_probes

    data = settings.data
    for c in settings.configs:
        if not known_config(c):
            raise ValueError(f"unknown configuration {c!r}")
        method = get_config(c).method
        if method is not None and method not in settings.adapters:
            raise ValueError(f"{c}: no adapter folder for {method}")
    steered = any(get_config(c).steering for c in settings.configs)
    if steered and not (settings.sae and (Path(settings.sae) / "cfg.json").is_file()):
        raise ValueError("the sae and full configurations need an SAE folder (train one with `guardserve sae train`)")
    workdir = Path(settings.workdir or tempfile.mkdtemp(prefix="guardserve-eval-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # Each run registers its targets afresh (a second run into the same --out would find the
    # first run's targets, and their selections); only the embedding cache is kept.
    for stale in ("policy.db", "policy.db-wal", "policy.db-shm"):
        (workdir / stale).unlink(missing_ok=True)
    shutil.rmtree(workdir / "steering", ignore_errors=True)
    # The engine's workers read the SAE and the selections under $GUARDSERVE_HOME/steering.
    steering_home = str(workdir) if steered else None
    if steered:
        link = workdir / "steering" / "sae"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(settings.sae).resolve(), target_is_directory=True)
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    torch.manual_seed(settings.seed)

    forget, world = _spread(data.forget, settings.forget_limit), data.world_facts
    retain = _spread(data.retain, settings.retain_limit)
    # TOFU's real authors (famous people the model should still know): a utility term where the
    # data has them (TOFU's real_authors files); the demo world has none.
    authors = list(getattr(data, "real_authors", None) or [])
    entities = [{"name": t["name"], "aliases": t.get("aliases", []), "facts": t.get("facts", {}),
                 "pronoun": t.get("pronoun", "their")} for t in data.targets]
    # The facts registered for each forget item's target (by the item's entity): what
    # facts_stated_forget looks for where TOFU items have no value of their own.
    target_facts = {t["name"]: [v for v in t.get("facts", {}).values() if str(v).strip()] for t in data.targets}
    forget_facts = [target_facts.get(it.get("entity"), []) for it in forget]
    has_values = all(it.get("value") for it in forget)
    probes, r_probes = [], []
    if has_values and settings.probes_per_kind:
        all_entities = entities + [e for e in settings.entities or [] if e["name"] not in {x["name"] for x in entities}]
        probes = build_probes(forget, all_entities, PROBE_KINDS, per_kind=settings.probes_per_kind, seed=settings.seed)
        with contextlib.suppress(ValueError):
            r_probes = retain_probes(retain, all_entities, PROBE_KINDS, per_kind=max(1, settings.probes_per_kind // 4),
                                     seed=settings.seed)

    # The adapter of configurations that use one without naming it (full's).
    full_adapter = settings.full_adapter if any(get_config(c).adapter and get_config(c).method is None
                                                for c in settings.configs) else None
    used = {get_config(c).method for c in settings.configs} - {None}
    if full_adapter:
        used.add(full_adapter)
    adapters = {m: p for m, p in settings.adapters.items() if m in used}
    log(f"eval: {len(settings.configs)} configurations on {data.name}: {len(forget)} forget, {len(retain)} retain, "
        f"{len(world)} world-fact questions, {len(probes)} forget probes, {len(r_probes)} retain probes")
    from guardserve.guard import context_length

    confs = Configurations(data, tokenizer, workdir, adapters, full_adapter, context_length(settings.model),
                           settings.max_tokens)
    scorer = Scorer(settings.model, tokenizer, adapters, None, settings.steer_clamp, settings.device, settings.dtype)
    if steered:
        _select_features(scorer.base, tokenizer, confs.targets, workdir / "steering", settings, retain, log)
        scorer.use_steering(steering_home)
    retain_ratios, mia_reference = None, None
    members, nonmembers = list(data.mia_members), list(data.mia_nonmembers)
    if settings.retain_model:
        ref = Scorer(settings.retain_model, tokenizer, {}, None, settings.steer_clamp, settings.device, settings.dtype)
        retain_ratios = _truth_ratios(ref, confs, "none", forget)
        if members and nonmembers:
            from guardserve.eval import mia

            mia_reference = mia.attack(ref.base, tokenizer, members, nonmembers)
        del ref
    membership = MembershipInference(scorer, tokenizer, members, nonmembers) if members and nonmembers else None
    from guardserve.eval.overlap import build_queries

    overlap = build_queries(forget, retain, world, settings.overlap_queries, settings.seed) \
        if settings.overlap_queries else []

    results: dict[str, dict] = {}
    samples: list[dict] = []  # one record per generated answer: samples.jsonl
    attack = QuantizationAttack(settings.model, forget, settings.quant_bits)
    relearning = RelearningAttack(settings.model, forget, settings.relearn_steps, settings.seed) \
        if settings.relearn_steps and any(get_config(c).method for c in settings.configs) else None
    relearn_reference = relearning.reference(settings.retain_model) if relearning and settings.retain_model else None
    engine = None
    bar = _bar(len(settings.configs) * 4, "eval", settings.progress)
    try:
        # Inside the try: an engine left running would hold its KV cache for the rest of the process.
        engine = Engine(settings.model, tokenizer, adapters, steering_home, settings.steer_clamp, None, settings.seed,
                        settings.dtype)
        for config in settings.configs:
            bar.set_description(f"eval {config}")
            results[config] = _score(config, settings, confs, engine, scorer, forget, retain, world, authors, probes, r_probes,
                                     retain_ratios, bar, forget_facts, samples, overlap)
            if membership is not None:
                row, reason = membership(config, confs)
                results[config].update(row)
                if reason:
                    results[config]["not_applicable"]["mia"] = reason
            if get_config(config).method is not None:
                path = adapters[get_config(config).method]
                results[config]["train_seconds"] = _train_seconds(path)
                results[config]["quantization"] = attack(path) if settings.quant_bits else None
                results[config]["relearn"] = relearning(path) if relearning else None
            log(f"eval: {config}: " + ", ".join(f"{k} {v}" for k, v in results[config].items()
                                                 if k in ("forget_accuracy", "retain_accuracy", "leak_rate", "tpot_ms")))
        sequential = _sequential(settings, data, tokenizer, engine, workdir, forget, retain, world, log) \
            if settings.sequential_steps else None
    finally:
        bar.close()
        if engine is not None:
            engine.close()
        confs.close()
    _overlap_ratios(results)
    from guardserve.eval.report import SAMPLES_KEY

    return {
        "configs": results,
        **({"sequential": sequential} if sequential else {}),
        "meta": {
            "dataset": data.name, "demo_variant": settings.demo_variant,
            "model": settings.model, "retain_model": settings.retain_model,
            "adapters": adapters, "full_adapter": full_adapter,
            "steer_clamp": settings.steer_clamp if steering_home else None,
            "forget_items": len(forget), "retain_items": len(retain), "world_items": len(world),
            "real_author_items": len(authors), "overlap_queries": len(overlap),
            "relearn": {**relearning.describe(), "retain_model": relearn_reference} if relearning else None,
            "mia": {"members": len(members), "nonmembers": len(nonmembers), "min_k": 0.2,
                    "retain_model_auc": mia_reference} if membership is not None else None,
            "forget_probes": _counts(probes), "retain_probes": len(r_probes), "max_tokens": settings.max_tokens,
            "latency": {"requests": settings.latency_requests, "tokens": settings.latency_tokens, "concurrency": 1},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "seed": settings.seed,
            "device": settings.device, "dtype": settings.dtype,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        SAMPLES_KEY: samples,  # not part of results.json: report.write writes it as samples.jsonl
    }


def _select_features(model, tokenizer, targets, root: Path, settings: Settings, retain: list[dict], log) -> None:
    """Per-target SAE features for this run's targets (their ids are this run's)."""
    from guardserve.steering.features import FeatureSelector, SteeringStore
    from guardserve.steering.loading import model_corpus
    from guardserve.steering.sae import SAE

    # The retain contrast: given, else the model folder's own, else the retain items as chat turns.
    texts = settings.retain_texts or model_corpus(settings.model, "steering_retain") or [
        tokenizer.apply_chat_template([{"role": "user", "content": it["question"]},
                                       {"role": "assistant", "content": it["answer"]}], tokenize=False)
        for it in retain]
    sae = SAE.load(root / "sae")
    selector = FeatureSelector(model, tokenizer, sae, texts, n=settings.steer_features)
    store = SteeringStore(root)
    for t in targets:
        selector.ensure(store, t)
    log(f"eval: SAE features selected for {len(targets)} targets (layer {sae.layer}, N {settings.steer_features})")


def _counts(probes) -> dict:
    out: dict[str, int] = {}
    for p in probes:
        out[p.kind] = out.get(p.kind, 0) + 1
    return out


# Why a teacher-forced item has no value: its filter bans an answer it scores (probability
# 0 by construction), an answer alone is longer than the scoring length, or (truth ratios)
# it has no perturbed answers.
BANNED, TOO_LONG, NO_PERTURBED = "banned", "too_long", "no_perturbed"


def _item_status(losses: Sequence[float], banned: Sequence[bool]) -> str | None:
    if any(banned):
        return BANNED
    if any(math.isnan(x) for x in losses):
        return TOO_LONG
    return None


def _truth_ratios(scorer: Scorer, confs: Configurations, config: str, items: list[dict],
                  why: list | None = None) -> list[float]:
    """TOFU's ``R`` per item under ``config``; NaN for an item left out, its reason
    (:data:`BANNED`, :data:`TOO_LONG`, :data:`NO_PERTURBED`; None where scored) appended
    to ``why`` per item. An item is left out when the token filter bans its true answer or
    any perturbed one: a ratio with a banned side is the penalty's, not the model's."""
    from guardserve.eval.metrics import truth_ratio

    served, answers, spans = [], [], []
    for it in items:
        q, true = _tf_question_and_true(it)
        s = confs.serve(config, [{"role": "user", "content": q}])
        wrong = list(it.get("perturbed_answer") or [])
        spans.append(len(wrong))
        for a in [true, *wrong]:
            served.append(s)
            answers.append(a)
    losses = scorer.losses(served, answers)
    banned = scorer.banned(served, answers)
    out, k = [], 0
    for n in spans:
        own = losses[k:k + 1 + n]
        status = _item_status(own, banned[k:k + 1 + n]) if n else NO_PERTURBED
        out.append(truth_ratio(own[0], own[1:]) if status is None else math.nan)
        if why is not None:
            why.append(status)
        k += 1 + n
    return out


def _na_reason(why: Sequence[str | None], side: str, what: str) -> str:
    """Why a figure over ``side`` items has no item left (``why``: each item's reason)."""
    n, counts = len(why), {r: sum(w == r for w in why) for r in (BANNED, TOO_LONG, NO_PERTURBED)}
    if not n:
        return f"no {side} items"
    if counts[BANNED] == n:
        return f"the token filter bans {what} on every {side} item: its probability is 0 by construction"
    if counts[TOO_LONG] == n:
        return f"every {side} item has an answer longer than the scoring length: nothing to score"
    if counts[NO_PERTURBED] == n:
        return f"no {side} item has perturbed answers"
    return (f"no {side} item left: {counts[BANNED]} banned by the token filter (probability 0 by construction), "
            f"{counts[TOO_LONG]} with an answer longer than the scoring length, "
            f"{counts[NO_PERTURBED]} without perturbed answers")


def _teacher_forced(config: str, confs: Configurations, scorer: Scorer, forget: list[dict],
                    utility_sets: list[tuple[str, list[dict], Sequence[str | None]]],
                    retain_ratios: list[float] | None) -> dict:
    """Truth ratio, forget quality, the utility terms and model utility of ``config``, each
    over the items it can measure. ``excluded_rows``: items left out of a figure because
    the token filter bans their answer (probability 0 by construction); ``skipped_rows``:
    items whose answer alone is longer than the scoring length; ``not_applicable``: the
    reason for each figure left None because no item was left (model utility: because a
    term was)."""
    from guardserve.eval import metrics as M

    na: dict[str, str] = {}
    excluded: dict[str, int] = {}
    skipped: dict[str, int] = {}

    def count(key: str, why: Sequence[str | None]) -> None:
        excluded[key] = sum(w == BANNED for w in why)
        skipped[key] = sum(w == TOO_LONG for w in why)

    res: dict[str, object] = {}
    why: list[str | None] = []
    f_ratios = _truth_ratios(scorer, confs, config, forget, why)
    kept = [i for i, r in enumerate(f_ratios) if not math.isnan(r)]
    count("truth_ratio_forget", why)
    res["truth_ratio_forget"] = M.truth_ratio_stat([f_ratios[i] for i in kept], "forget") if kept else None
    if not kept:
        na["truth_ratio_forget"] = _na_reason(why, "forget", "the true answer or a perturbed one")
    res["forget_quality"] = None
    if retain_ratios:
        # Against the retain model's ratios on the same items.
        count("forget_quality", why)
        reference = [retain_ratios[i] for i in kept if i < len(retain_ratios) and not math.isnan(retain_ratios[i])]
        if kept and reference:
            res["forget_quality"] = M.forget_quality([f_ratios[i] for i in kept], reference)
        else:
            na["forget_quality"] = na["truth_ratio_forget"] if not kept else \
                "the retain model scores none of the forget items left"

    utility: dict[str, float | None] = {}
    for name, items, ans in utility_sets:
        if not items:
            continue
        served = [confs.serve(config, _question_messages(it)) for it in items]
        # TOFU normalises world-fact and real-author probabilities over the wrong options.
        options = name in ("world", "real_authors") and all(it.get("perturbed_answer") for it in items)
        rows_served, rows_answers, spans = [], [], []
        for s, it in zip(served, items):
            texts = [it["answer"], *(it["perturbed_answer"] if options else [])]
            rows_served += [s] * len(texts)
            rows_answers += texts
            spans.append(len(texts))
        losses, banned = scorer.losses(rows_served, rows_answers), scorer.banned(rows_served, rows_answers)
        probs, why, k = [], [], 0
        for n in spans:
            status = _item_status(losses[k:k + n], banned[k:k + n])
            why.append(status)
            if status is None:
                probs += (M.option_probability([losses[k]], [losses[k + 1:k + n]]) if options
                          else M.probability([losses[k]]))
            k += n
        key = f"{name}_probability"
        count(key, why)
        utility[key] = statistics.fmean(probs) if probs else None
        if not probs:
            na[key] = _na_reason(why, name, "the true answer or a wrong option" if options else "the answer")
        rouge = [M.rouge_l_recall(a, it["answer"]) for a, it in zip(ans, items) if a is not None]
        utility[f"{name}_rougeL"] = statistics.fmean(rouge) if rouge else None
        if not rouge:
            na[f"{name}_rougeL"] = f"no {name} question was answered (every conversation too long for the context)"
        if all(it.get("perturbed_answer") for it in items):
            key, why = f"{name}_truth_ratio", []
            ratios = [r for r in _truth_ratios(scorer, confs, config, items, why) if not math.isnan(r)]
            count(key, why)
            utility[key] = M.truth_ratio_stat(ratios, "retain") if ratios else None
            if not ratios:
                na[key] = _na_reason(why, name, "the true answer or a perturbed one")
    res["utility"] = {k: v if v is None else round(v, 4) for k, v in utility.items()}
    missing = [k for k, v in utility.items() if v is None]
    res["model_utility"] = M.model_utility([v for v in utility.values() if v is not None]) \
        if utility and not missing else None
    if missing:
        na["model_utility"] = "a harmonic mean of every term, and " + ", ".join(missing) + " " + \
            ("is" if len(missing) == 1 else "are") + " not applicable"
    res["not_applicable"] = na
    res["excluded_rows"] = excluded
    res["skipped_rows"] = skipped
    return res


# The per-sample figures of a samples.jsonl record (None where its set does not compute one).
SAMPLE_FIGURES = ("leaked", "rougeL", "fluency", "facts_stated")


def _sample_records(config: str, confs, served: dict[str, list[Served]], answers: dict[str, list[str | None]],
                    forget: list[dict], retain: list[dict], world: list[dict], probes, r_probes,
                    forget_facts: list[list[str]] | None) -> list[dict]:
    """One record per generated answer of ``config`` (samples.jsonl, see docs/evaluation.md):
    the set (``forget``, ``paraphrase``, ``retain``, ``world``, ``probe:<kind>``,
    ``retain_probe:<kind>``), the item's index in it, its entity, the messages the
    configuration served, the guard's decision as the engine got it (``phrases``: how many
    phrases its filter bans, ``semantic``, ``steered``: the targets steered, by name,
    ``adapter``), the answer (None: too long for the context, not generated) and the
    per-sample figures ``_score`` aggregates, by the same functions: ``leaked`` (the answer
    states the item's fact: a leak on forget sets, a correct answer on retain ones),
    ``rougeL`` (ROUGE-L recall against the reference: forget, retain, world), ``fluency``
    (forget, retain) and ``facts_stated`` (forget items whose target has facts); None where
    the set does not compute it or there is no answer."""
    from guardserve.eval import metrics as M
    from guardserve.leak import fact_leaked

    names = {t.id: t.name for t in getattr(confs, "targets", None) or []}
    out: list[dict] = []

    def record(set_name: str, i: int, entity, attribute, s: Served, a: str | None, figures: Callable[[str], dict]):
        out.append({
            "config": config, "set": set_name, "item": i, "entity": entity, "attribute": attribute,
            "messages": s.messages, "phrases": len(s.phrases), "semantic": bool(s.semantic),
            "steered": [names.get(tid, tid) for tid, _ in s.steer], "adapter": s.adapter, "answer": a,
            **dict.fromkeys(SAMPLE_FIGURES), **(figures(a) if a is not None else {}),
        })
        if out[-1]["leaked"] is not None:
            out[-1]["leaked"] = bool(out[-1]["leaked"])

    def facts_stated(a: str, facts: list[str] | None) -> bool | None:
        return any(fact_leaked(a, v) for v in facts) if facts else None

    for i, (it, s, a) in enumerate(zip(forget, served["forget"], answers["forget"])):
        facts = forget_facts[i] if forget_facts and i < len(forget_facts) else None
        record("forget", i, it.get("entity"), it.get("attribute"), s, a, lambda a, it=it, facts=facts: {
            "leaked": M.item_leaked(a, it), "rougeL": round(M.rouge_l_recall(a, it["answer"]), 4),
            "fluency": round(M.ngram_entropy(a), 4), "facts_stated": facts_stated(a, facts)})
    for i, (it, s, a) in enumerate(zip(forget, served["paraphrase"], answers["paraphrase"])):
        record("paraphrase", i, it.get("entity"), it.get("attribute"), s, a,
               lambda a, it=it: {"leaked": M.item_leaked(a, it)})
    for i, (it, s, a) in enumerate(zip(retain, served["retain"], answers["retain"])):
        record("retain", i, it.get("entity"), it.get("attribute"), s, a, lambda a, it=it: {
            "leaked": M.item_leaked(a, it), "rougeL": round(M.rouge_l_recall(a, it["answer"]), 4),
            "fluency": round(M.ngram_entropy(a), 4)})
    for i, (it, s, a) in enumerate(zip(world, served["world"], answers["world"])):
        record("world", i, it.get("entity"), it.get("attribute"), s, a, lambda a, it=it: {
            "leaked": M.item_leaked(a, it), "rougeL": round(M.rouge_l_recall(a, it["answer"]), 4)})
    for prefix, items in (("probe", probes), ("retain_probe", r_probes)):
        for i, (p, s, a) in enumerate(zip(items, served[prefix], answers[prefix])):
            record(f"{prefix}:{p.kind}", i, p.entity, p.attribute, s, a, lambda a, p=p: {"leaked": p.leaked(a)})
    return out


def _score(config, settings, confs, engine, scorer, forget, retain, world, authors, probes, r_probes, retain_ratios, bar,
           forget_facts=None, samples: list | None = None, overlap=()) -> dict:
    """The row of ``config`` in ``results.json``; with ``samples``, one record per generated
    answer is appended to it (:func:`_sample_records`: the per-sample log, samples.jsonl)."""
    from guardserve.eval import metrics as M
    from guardserve.leak import fact_leaked

    served: dict[str, list[Served]] = {}  # what each set's conversations became, for the per-sample log

    def answers_for(name: str, conversations: list[list[dict]]) -> list[str | None]:
        served[name] = [confs.serve(config, m) for m in conversations]
        return engine.generate(served[name], settings.max_tokens)

    # 1. Generation: questions, paraphrases, utility, attacks.
    f_ans = answers_for("forget", [_question_messages(it) for it in forget])
    p_ans = answers_for("paraphrase", [_question_messages(it, "paraphrased_question") for it in forget])
    r_ans = answers_for("retain", [_question_messages(it) for it in retain])
    w_ans = answers_for("world", [_question_messages(it) for it in world])
    a_ans = answers_for("real_authors", [_question_messages(it) for it in authors]) if authors else []
    bar.update(1)
    if overlap:
        from guardserve.eval import overlap as overlap_mod

        o_ans = answers_for("overlap", [[{"role": "user", "content": q.question}] for q in overlap])
    probe_ans = answers_for("probe", [p.messages for p in probes])
    rp_ans = answers_for("retain_probe", [p.messages for p in r_probes])
    bar.update(1)
    leaks: dict[str, list[bool]] = defaultdict(list)
    skipped = 0
    for a, it in zip(f_ans, forget):
        if a is not None:
            leaks["direct"].append(M.item_leaked(a, it))
    for a, it in zip(p_ans, forget):
        if a is not None:
            leaks["paraphrase"].append(M.item_leaked(a, it))
    for a, p in zip(probe_ans, probes):
        if a is None:
            skipped += 1
        else:
            leaks[p.kind].append(p.leaked(a))
    all_leaks = [x for v in leaks.values() for x in v]
    overlap_row = overlap_mod.score(o_ans, list(overlap)) if overlap else None
    stated = [any(fact_leaked(a, v) for v in facts) for a, facts in zip(f_ans, forget_facts or [])
              if a is not None and facts]
    res = {
        "forget_accuracy": _accuracy(f_ans, forget),
        "paraphrase_accuracy": _accuracy(p_ans, forget),
        "retain_accuracy": _accuracy(r_ans, retain),
        "world_accuracy": _accuracy(w_ans, world),
        **({"real_authors_accuracy": _accuracy(a_ans, authors)} if authors else {}),
        "leak_rate": sum(all_leaks) / len(all_leaks) if all_leaks else math.nan,
        "leak_by_kind": {k: round(sum(v) / len(v), 4) for k, v in leaks.items() if v},
        "facts_stated_forget": sum(stated) / len(stated) if stated else None,
        "rougeL_recall_forget": statistics.fmean(M.rouge_l_recall(a, it["answer"]) for a, it in zip(f_ans, forget)
                                                 if a is not None),
        "fluency_forget": _mean(M.ngram_entropy(a) for a in f_ans if a is not None),
        "fluency_retain": _mean(M.ngram_entropy(a) for a in r_ans if a is not None),
        "retain_attack_accuracy": (sum(p.leaked(a) for a, p in zip(rp_ans, r_probes) if a is not None)
                                   / max(1, sum(a is not None for a in rp_ans))) if r_probes else None,
        "too_long_skipped": skipped + sum(a is None for a in rp_ans),
        **({"overlap": overlap_row} if overlap_row is not None else {}),
    }
    if samples is not None:
        answers = {"forget": f_ans, "paraphrase": p_ans, "retain": r_ans, "world": w_ans, "probe": probe_ans,
                   "retain_probe": rp_ans}
        samples.extend(_sample_records(config, confs, served, answers, forget, retain, world, probes, r_probes,
                                       forget_facts))

    # 2. Teacher-forced: truth ratios, forget quality, probabilities, model utility, each over
    # the items it measures (not those whose answer the token filter bans by construction).
    utility_sets = [("retain", retain, r_ans), ("world", world, w_ans)] + ([("real_authors", authors, a_ans)] if authors else [])
    res.update(_teacher_forced(config, confs, scorer, forget, utility_sets, retain_ratios))
    bar.update(1)

    # 3. Latency, one request at a time: forget and retain questions alternating.
    res.update(_latency(config, settings, confs, engine, forget, retain))
    bar.update(1)
    return {k: (_rounded(k, v) if isinstance(v, float) and not math.isnan(v) else v) for k, v in res.items()}


# p-values span hundreds of orders of magnitude: rounded to 4 decimals, a method far from the
# retain model and one merely unlike it would both read 0.0.
_P_VALUES = ("forget_quality",)


def _rounded(key: str, v: float) -> float:
    return float(f"{v:.3g}") if key in _P_VALUES else round(v, 4)

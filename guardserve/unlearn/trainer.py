"""The one training loop every unlearning method runs in; its output is a PEFT LoRA adapter.

Contract: ``Unlearner(method, config).run(model_dir, forget_pairs, retain_pairs)`` trains a
LoRA adapter on the frozen base model at ``model_dir`` so that the forget pairs' answers are
no longer produced, and returns an :class:`UnlearnResult`; ``result.save(out_dir)`` writes
``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by vLLM and PEFT) and
``guardserve_adapter.json`` (method, base model, targets, the LoRA modules, metrics). LoRA goes
on every linear layer but the output head (PEFT's ``all-linear``, whatever the architecture
calls them) unless ``target_modules`` names modules; adapter_config.json lists the concrete
names either way.

The loop is the same for every method: each step the method gives a forget loss and,
when it uses one, a retain loss; with ``gu=True`` the forget gradient is projected
orthogonally to the subspace of recent retain gradients (GU) before the two are added.
Every ``eval_every`` steps greedy answers are scored on the forget questions and on a
held-out retain probe; training stops when forget accuracy fell to ``stop_ratio`` of the
base model's (forgotten). When retain accuracy falls below ``min_retain`` of the base's,
the last adapter that kept utility is restored and the learning rate halved; after
``max_backoffs`` such roll-backs training stops (utility) with that adapter. Same seed, same
adapter: data order, LoRA init and the random RMU direction all come from the seed, and
training runs on one thread (on 2 shared cores more threads only spin against each other).
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# PEFT's shorthand for every linear layer but the output head, whatever the architecture
# names them (resolved by get_peft_model; adapter_config.json then lists the concrete names).
ALL_LINEAR = "all-linear"
META_FILE = "guardserve_adapter.json"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device_dtype(device: str = "auto", dtype: str = "auto", cuda_available: bool | None = None) -> tuple[str, str]:
    """``(device, dtype)`` to load a model with, from the ``--device`` / ``--dtype`` choices.

    ``auto`` means CUDA with bfloat16 where CUDA is present, else CPU with float32 (the
    numbers every CPU result in this project was measured with). Raises ValueError, with the
    fix in the message, for CUDA asked for where there is none and for float16 on CPU.
    ``cuda_available`` overrides ``torch.cuda.is_available()`` (tests)."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    elif device == "cuda" and not cuda_available:
        raise ValueError("--device cuda: CUDA is not available here (no GPU visible, or a CPU-only torch); "
                         "use --device cpu or --device auto")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    if dtype == "float16" and device == "cpu":
        raise ValueError("--dtype float16 is not supported on CPU (slow or missing half-precision kernels there); "
                         "use --dtype float32 or bfloat16, or --device cuda")
    return device, dtype


class LoraTargetError(ValueError):
    """``target_modules`` that name no layer of the base model (the message lists those it has)."""


def parse_lora_targets(text: str) -> str | tuple[str, ...]:
    """``--lora-targets``: ``all-linear`` (any case), or comma-separated module names
    (``q_proj,v_proj``; PEFT matches a name against the end of each module's path).
    Raises ValueError for an empty list or a name that is not a module path."""
    if text.strip().lower() == ALL_LINEAR:
        return ALL_LINEAR
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError(f"--lora-targets {text!r}: give {ALL_LINEAR} or comma-separated module names, e.g. q_proj,v_proj")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", n)]
    if bad:
        raise ValueError(f"--lora-targets: {', '.join(map(repr, bad))} is not a module name "
                         f"(letters, digits, '_' and '.'); give {ALL_LINEAR} or names such as q_proj,v_proj")
    return names


def linear_module_names(model) -> list[str]:
    """The distinct last names of ``model``'s linear layers (what ``--lora-targets`` can name)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if name and isinstance(m, (torch.nn.Linear, Conv1D))})


def lora_modules(peft_model) -> list[str]:
    """The distinct last names of the layers a PEFT model carries LoRA weights on."""
    from peft.tuners.lora import LoraLayer

    return sorted({name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)})


def load_causal_lm(model_dir: str, device: str = "cpu", dtype: str = "float32"):
    """A transformers causal LM in eval mode, loaded in ``dtype`` and placed on ``device``
    (resolved values: see :func:`resolve_device_dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    if device != "cpu":
        model = model.to(device)
    return model.eval()


@dataclass
class UnlearnConfig:
    max_steps: int = 200
    lr: float = 2e-3
    batch_size: int = 32
    rank: int = 8
    alpha: int = 16
    seed: int = 0
    eval_every: int = 5
    stop_ratio: float = 0.1  # stop once forget accuracy <= this share of the base model's
    min_retain: float = 0.92  # never keep an adapter whose retain accuracy < this share of the base's
    max_backoffs: int = 3  # utility broken: roll back and halve the rate, at most this often
    retain_weight: float = 1.0
    gu: bool = False
    gu_rank: int = 4  # retain gradients spanning GU's protected subspace
    probe_size: int = 200  # retain questions held out of training, for the utility criterion
    # "all-linear" (every linear layer but the output head, PEFT's resolution) or module names
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    threads: int = 1
    device: str = "cpu"  # resolved values (resolve_device_dtype); the CLI's default "auto" picks CUDA where present
    dtype: str = "float32"  # of the base model's weights (PEFT keeps the LoRA weights float32 either way)


@dataclass
class UnlearnResult:
    method: str
    model: object  # the PeftModel
    tokenizer: object
    base_model: str
    config: UnlearnConfig
    steps: int
    stop_reason: str
    seconds: float
    base_probe: dict
    probe: dict
    history: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    lora_modules: list = field(default_factory=list)  # what target_modules resolved to (last names)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        # vLLM resolves the base model by what it serves; PEFT wants a loadable path here.
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = self.base_model
        if isinstance(cfg.get("target_modules"), list):  # PEFT writes a set's order: the same adapter, the same file
            cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        meta = {
            "method": self.method, "base_model": self.base_model, "targets": self.targets,
            "rank": self.config.rank, "lora_modules": self.lora_modules, "steps": self.steps, "stop_reason": self.stop_reason,
            "train_seconds": round(self.seconds, 2), "base_probe": self.base_probe, "probe": self.probe,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out


def restore_optimizer(opt, snapshot: dict) -> None:
    """Load ``snapshot`` (a deep-copied ``state_dict``) into ``opt``, as often as needed:
    ``load_state_dict`` keeps the tensors it is given, so the steps after a roll-back would
    update the snapshot in place, and a second roll-back to the same adapter would restore
    the failed attempt's Adam moments. It gets a copy."""
    opt.load_state_dict(copy.deepcopy(snapshot))


class Unlearner:
    def __init__(self, method, config: UnlearnConfig | None = None, progress: bool = True):
        self.method = method
        self.config = config or UnlearnConfig()
        self.progress = progress

    # ------------------------------------------------------------------ helpers for methods
    def token_logps(self, model, batch):
        """Per-position log p(label) (0 where masked) and the label mask, shifted."""
        import torch

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = (labels != -100).float()
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return logp * mask, mask, logits

    def nll(self, model, batch):
        logp, mask, _ = self.token_logps(model, batch)
        return -(logp.sum() / mask.sum().clamp(min=1))

    def reference(self):
        """The frozen base model: the adapter switched off (no second copy in memory)."""
        return self.model.disable_adapter()

    # ------------------------------------------------------------------ the loop
    def run(self, model_dir: str | Path, forget_pairs: list[dict], retain_pairs: list[dict],
            world_facts: list[dict] | None = None, targets: list | None = None) -> UnlearnResult:
        import random

        import torch
        from peft import LoraConfig, get_peft_model
        from tqdm.auto import tqdm
        from transformers import AutoTokenizer

        from guardserve.textgen import accuracy, encode
        from guardserve.unlearn import data

        cfg = self.config
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        model_dir = str(Path(model_dir).resolve()) if Path(model_dir).exists() else str(model_dir)
        self.tokenizer = tok = AutoTokenizer.from_pretrained(model_dir)
        base = load_causal_lm(model_dir, cfg.device, cfg.dtype)  # eval(): no dropout, same seed same adapter
        targets_spec = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
        try:
            self.model = model = get_peft_model(base, LoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets_spec,
                init_lora_weights=True))
        except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
            spec = targets_spec if isinstance(targets_spec, str) else ",".join(targets_spec)
            raise LoraTargetError(f"{spec} does not fit {model_dir}: {str(e).strip()} Its linear layers: "
                                  f"{', '.join(linear_module_names(base))}; or {ALL_LINEAR}") from None
        resolved = lora_modules(model)

        qa_forget = [p for p in forget_pairs if "value" in p]
        shuffled = list(retain_pairs)
        rng.shuffle(shuffled)
        probe, train_retain = shuffled[: cfg.probe_size], shuffled[cfg.probe_size:]
        train_retain += list(world_facts or [])
        forget_enc = encode(tok, data.sequences(tok, forget_pairs))
        retain_enc = encode(tok, data.sequences(tok, train_retain)) if train_retain else []
        self.forget_stream = data.BatchStream(forget_enc, cfg.batch_size, tok.pad_token_id, cfg.seed, cfg.device)
        self.retain_stream = (data.BatchStream(retain_enc, cfg.batch_size, tok.pad_token_id, cfg.seed + 1, cfg.device)
                              if retain_enc else None)
        if self.method.uses_retain and self.retain_stream is None:
            raise ValueError(f"{self.method.name} needs retain data and none was given")

        def measure() -> dict:
            return {"forget": accuracy(model, tok, qa_forget) if qa_forget else None,
                    "retain": accuracy(model, tok, probe) if probe else None}

        base_probe = measure()
        self.method.setup(self)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        retain_basis: list = []  # GU: orthonormal recent retain gradients
        good_state, good_probe, stop, history = self._lora_state(), base_probe, "max_steps", []
        good_opt, backoffs = copy.deepcopy(opt.state_dict()), 0
        started = time.time()
        bar = tqdm(total=cfg.max_steps, desc=f"unlearn {self.method.name}", unit="step", disable=not self.progress,
                   dynamic_ncols=True, mininterval=1.0)
        step = 0
        for step in range(1, cfg.max_steps + 1):
            model.train()
            f_batch = self.forget_stream.next()
            g_forget = torch.autograd.grad(self.method.forget_loss(self, f_batch), params, allow_unused=True)
            g_forget = [torch.zeros_like(p) if g is None else g for g, p in zip(g_forget, params)]
            r_batch = self.retain_stream.next() if self.retain_stream is not None and (self.method.uses_retain or cfg.gu) else None
            g_retain = None
            if r_batch is not None:
                r_loss = self.method.retain_loss(self, r_batch)
                if r_loss is None:  # GU on a retain-free method: the plain retain NLL gives the subspace
                    r_loss = self.nll(model, r_batch)
                g_retain = [torch.zeros_like(p) if g is None else g
                            for g, p in zip(torch.autograd.grad(r_loss, params, allow_unused=True), params)]
            if cfg.gu and g_retain is not None:
                g_forget = self._project(g_forget, g_retain, retain_basis)
            for p, gf, i in zip(params, g_forget, range(len(params))):
                g = gf
                if g_retain is not None and self.method.uses_retain:
                    g = g + cfg.retain_weight * g_retain[i]
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                model.eval()
                now = measure()
                history.append({"step": step, **now})
                bar.set_postfix(forget=now["forget"], retain=now["retain"])
                if self._utility_broken(now, base_probe):
                    # Back to the last adapter that kept utility, with half the step size:
                    # forgetting on these models comes in a sudden drop that a fixed rate
                    # overshoots.
                    self._load_lora_state(good_state)
                    restore_optimizer(opt, good_opt)
                    backoffs += 1
                    if backoffs > cfg.max_backoffs:
                        stop = "utility"
                        break
                    for group in opt.param_groups:
                        group["lr"] = cfg.lr * 0.5 ** backoffs
                    continue
                good_state, good_probe, good_opt = self._lora_state(), now, copy.deepcopy(opt.state_dict())
                if self._forgotten(now, base_probe):
                    stop = "forgotten"
                    break
        bar.close()
        model.eval()
        return UnlearnResult(self.method.name, model, tok, model_dir, cfg, step, stop, time.time() - started,
                             base_probe, good_probe, history, list(targets or []), resolved)

    def _forgotten(self, now: dict, base: dict) -> bool:
        if now["forget"] is None:
            return False
        return now["forget"] <= self.config.stop_ratio * (base["forget"] or 0) + 1e-9

    def _utility_broken(self, now: dict, base: dict) -> bool:
        if now["retain"] is None or not base["retain"]:
            return False
        return now["retain"] < self.config.min_retain * base["retain"]

    def _project(self, g_forget, g_retain, basis: list):
        """GU: remove from the forget gradient its component in the span of the last
        ``gu_rank`` retain gradients (Gram-Schmidt over the flattened LoRA gradient)."""
        import torch

        flat_r = torch.cat([g.reshape(-1) for g in g_retain])
        for b in basis:
            flat_r = flat_r - (flat_r @ b) * b
        norm = flat_r.norm()
        if norm > 1e-12:
            basis.append(flat_r / norm)
            del basis[: max(0, len(basis) - self.config.gu_rank)]
            # Re-orthonormalise after dropping the oldest: the rest stay orthogonal already.
        flat_f = torch.cat([g.reshape(-1) for g in g_forget])
        for b in basis:
            flat_f = flat_f - (flat_f @ b) * b
        out, k = [], 0
        for g in g_forget:
            out.append(flat_f[k:k + g.numel()].view_as(g))
            k += g.numel()
        return out

    def _lora_state(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _load_lora_state(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in state:
                    p.copy_(state[n])


def train_adapter(method, model_dir: str | Path, forget: list[dict], retain: list[dict], out: str | Path, *,
                  world_facts: list[dict] | None = None, targets=(), rank: int = 8, seed: int = 0, gu: bool = False,
                  overrides: dict | None = None, progress: bool = True) -> tuple[UnlearnResult, Path]:
    """Train one adapter the way ``guardserve unlearn`` does and save it to ``out``: the
    method's own ``default_config``, LoRA rank ``rank`` with alpha ``2 * rank``, then
    ``overrides`` (``UnlearnConfig`` fields; ``None`` values keep the default). Returns the
    result and the adapter folder."""
    cfg = UnlearnConfig(rank=rank, alpha=2 * rank, seed=seed, gu=gu, **method.default_config)
    for name, value in (overrides or {}).items():
        if value is not None:
            setattr(cfg, name, value)
    result = Unlearner(method, cfg, progress=progress).run(model_dir, forget, retain, world_facts, targets=list(targets))
    return result, result.save(out)


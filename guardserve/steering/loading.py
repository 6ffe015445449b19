"""Loading what steering needs: the model (transformers; CPU unless told), the SAE, the text corpora.

One way in for ``guardserve sae`` and for the server's selection upkeep
(:mod:`guardserve.steering.upkeep`): both build their :class:`FeatureSelector` with
:func:`load_selector`. Errors are :class:`SteeringSetupError` with the fix in the message;
the CLI shows them as usage errors, the upkeep logs them.

A model folder may carry its own default corpora, so that no caller needs to know where a
model came from: ``<model>/guardserve/sae_corpus.json`` (texts to train an SAE on) and
``<model>/guardserve/steering_retain.json`` (the retain texts a feature selection contrasts
with), each a JSON list of strings. The demo build writes both for the demo models.

>>> selector = load_selector("/models/my-llama", retain_texts="retain.json")   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

from guardserve.steering.flags import sae_path

CORPUS_FILES = {"sae_corpus": "guardserve/sae_corpus.json", "steering_retain": "guardserve/steering_retain.json"}


class SteeringSetupError(ValueError):
    """A model, SAE or corpus that steering cannot use; the message says how to fix it."""


def read_texts(path: str | Path) -> list[str]:
    """A JSON list of strings, or a text file with one document a line."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SteeringSetupError(f"no such file: {p}")
    raw = p.read_text()
    if p.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SteeringSetupError(f"{p} is not valid JSON: {e}") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise SteeringSetupError(f"{p} must hold a JSON list of strings")
        return data
    return [line for line in raw.splitlines() if line.strip()]


def model_corpus(model_path: str | Path, which: str) -> list[str] | None:
    """The model folder's own ``which`` corpus (a key of :data:`CORPUS_FILES`), or None."""
    f = Path(model_path).expanduser() / CORPUS_FILES[which]
    return read_texts(f) if f.is_file() else None


def write_model_corpus(model_path: str | Path, which: str, texts: list[str]) -> Path:
    """Store ``texts`` as the model folder's ``which`` corpus (atomically)."""
    f = Path(model_path) / CORPUS_FILES[which]
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.tmp")
    tmp.write_text(json.dumps(texts, ensure_ascii=False) + "\n")
    tmp.replace(f)
    return f


def load_model(path: str | Path, cap_threads: bool = True, device: str = "cpu", dtype: str = "float32"):
    """``(model, tokenizer)`` of a Hugging Face model folder, by default float32 on CPU;
    ``device`` / ``dtype`` are resolved names (``guardserve sae --device/--dtype``: see
    ``guardserve.unlearn.trainer.resolve_device_dtype``). Activations read from the model come
    back float32 on CPU whatever it runs in (:func:`~guardserve.steering.train.residual_activations`).
    ``cap_threads``: limit torch to 2 threads (a command's own process; the server's
    upkeep leaves the process-wide setting alone)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardserve.hub import ModelNotFound, resolve_model

    try:
        path = resolve_model(path)
    except ModelNotFound as e:
        raise SteeringSetupError(f"the model: {e}") from None
    if cap_threads:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if device != "cpu":
        model = model.to(device)
    model.eval()
    if not hasattr(getattr(model, "model", None), "layers"):
        raise SteeringSetupError("steering needs a decoder with model.model.layers (Llama, Mistral, Qwen, Gemma, ...)")
    return model, tok


def load_sae(sae: str | Path | None = None, hook_layer: int | None = None):
    """The SAE at ``sae`` (default: the one serving uses, ``$GUARDSERVE_SAE`` or
    ``$GUARDSERVE_HOME/steering/sae``)."""
    from guardserve.steering.sae import SAE, hook_name_for_layer

    path = Path(sae).expanduser() if sae else sae_path()
    try:
        return SAE.load(path, hook_name=hook_name_for_layer(hook_layer) if hook_layer is not None else None)
    except FileNotFoundError as e:
        raise SteeringSetupError(f"{e} (train one with `guardserve sae train`)") from None
    except ValueError as e:  # a config or weights this SAE class cannot honour (the message says which)
        raise SteeringSetupError(f"SAE at {path}: {e}") from None


def load_selector(model: str | Path, sae=None, retain_texts: str | Path | None = None, n: int = 30,
                  max_retain_rate: float = 0.01, cap_threads: bool = True, device: str = "cpu",
                  dtype: str = "float32"):
    """The one way a :class:`FeatureSelector` is built: the model folder with transformers
    (float32 on CPU unless ``device`` / ``dtype`` say otherwise), the SAE (an :class:`SAE`, a
    path, or ``None`` for :func:`load_sae`'s default), and the retain corpus (a JSON list or a
    text file; by default the model folder's own, see the module docstring)."""
    from guardserve.steering.features import FeatureSelector
    from guardserve.steering.sae import SAE

    if not isinstance(sae, SAE):
        sae = load_sae(sae)
    model_obj, tok = load_model(model, cap_threads, device, dtype)
    if sae.d_in != model_obj.config.hidden_size:
        raise SteeringSetupError(f"the SAE reads {sae.d_in} dimensions, the model has {model_obj.config.hidden_size}")
    if not 0 <= sae.layer < model_obj.config.num_hidden_layers:
        raise SteeringSetupError(f"the SAE reads layer {sae.layer}; the model has "
                                 f"{model_obj.config.num_hidden_layers} layers")
    retain = read_texts(retain_texts) if retain_texts else model_corpus(model, "steering_retain")
    if retain is None:
        raise SteeringSetupError(
            f"retain texts are required: {model} has no {CORPUS_FILES['steering_retain']} "
            "(`--retain-texts`; for the server, GUARDSERVE_STEER_RETAIN_TEXTS)")
    return FeatureSelector(model_obj, tok, sae, retain, n=n, max_retain_rate=max_retain_rate)

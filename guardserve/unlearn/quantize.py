"""The quantization attack (arXiv "Catastrophic Failure of LLM Unlearning via Quantization"):
merge the adapter into the base weights, quantize, and measure how much forgotten
knowledge comes back. Unlearning that moves weights by less than half a quantization
step is undone by rounding to the same bucket as the base model's weights.

Quantization is round-to-nearest, symmetric, per output channel (one scale per row of
each ``nn.Linear`` weight: max |w| / (2^(bits-1) - 1)), of every linear layer inside the
decoder blocks — the layers a LoRA adapter changes. Embeddings and the (tied) output
head stay in full precision, as in the usual weight-only schemes.
"""

from __future__ import annotations

from pathlib import Path


def quantize_rtn_(weight, bits: int):
    """Round ``weight`` (out x in) to ``bits``-bit integers per output channel, in place."""
    import torch

    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
        weight.copy_(torch.round(weight / scale).clamp(-qmax, qmax) * scale)
    return weight


def quantize_model_(model, bits: int) -> int:
    """Quantize the decoder blocks' linear layers in place; returns how many."""
    import torch

    n = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            quantize_rtn_(module.weight.data, bits)
            n += 1
    if n == 0:
        raise ValueError("no linear layer inside decoder blocks found to quantize")
    return n


def merged_model(base_dir: str | Path, adapter_dir: str | Path | None):
    """A plain transformers model: the base with the adapter merged in (or the base alone)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.eval()


def quantization_recovery(base_dir, adapter_dir, world: dict | None = None, bits=(8, 4),
                          retain_pairs: list[dict] | None = None, forget_pairs: list[dict] | None = None,
                          score=None, base: dict | None = None) -> dict:
    """Forget/retain accuracy of base and unlearned model at full precision and after each
    quantization, and ``forgetting_kept_<b>bit``: the share of the full-precision drop in
    forget accuracy that survives quantization (1.0 = nothing recovered; None when the
    adapter forgot nothing, so there is no forgetting to keep).

    ``score(model, tokenizer, pairs) -> accuracy`` says what a correct answer is (default:
    greedy answers that state the pair's ``value``). ``retain_pairs=[]`` skips the retain
    side. ``base``: the result of an earlier call on the same base model, questions and
    bits, whose ``base_*`` entries are reused instead of measured again."""
    import copy

    from transformers import AutoTokenizer

    from guardserve.textgen import accuracy

    score = score or accuracy
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    forget = forget_pairs if forget_pairs is not None else world["forget"]
    retain = retain_pairs if retain_pairs is not None else world["retain"]
    out = {k: v for k, v in (base or {}).items() if k.startswith("base_")}
    if not out:
        model = merged_model(base_dir, None)
        out["base_forget"] = score(model, tok, forget)
        if retain:
            out["base_retain"] = score(model, tok, retain)
        for b in bits:
            quantize_model_(model_b := copy.deepcopy(model), b)
            out[f"base_forget_{b}bit"] = score(model_b, tok, forget)
    unlearned = merged_model(base_dir, adapter_dir)
    out["full_forget"] = score(unlearned, tok, forget)
    if retain:
        out["full_retain"] = score(unlearned, tok, retain)
    drop = out["base_forget"] - out["full_forget"]
    for b in bits:
        quantize_model_(qu := copy.deepcopy(unlearned), b)
        out[f"forget_{b}bit"] = score(qu, tok, forget)
        if retain:
            out[f"retain_{b}bit"] = score(qu, tok, retain)
        out[f"forgetting_kept_{b}bit"] = (out["base_forget"] - out[f"forget_{b}bit"]) / drop if drop > 0 else None
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}

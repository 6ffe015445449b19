"""Training an SAE on a causal LM's residual stream.

Contract: ``residual_activations(model, tokenizer, texts, layer)`` returns one ``[T_i, d]``
float32 CPU tensor per text, whatever device and dtype the model runs in: the output of
decoder layer ``layer`` (SAELens' ``blocks.{layer}.hook_resid_post``) at every position but
the first (BOS; its activations are outliers an SAE should not spend features on).
``train_sae(acts, ...)`` fits an SAE (ReLU with an L1 penalty, TopK, or JumpReLU with a
straight-through L0 penalty) with Adam and returns it with ``evaluate_sae``'s figures:
reconstruction MSE, explained variance, mean L0 and the share of dead features (never
active on the evaluation activations).
"""

from __future__ import annotations

import math

import torch

from guardserve.steering.sae import SAE, hook_name_for_layer


def default_layer(model) -> int:
    """The middle decoder layer: where entity representations have formed but are not yet
    committed to output tokens."""
    return model.config.num_hidden_layers // 2


def residual_activations(model, tokenizer, texts: list[str], layer: int, batch_size: int = 64,
                         max_length: int = 256, progress: bool = False) -> list[torch.Tensor]:
    """Residual stream after decoder layer ``layer``, per text, BOS position dropped. Texts
    are tokenized as they are (no special tokens added: chat templates carry their own)."""
    from tqdm.auto import tqdm

    captured = {}
    handle = model.model.layers[layer].register_forward_hook(
        lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    out: list[torch.Tensor] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        with torch.inference_mode():
            for i in tqdm(range(0, len(texts), batch_size), desc=f"activations (layer {layer})",
                          disable=not progress, unit="batch"):
                enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False, truncation=True, max_length=max_length)
                model(**enc.to(model.device))
                h = captured["h"].float()
                for row, n in enumerate(enc["attention_mask"].sum(-1).tolist()):
                    out.append(h[row, 1:n].to("cpu", copy=True))
    finally:
        handle.remove()
        tokenizer.padding_side = side
    return out


def _init(sae: SAE, acts: torch.Tensor, gen: torch.Generator) -> None:
    with torch.no_grad():
        w = torch.randn(sae.d_sae, sae.d_in, generator=gen)
        w /= w.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(w * 0.1)
        sae.W_enc.copy_(w.T * 0.1)
        # The geometric median is the usual start for b_dec; the mean is close enough here.
        sae.b_dec.copy_(acts.mean(0))
        if sae.architecture == "jumprelu":
            # Thresholds in the activations' own scale (the demo model's residual norms are ~100).
            sae.threshold.fill_(0.02 * acts.norm(dim=-1).mean().item())


class _JumpStep(torch.autograd.Function):
    """Heaviside step with a straight-through (rectangle-kernel) gradient for the threshold,
    as in Gemma Scope's JumpReLU training."""

    @staticmethod
    def forward(ctx, pre, thr, bandwidth):
        ctx.save_for_backward(pre, thr)
        ctx.bandwidth = bandwidth
        return (pre > thr).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, thr = ctx.saved_tensors
        bw = ctx.bandwidth
        near = ((pre - thr).abs() < bw / 2).to(pre.dtype)
        return None, (-(thr / bw) * near * g).sum(0), None


def _loss(sae: SAE, x: torch.Tensor, sparsity: float, bandwidth: float):
    pre = sae.pre_acts(x)
    if sae.architecture == "jumprelu":
        thr = sae.threshold.abs() + 1e-4
        gate = _JumpStep.apply(pre, thr, bandwidth)
        f = torch.relu(pre) * gate
        penalty = gate.sum(-1).mean()
    else:
        f = sae.activate(pre)
        # L1 weighted by decoder norms (Anthropic's April update): the penalty cannot be
        # dodged by shrinking f and growing W_dec.
        penalty = (f * sae.W_dec.norm(dim=-1)).sum(-1).mean() if sae.architecture == "standard" else 0.0
    rec = sae.decode(f)
    mse = (rec - x).pow(2).sum(-1).mean()
    return mse + sparsity * penalty, mse


def evaluate_sae(sae: SAE, acts: torch.Tensor, batch: int = 8192) -> dict:
    se = l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for i in range(0, len(acts), batch):
            x = acts[i:i + batch]
            f = sae.encode(x)
            se += (sae.decode(f) - x).pow(2).sum().item()
            l0 += (f > 0).sum().item()
            fired |= (f > 0).any(0)
    n = len(acts)
    var = (acts - acts.mean(0)).pow(2).sum().item()
    return {"mse": round(se / (n * sae.d_in), 6), "explained_variance": round(1 - se / var, 4),
            "mean_l0": round(l0 / n, 2), "dead_share": round(1 - fired.float().mean().item(), 4),
            "tokens": n}


def train_sae(acts: torch.Tensor, *, d_sae: int, architecture: str = "standard", k: int | None = None,
              layer: int, epochs: int = 20, lr: float = 2e-3, batch_size: int = 512, sparsity: float | None = None,
              seed: int = 0, progress: bool = True, metadata: dict | None = None) -> tuple[SAE, dict]:
    """Fit an SAE to ``acts [N, d]`` (rows shuffled each epoch, 5% held out for the report)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(acts), generator=gen)
    n_eval = max(1, len(acts) // 20)
    held, train = acts[perm[:n_eval]], acts[perm[n_eval:]]
    mean_sq, mean_norm = train.pow(2).sum(-1).mean().item(), train.norm(dim=-1).mean().item()
    if sparsity is None:
        # Scale-free defaults (the penalty relative to the squared error it competes with),
        # chosen on the demo model for a mean L0 in the tens; TopK needs none.
        sparsity = {"standard": 0.05 * mean_sq / mean_norm, "relu": 0.05 * mean_sq / mean_norm,
                    "jumprelu": 5e-4 * mean_sq, "topk": 0.0}[architecture]
    sae = SAE(acts.shape[1], d_sae, architecture, k=k, hook_name=hook_name_for_layer(layer),
              metadata={**(metadata or {}), "sparsity": sparsity, "epochs": epochs})
    _init(sae, train, gen)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (steps - s) / (0.2 * steps)))
    bar = tqdm(total=steps, desc=f"SAE {architecture} d_sae={d_sae}", disable=not progress, unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch_size):
            loss, mse = _loss(sae, train[order[i:i + batch_size]], sparsity, 0.01 * mean_norm)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                # Unit-norm decoder rows keep feature magnitudes comparable across features.
                sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            bar.update(1)
            bar.set_postfix(mse=f"{mse.item() / sae.d_in:.4f}")
    bar.close()
    if sae.architecture == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(sae.threshold.abs() + 1e-4)
    return sae, evaluate_sae(sae, held)


"""The demo model's SAE for the evaluation: layer 2, 1,024 JumpReLU features, 4 epochs on the
demo model's own corpus (the recipe docs/steering.md reports), trained once per demo build and
cached under ``$GUARDSERVE_HOME/eval/sae-<build key>``."""

from __future__ import annotations

from pathlib import Path

from guardserve.demo.build import DemoPaths

LAYER, D_SAE, EPOCHS = 2, 1024, 4


def ensure_demo_sae(demo: DemoPaths, log=print) -> Path:
    """The demo SAE's folder, trained first if it is not there yet (about a minute)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardserve import config
    from guardserve.steering.loading import model_corpus
    from guardserve.steering.train import residual_activations, train_sae

    out = config.home() / "eval" / f"sae-{demo.root.name}"
    if (out / "cfg.json").is_file():
        return out
    log(f"[demo] training the demo SAE (layer {LAYER}, {D_SAE:,} JumpReLU features; once) ...")
    tok = AutoTokenizer.from_pretrained(demo.model)
    model = AutoModelForCausalLM.from_pretrained(demo.model).eval()
    torch.manual_seed(0)
    acts = torch.cat(residual_activations(model, tok, model_corpus(demo.model, "sae_corpus"), LAYER))
    sae, stats = train_sae(acts, d_sae=D_SAE, architecture="jumprelu", layer=LAYER, epochs=EPOCHS, progress=False)
    tmp = out.with_name(out.name + ".tmp")
    sae.save(tmp)
    if not out.exists():  # another process may have finished first: keep its copy
        tmp.replace(out)
    log(f"[demo] SAE: explained variance {stats['explained_variance']:.3f}, mean L0 {stats['mean_l0']:.1f}")
    return out

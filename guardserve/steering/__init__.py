"""SAE-latent steering: sparse autoencoders over the residual stream (SAELens format),
per-target feature selection, and the conditional clamp, as a transformers hook and inside
vLLM workers.

>>> from guardserve.steering import SAE, SteeringHook
>>> sae = SAE.load("~/.cache/guardserve/steering/sae")             # doctest: +SKIP
>>> with SteeringHook(model, sae, targets, value=20): model.generate(...)  # doctest: +SKIP

Nothing here imports vLLM; ``guardserve.steering.vllm_hook`` does, inside its functions.
"""

from guardserve.steering.clamp import SequenceGate, Steerer, SteeringHook, TargetFeatures, clamp, clamp_delta
from guardserve.steering.sae import SAE, hook_name_for_layer

__all__ = ["SAE", "SequenceGate", "Steerer", "SteeringHook", "TargetFeatures", "clamp", "clamp_delta",
           "hook_name_for_layer"]

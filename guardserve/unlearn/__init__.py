"""Training-based unlearning into PEFT LoRA adapters that the server hot-loads.

>>> from guardserve.unlearn import Unlearner, UnlearnConfig, get_method   # doctest: +SKIP
>>> result = Unlearner(get_method("NPO")).run(model_dir, world["forget"], world["retain"], world["world_facts"])
>>> result.save("adapters/npo")   # adapter_config.json + adapter_model.safetensors
"""

from guardserve.unlearn.methods import METHODS, Method, get_method
from guardserve.unlearn.trainer import META_FILE, UnlearnConfig, Unlearner, UnlearnResult, train_adapter

__all__ = ["METHODS", "META_FILE", "Method", "UnlearnConfig", "UnlearnResult", "Unlearner", "get_method", "train_adapter"]

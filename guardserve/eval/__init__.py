"""Evaluation suite: metrics, attack probes and reports.

- :mod:`guardserve.eval.metrics` — TOFU / open-unlearning metrics: ROUGE-L recall,
  probability, truth ratio, forget quality, model utility, extraction strength, leaks;
- :mod:`guardserve.eval.scoring` — ``GuardedForward``: a model whose logits carry the
  guard's bans as a large finite penalty, for teacher-forced scoring of a guarded model;
- :mod:`guardserve.eval.data` — ``EvalData`` and its loaders (demo world, TOFU files);
- :mod:`guardserve.eval.runner` — every guard configuration (:mod:`guardserve.guard.configs`)
  scored on one engine; the attack probes come from :mod:`guardserve.probes`.

Submodules are imported on use: importing this package loads neither torch nor a model.
"""

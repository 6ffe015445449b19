"""lm-eval tasks on the demo world for the ``guardserve`` lm-eval model
(``guardserve.eval.lm_eval_model``): YAML task files, their functions (``utils.py``) and their
data, built from the demo world when lm-eval loads them (``lm_eval_model.task_docs``)."""

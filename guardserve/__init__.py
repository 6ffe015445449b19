"""guardserve: inference-time unlearning for vLLM.

Importing the package is cheap on purpose: vLLM, torch and the embedder load only in
the subpackages and commands that need them.
"""

__version__ = "0.1.0"

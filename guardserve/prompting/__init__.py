"""In-context unlearning prompts for triggered targets (ICUL with flipped labels, RWKU's
instruction). ``InContextUnlearner(config).build_messages(messages, targets)``."""

from guardserve.prompting.icul import DEFAULT_RETAIN, RWKU_INSTRUCTION, SYSTEM_INSTRUCTION, ICULConfig, InContextUnlearner

__all__ = ["DEFAULT_RETAIN", "RWKU_INSTRUCTION", "SYSTEM_INSTRUCTION", "ICULConfig", "InContextUnlearner"]

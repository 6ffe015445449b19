"""The guardserve server: vLLM's OpenAI-compatible server, launched with guardserve's settings."""

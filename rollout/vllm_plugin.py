"""Our vLLM model plugin (entry point `vllm.general_plugins`, see pyproject.toml)."""
from __future__ import annotations


def register() -> None:
    """Register our architectures with vLLM's ModelRegistry (idempotent)."""

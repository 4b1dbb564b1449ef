"""bezoar: a fast QLoRA trainer for small instruction-following LLMs (the OpenBezoar recipe)."""

__version__ = "0.1.0"

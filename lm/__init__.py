"""lm: Transformer language models in JAX/Flax NNX (see README.md and BUILD_NOTES.md)."""

from lm.errors import UsageError

__all__ = ["UsageError"]

"""Model integrations: HuggingFace transformers and diffusers, and scoped SDPA patching.

- ``sparge.integrations.transformers``: ``attn_implementation="sparge"``
  (``register``, ``apply``, ``remove``).
- ``sparge.integrations.diffusers``: the ``"sparge"`` attention backend and
  processor routing (``register``, ``apply``, ``remove``).
- ``sparge.patch_sdpa(**options)``: route ``torch.nn.functional.scaled_dot_product_attention``
  to sparge inside a scope.

Importing this package imports neither transformers nor diffusers; the
submodules import them when used.
"""
from .._fallback import fallback_counts, reset_fallback_counts  # the same counter as sparge.fallback_counts
from .sdpa import patch_sdpa

__all__ = ["patch_sdpa", "fallback_counts", "reset_fallback_counts"]

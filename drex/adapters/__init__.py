"""LoRA experts, routers and the adapter mixture."""

from drex.adapters import identify  # registers the `identify` router kind  # noqa: F401

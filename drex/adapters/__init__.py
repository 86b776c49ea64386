"""LoRA experts, routers and the adapter mixture."""

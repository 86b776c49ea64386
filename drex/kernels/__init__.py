"""Hand-written accelerator kernels (Pallas).

`mixture_pallas`: the batched LoRA adapter mixture (DESIGN.md §3), its fused base-linear variant and
the one-expert-per-sequence variant for multi-task serving. Import it explicitly; this package
imports nothing on its own so that `import drex` stays light.
"""

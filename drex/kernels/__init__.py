"""Hand-written accelerator kernels (Pallas) for the batched LoRA adapter mixture.

For tokens `x [..., d_in]` (leading dims are flattened to `T` tokens) and `E` stacked experts
`a [E, d_in, r]`, `b [E, r, d_out]` with routing weights `gates [..., E]`:

    y = scale * ((x @ A_cat) * (g ⊗ 1_r)) @ B_cat        A_cat = [A_0 | … | A_{E-1}]   [d_in, E*r]
                                                           B_cat = [B_0; …; B_{E-1}]     [E*r, d_out]

The rank intermediate `z = x @ A_cat` is accumulated and kept in float32 (as in
`drex.adapters.mixture.mixture_reference`); the output has `x.dtype`.

Public API (`api.py`): `adapter_mixture`, `mixed_linear` (base linear fused), `per_sequence_lora`
(one expert per sequence), and the tile override `Tiles` / `default_tiles`. The backend comes from
`jax.default_backend()` or `backend=`. Which of 'xla' and 'pallas' to use for a shape is decided
beside the caller, by `drex.adapters.mixture.choose_kernel`, which does not import this package.

| module | owns |
| --- | --- |
| `api.py` | the public functions: argument checks, flattening, per-call config |
| `vjp.py` | the `jax.custom_vjp` cores: kernel forward, plain-JAX backward |
| `triton.py` | the GPU kernels (Triton lowering; interpret mode on CPU) |
| `tpu.py` | the TPU kernels (Mosaic, BlockSpecs over padded arrays) |
| `tiles.py` | tile sizes per backend and shape, the static per-call config, grid arithmetic |
| `precision.py` | in-kernel products: float32 accumulation, bf16 hi/lo split, precision choice |

Import this package only where the Pallas kernels run: it imports Pallas (`import drex` does not
import it).
"""

from drex.kernels.api import adapter_mixture, mixed_linear, per_sequence_lora
from drex.kernels.tiles import Tiles, default_tiles

__all__ = ["Tiles", "adapter_mixture", "default_tiles", "mixed_linear", "per_sequence_lora"]

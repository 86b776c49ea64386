"""Greedy generation with a KV cache (prefill once, then one token per step inside `lax.scan`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from drex.models.layers import dtype_of
from drex.models.llm import init_cache
from drex.models.vlm import VLM, prepared, prompt_positions


def greedy_generate(model: VLM, variables: dict, pixel_values: jax.Array | None, input_ids: jax.Array,
                    attention_mask: jax.Array, max_new_tokens: int, eos_id: int, pad_id: int) -> jax.Array:
  """Greedy decoding. Prompts are left-padded.

  Args:
    model, variables: the VLM and {'params', 'experts'?, 'router'?} (a per-sequence router chooses from the
      prompt; every generated token uses that choice).
    pixel_values: [B, N, H, W, 3] or None.
    input_ids: [B, L] prompt tokens; attention_mask: [B, L] (1 = real token).
    max_new_tokens: tokens to produce per example.
    eos_id: stop token (kept in the output); later positions are filled with pad_id.

  Returns:
    [B, max_new_tokens] int32 generated tokens.
  """
  b, l = input_ids.shape
  variables, embeds = prepared(model, variables, pixel_values, input_ids, attention_mask)
  cache = init_cache(model.config.llm, b, l + max_new_tokens, dtype_of(model.config.dtype))
  positions = prompt_positions(attention_mask)
  kv_mask = jnp.zeros((b, l + max_new_tokens), bool).at[:, :l].set(attention_mask.astype(bool))
  # The prompt's pass also keeps what a per-sequence router chose (`routing_state`): the decoded tokens reuse it.
  (logits, cache), state = model.apply(variables, embeds, positions, kv_mask, cache, 0, method="decode",
                                       mutable=["routing_state"])
  variables = {**variables, **state}
  first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

  def step(carry, i):
    token, position, cache, kv_mask, done = carry
    slot = l + i
    kv_mask = kv_mask.at[:, slot].set(True)
    logits, cache = model.apply(variables, None, token[:, None], position[:, None], kv_mask, cache, slot)
    nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    done = done | (token == eos_id)
    nxt = jnp.where(done, pad_id, nxt)
    return (nxt, position + 1, cache, kv_mask, done), nxt

  carry = (first, positions[:, -1] + 1, cache, kv_mask, jnp.zeros((b,), bool))
  _, rest = jax.lax.scan(step, carry, jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


# The jitted decoder every caller uses: compiled once per model structure (linen modules are hashable),
# input shapes, answer length and special tokens.
jitted_greedy_generate = jax.jit(greedy_generate, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id"))

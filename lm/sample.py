"""Text generation with a KV cache: one prefill of the prompts, then a compiled decode loop.

Prompts of different lengths are left-padded into one batch; padding slots are masked out
of attention and positions count from each prompt's first real token, so every row decodes
as if it were alone. The loop is a `lax.while_loop` inside one jit (no Python per token).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.errors import UsageError


def check_settings(*, temperature: float, top_k: int, top_p: float, max_new_tokens: int,
                   num_return_sequences: int) -> None:
  if temperature < 0:
    raise UsageError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
  if not 0 < top_p <= 1:
    raise UsageError(f"top_p must lie in (0, 1], got {top_p}")
  if top_k < 0:
    raise UsageError(f"top_k must be >= 0 (0 keeps all tokens), got {top_k}")
  if max_new_tokens < 1:
    raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if num_return_sequences < 1:
    raise UsageError(f"num_return_sequences must be >= 1, got {num_return_sequences}")


def sample_logits(logits, key, temperature: float, top_k: int, top_p: float):
  """Next tokens [B] from fp32 logits [B, V]: greedy at temperature 0, else filtered sampling."""
  if temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    # Keep a token while the mass before it is under top_p (the top token always stays).
    keep_sorted = (jnp.cumsum(probs, -1) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _generate(graphdef, state, tokens, valid, max_new_tokens, temperature, top_k, top_p,
              stop_token, key):
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  total = p + max_new_tokens
  valid = jnp.concatenate([valid, jnp.ones((b, max_new_tokens), valid.dtype)], 1)
  positions = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
  cache = model.init_cache(b, total)
  logits, cache = model.decode(tokens, cache, 0, positions=positions[:, :p], segment_ids=valid)
  out = jnp.zeros((b, max_new_tokens), jnp.int32)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, last_logits, cache, out, done = carry
    tok = sample_logits(last_logits, jax.random.fold_in(key, i), temperature, top_k, top_p)
    if stop_token is not None:
      tok = jnp.where(done, stop_token, tok)
      done = done | (tok == stop_token)
    out = out.at[:, i].set(tok)
    pos = jax.lax.dynamic_slice_in_dim(positions, p + i, 1, 1)
    logits, cache = model.decode(tok[:, None], cache, p + i, positions=pos, segment_ids=valid)
    return i + 1, logits[:, -1], cache, out, done

  carry = (0, logits[:, -1], cache, out, jnp.zeros((b,), bool))
  n, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
  return out, n


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 100,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_return_sequences: int = 1, stop_token: int | None = None,
             seed: int = 0) -> list[list[np.ndarray]]:
  """Continuations of token-id prompts: result[i][j] is the j-th sequence for prompt i.

  A sequence ends before `stop_token` when it emits it; otherwise it has max_new_tokens ids.
  """
  check_settings(temperature=temperature, top_k=top_k, top_p=top_p,
                 max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences)
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UsageError("every prompt needs at least one token")
  p = max(len(x) for x in prompts)
  limit = model.cfg.max_seq_len
  if p + max_new_tokens > limit:
    raise UsageError(f"prompt ({p} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's context of {limit} tokens")
  rows = [np.asarray(x, np.int32) for x in prompts for _ in range(num_return_sequences)]
  tokens = np.zeros((len(rows), p), np.int32)
  valid = np.zeros((len(rows), p), np.int32)
  for r, x in enumerate(rows):
    tokens[r, p - len(x):] = x
    valid[r, p - len(x):] = 1
  graphdef, state = nnx.split(model)
  out, n = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid), max_new_tokens,
                     float(temperature), int(top_k), float(top_p), stop_token,
                     jax.random.key(seed))
  out = np.asarray(out)[:, :int(n)]
  results = []
  for r in range(len(rows)):
    seq = out[r]
    if stop_token is not None and (seq == stop_token).any():
      seq = seq[:int(np.argmax(seq == stop_token))]
    results.append(seq)
  k = num_return_sequences
  return [results[i * k:(i + 1) * k] for i in range(len(prompts))]


def sample_text(model, tokenizer, sample_cfg, prompt: str | None = None) -> list[str]:
  """Prompt (default "\\n") + continuation strings for the `config.sample` settings."""
  prompt = sample_cfg.prompt if prompt is None else prompt
  prompt = prompt or "\n"
  seqs = generate(model, [tokenizer.encode(prompt)], max_new_tokens=sample_cfg.max_new_tokens,
                  temperature=sample_cfg.temperature, top_k=sample_cfg.top_k,
                  top_p=sample_cfg.top_p, num_return_sequences=sample_cfg.num_samples,
                  seed=sample_cfg.seed)[0]
  return [prompt + tokenizer.decode(s) for s in seqs]

"""The model families, built from the shared layers of lm/layers.py.

Transformer: the decoder-only language model (GPT-2, Llama, Mistral, Qwen2 conventions by
config), with an optional sequence-classification head and a KV cache for decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm import sharding
# ModelConfig and its field lists live with the layers (below this module); re-exported here
# because callers think of them as the model's.
from lm.layers import (LEGACY_DEFAULTS, LLAMA3_KEYS, RUNTIME_FIELDS, Block, LayerCache,  # noqa: F401
                       LayerNorm, ModelConfig, checkpoint_fields, make_blocks, normal, param,
                       parse_rope_scaling, run_blocks, zeros)


class Transformer(nnx.Module):
  """Token ids [B, T] -> next-token logits [B, T, vocab] (fp32).

  rules: the logical-to-mesh axis rules (config.mesh.rules) its activations and attention
  kernels are placed by under a mesh; part of the graph, not of the parameters.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules=sharding.DEFAULT_RULES):
    self.cfg = cfg
    self.rules = rules = tuple(tuple(r) for r in rules)
    self.embed = param(rngs, normal(0.02), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    if cfg.positions == "learned":
      self.pos_embed = param(rngs, normal(0.01), (cfg.max_seq_len, cfg.d_model), (None, "embed"))
    else:
      self.pos_embed = None
    self.blocks = make_blocks(cfg, rngs, rules)  # stacked [layers, ...] when cfg.scan_layers
    self.ln_f = LayerNorm(cfg, rngs) if cfg.norm == "pre" else None
    if not cfg.tie_embeddings:
      self.head = param(rngs, normal(0.02), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
    else:
      self.head = None
    if cfg.num_classes:
      self.cls_head = param(rngs, normal(0.02), (cfg.d_model, cfg.num_classes), ("embed", None))
      self.cls_bias = param(rngs, zeros, (cfg.num_classes,), (None,))
    self.dropout = nnx.Dropout(cfg.dropout)

  def hidden(self, tokens, *, positions=None, segment_ids=None, cache=None, cache_index=0,
             rngs: nnx.Rngs | None = None):
    """Final hidden states [B, T, d_model] (and the updated cache when decoding).

    positions default to 0..T-1; segment_ids [B, T] (0 = padding) restrict attention to a
    token's own segment. Pass `rngs` (with a "dropout" stream) to train with dropout.
    """
    cfg = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t) + cache_index, (b, t))
    x = jnp.take(self.embed[...], tokens, axis=0)
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions, axis=0)
    x = self.dropout(x.astype(cfg.compute_dtype), rngs=rngs, deterministic=rngs is None)
    x, cache = run_blocks(self.blocks, cfg, x, positions, segment_ids, cache, cache_index, rngs,
                          self.rules)
    if self.ln_f is not None:
      x = self.ln_f(x)
    return x, cache

  def logits(self, x):
    w = self.embed[...].T if self.head is None else self.head[...]
    lead = x.shape[:-1]
    y = x.reshape(-1, x.shape[-1]) @ w.astype(x.dtype)
    return y.reshape(*lead, -1).astype(jnp.float32)

  def __call__(self, tokens, *, positions=None, segment_ids=None, rngs=None):
    x, _ = self.hidden(tokens, positions=positions, segment_ids=segment_ids, rngs=rngs)
    return self.logits(x)

  def classify(self, tokens, lengths, *, rngs=None):
    """Class logits [B, num_classes], pooled from each row's last non-pad token.

    tokens are right-padded; lengths [B] counts the real tokens of each row.
    """
    if not self.cfg.num_classes:
      raise ValueError("this model has no classification head (model num_classes is 0)")
    segment_ids = (jnp.arange(tokens.shape[1]) < lengths[:, None]).astype(jnp.int32)
    x, _ = self.hidden(tokens, segment_ids=segment_ids, rngs=rngs)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return (last.astype(jnp.float32) @ self.cls_head[...] + self.cls_bias[...])

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> list[LayerCache]:
    cfg = self.cfg
    shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    return [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(cfg.num_layers)]

  def decode(self, tokens, cache, cache_index, *, positions, segment_ids):
    """Runs a chunk of tokens against the cache (prefill when T > 1, one step when T == 1).

    segment_ids [B, max_len] marks valid cache slots (1) and padding (0) for the whole cache.
    Returns fp32 logits [B, T, vocab] and the updated cache.
    """
    x, cache = self.hidden(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                           cache_index=cache_index)
    return self.logits(x), cache


def num_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (6N plus attention), as in the PaLM/nanoGPT MFU estimate."""
  n = (cfg.num_layers * (2 * cfg.d_model * cfg.head_dim * (cfg.num_heads + cfg.kv_heads)
                         + cfg.d_model * cfg.ff_dim * (3 if cfg.mlp == "swiglu" else 2))
       + cfg.vocab_size * cfg.d_model)
  attn = 12 * cfg.num_layers * cfg.d_model * seq_len / 2  # causal: half the scores
  return 6 * n + attn


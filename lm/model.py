"""The model families, built from the shared layers of lm/layers.py; `build` picks one by
config.model.arch.

Transformer: the decoder-only language model (GPT-2, Llama, Mistral, Qwen2 conventions by
config), with an optional sequence-classification head and a KV cache for decoding.
Encoder: the bidirectional encoder (BERT conventions by config), with a masked-LM head, a
pooler and a sequence-classification head on the pooled [CLS].
EncoderDecoder: T5 (v1.0 and v1.1 conventions by config): an encoder stack and a decoder stack
with cross-attention, each with its relative position bias, sharing the word embeddings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lm import sharding
from lm.errors import UsageError
# ModelConfig and its field lists live with the layers (below this module); re-exported here
# because callers think of them as the model's.
from lm.attention import slot_times
from lm.layers import (LEGACY_DEFAULTS, LLAMA3_KEYS, RUNTIME_FIELDS, Block, LayerCache,  # noqa: F401
                       LayerNorm, ModelConfig, RelativePositionBias, checkpoint_fields, dense,
                       gelu, layer_modules, make_blocks, normal, param, parse_rope_scaling,
                       run_blocks, zeros)


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
    """An empty KV cache for decoding up to max_len tokens (prompt included): one LayerCache
    per layer of min(max_len, attention_window) slots (max_len without a window)."""
    cfg = self.cfg
    slots = min(max_len, cfg.attention_window) if cfg.attention_window else max_len
    shape = (batch_size, cfg.kv_heads, slots, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    return [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(cfg.num_layers)]

  def decode(self, tokens, cache, cache_index, *, positions, segment_ids):
    """Runs a chunk of tokens against the cache (prefill when T > 1, one step when T == 1).

    cache_index: the time (index in the decoded sequence) of tokens[:, 0]; positions [B, T].
    segment_ids [B, L] marks real tokens (1) and padding (0) by time; times from L on are
    real, so it may cover the prompt only. Returns fp32 logits [B, T, vocab] and the cache.
    """
    x, cache = self.hidden(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                           cache_index=cache_index)
    return self.logits(x), cache


class Encoder(nnx.Module):
  """A bidirectional Transformer encoder (BERT): token ids [B, T] -> MLM logits [B, T, vocab]
  (fp32) with model.mlm_head, else the final hidden states [B, T, d_model].

  Embeddings: token + learned position (or rotary, in the attention, with positions="rope")
  + token type (type_vocab_size > 0), then a LayerNorm (BERT's embedding LayerNorm) and
  dropout; blocks of non-causal attention (post-LN with norm="post", as BERT). The masked-LM
  head is dense -> GELU -> LayerNorm -> the word embeddings (tied; an own matrix `head` when
  tie_embeddings is False) + a bias; the pooler is tanh(dense(h[:, 0])), h[:, 0] being [CLS];
  the classifier is a dense layer on the pooled vector.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules=sharding.DEFAULT_RULES):
    self.cfg = cfg
    self.rules = rules = tuple(tuple(r) for r in rules)
    d, std = cfg.d_model, normal(0.02)  # BERT initialises every matrix with std 0.02
    self.embed = param(rngs, std, (cfg.vocab_size, d), ("vocab", "embed"))
    self.pos_embed = (param(rngs, std, (cfg.max_seq_len, d), (None, "embed"))
                      if cfg.positions == "learned" else None)
    self.type_embed = (param(rngs, std, (cfg.type_vocab_size, d), (None, "embed"))
                       if cfg.type_vocab_size else None)
    self.emb_ln = LayerNorm(cfg, rngs)
    self.blocks = make_blocks(cfg, rngs, rules, block=functools.partial(Block, causal=False))
    self.ln_f = LayerNorm(cfg, rngs) if cfg.norm == "pre" else None
    untied = cfg.mlm_head and not cfg.tie_embeddings
    self.head = param(rngs, std, (d, cfg.vocab_size), ("embed", "vocab")) if untied else None
    if cfg.mlm_head:
      self.mlm_w = param(rngs, std, (d, d), ("embed", None))
      self.mlm_b = param(rngs, zeros, (d,), (None,))
      self.mlm_ln = LayerNorm(cfg, rngs)
      self.mlm_bias = param(rngs, zeros, (cfg.vocab_size,), ("vocab",))
    if cfg.pooler or cfg.num_classes:
      self.pool_w = param(rngs, std, (d, d), ("embed", None))
      self.pool_b = param(rngs, zeros, (d,), (None,))
    if cfg.num_classes:
      self.cls_head = param(rngs, std, (d, cfg.num_classes), ("embed", None))
      self.cls_bias = param(rngs, zeros, (cfg.num_classes,), (None,))
    self.dropout = nnx.Dropout(cfg.dropout)

  def hidden(self, input_ids, attention_mask=None, token_type_ids=None, *, positions=None,
             rngs: nnx.Rngs | None = None):
    """Final hidden states [B, T, d_model] (compute dtype).

    attention_mask [B, T]: 1 for real tokens, 0 for padding (None: all real); no query sees a
    padding key, so pad tokens change no real position's output (a pad row itself attends
    to the real tokens, as in Hugging Face BERT). token_type_ids [B, T] in
    [0, type_vocab_size) (None: all 0); positions default to 0..T-1.
    """
    cfg = self.cfg
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = jnp.take(self.embed[...], input_ids, axis=0)
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions, axis=0)
    if self.type_embed is not None:
      types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
      x = x + jnp.take(self.type_embed[...], types, axis=0)
    x = self.dropout(self.emb_ln(x).astype(cfg.compute_dtype), rngs=rngs,
                     deterministic=rngs is None)
    segment_ids = None
    if attention_mask is not None:  # (query ids, key ids): keys of id 0 are hidden from all
      keys = (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
      segment_ids = (jnp.ones_like(keys), keys)
    x, _ = run_blocks(self.blocks, cfg, x, positions, segment_ids, rngs=rngs, rules=self.rules)
    return x if self.ln_f is None else self.ln_f(x)

  def mlm_logits(self, x):
    """Masked-LM logits [..., vocab] (fp32) of hidden states x [..., d_model]."""
    h = gelu(dense(x, self.mlm_w, self.mlm_b), self.cfg.mlp)
    h = self.mlm_ln(h)
    w = self.embed[...].T if self.head is None else self.head[...]
    return (dense(h, w) + self.mlm_bias[...].astype(h.dtype)).astype(jnp.float32)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, positions=None,
               rngs=None):
    x = self.hidden(input_ids, attention_mask, token_type_ids, positions=positions, rngs=rngs)
    return self.mlm_logits(x) if self.cfg.mlm_head else x

  def pooled(self, input_ids, attention_mask=None, token_type_ids=None, *, rngs=None):
    """tanh(dense(h[:, 0])) [B, d_model] (fp32): the [CLS] summary the classifier reads."""
    if not (self.cfg.pooler or self.cfg.num_classes):
      raise UsageError("this encoder has no pooler (model.pooler is False and num_classes 0)")
    x = self.hidden(input_ids, attention_mask, token_type_ids, rngs=rngs)[:, 0]
    return jnp.tanh(dense(x.astype(jnp.float32), self.pool_w, self.pool_b))

  def classify(self, input_ids, attention_mask=None, token_type_ids=None, *, rngs=None):
    """Class logits [B, num_classes] (fp32) from the pooled [CLS]; UsageError without a
    classification head (model.num_classes 0)."""
    if not self.cfg.num_classes:
      raise UsageError("this model has no classification head (model.num_classes is 0)")
    pooled = self.pooled(input_ids, attention_mask, token_type_ids, rngs=rngs)
    pooled = self.dropout(pooled, rngs=rngs, deterministic=rngs is None)
    return dense(pooled, self.cls_head, self.cls_bias)


class Stack(nnx.Module):
  """One side of an encoder-decoder (T5's T5Stack): its relative position bias (computed once,
  shared by every layer), pre-LN blocks (causal with cross-attention for the decoder), and a
  final norm; dropout on its input and output."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules, decoder: bool):
    self.cfg, self.rules = cfg, rules
    self.rel_bias = RelativePositionBias(cfg, rngs, bidirectional=not decoder)
    block = functools.partial(Block, causal=decoder, cross=decoder)
    self.blocks = make_blocks(cfg, rngs, rules, block=block,
                              num_layers=cfg.decoder_layers if decoder else cfg.num_layers)
    self.ln_f = LayerNorm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x, segment_ids, rngs=None, cache=None, cache_index=0, **cross):
    """x [B, T, d_model] (embedded) -> (final hidden states, cache). With a cache (decoder
    only), x holds the tokens at times cache_index.. and the bias covers the cache's slots."""
    drop = lambda y: self.dropout(y, rngs=rngs, deterministic=rngs is None)
    times = jnp.arange(x.shape[1]) + cache_index
    keys = times
    if cache is not None:
      keys = jnp.concatenate([slot_times(cache_index, cache[0][0].k.shape[2]), times])
    bias = self.rel_bias(times, keys)
    x, cache = run_blocks(self.blocks, self.cfg, drop(x), None, segment_ids, cache, cache_index,
                          rngs, self.rules, bias=bias, **cross)
    return drop(self.ln_f(x)), cache


class EncoderDecoder(nnx.Module):
  """T5 (Raffel et al. 2020; Hugging Face T5ForConditionalGeneration):
  model(input_ids [B, S], decoder_input_ids [B, T], attention_mask [B, S] or None) -> logits
  [B, T, vocab] (fp32).

  Pre-LN blocks with RMSNorm, no biases, unscaled scores, relative position bias (no position
  embeddings), ReLU (v1.0) or gated-GELU (v1.1) MLPs; the decoder's layers cross-attend to the
  encoder's output with its padding hidden. The head is the word embeddings with the output
  rescaled by d_model^-0.5 (tie_embeddings, v1.0) or an own matrix (v1.1). decoder_input_ids
  are the targets shifted right behind cfg.decoder_start_id (teacher forcing).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules=sharding.DEFAULT_RULES):
    self.cfg = cfg
    self.rules = rules = tuple(tuple(r) for r in rules)
    self.embed = param(rngs, normal(1.0), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    self.encoder = Stack(cfg, rngs, rules, decoder=False)
    self.decoder = Stack(cfg, rngs, rules, decoder=True)
    self.head = (None if cfg.tie_embeddings else
                 param(rngs, normal(cfg.d_model ** -0.5), (cfg.d_model, cfg.vocab_size),
                       ("embed", "vocab")))

  def _embed(self, ids):
    return jnp.take(self.embed[...], ids, axis=0).astype(self.cfg.compute_dtype)

  def encode(self, input_ids, attention_mask=None, *, rngs=None):
    """The encoder's output [B, S, d_model]; attention_mask [B, S]: 1 real, 0 padding."""
    segment_ids = None
    if attention_mask is not None:  # (query ids, key ids): no query sees a padding key
      keys = (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
      segment_ids = (jnp.ones_like(keys), keys)
    return self.encoder(self._embed(input_ids), segment_ids, rngs)[0]

  def decode(self, decoder_input_ids, context, attention_mask=None, *, cache=None,
             cache_index=0, rngs=None):
    """(logits [B, T, vocab] fp32, cache) of decoder tokens at times cache_index.. given the
    encoder output `context` [B, S, d_model] and its attention_mask [B, S]. cache: None, or
    init_cache's (then the cross-attention reads the keys and values stored there, and
    context may be None if attention_mask is given)."""
    b, t = decoder_input_ids.shape
    mask = (jnp.ones(context.shape[:2], jnp.int32) if attention_mask is None
            else (jnp.asarray(attention_mask) != 0).astype(jnp.int32))
    cross = dict(context=context, context_segments=(jnp.ones((b, t), jnp.int32), mask))
    # Self-attention: causal; decoder rows are never left-padded, so every time is real.
    valid = None if cache is None else jnp.ones((b, 1), jnp.int32)
    x, cache = self.decoder(self._embed(decoder_input_ids), valid, rngs, cache, cache_index,
                            **cross)
    return self.logits(x), cache

  def logits(self, x):
    if self.head is None:  # tied (v1.0): rescaled so the embedding's scale suits both ends
      return dense(x * self.cfg.d_model ** -0.5, self.embed[...].T).astype(jnp.float32)
    return dense(x, self.head).astype(jnp.float32)

  def __call__(self, input_ids, decoder_input_ids, attention_mask=None, *, rngs=None):
    context = self.encode(input_ids, attention_mask, rngs=rngs)
    return self.decode(decoder_input_ids, context, attention_mask, rngs=rngs)[0]

  def init_cache(self, context, max_len: int, dtype=None) -> list:
    """The decoder's cache for max_len tokens (the start token included) after the encoder
    produced `context` [B, S, d_model]: per layer (an empty self-attention LayerCache of
    max_len slots, the cross-attention's keys and values of context, computed once here)."""
    cfg = self.cfg
    dtype = dtype or cfg.compute_dtype
    shape = (context.shape[0], cfg.kv_heads, max_len, cfg.head_dim)
    return [(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
             block.cross_attn.kv(context))
            for block in layer_modules(self.decoder.blocks)]


def build(cfg: ModelConfig, rngs: nnx.Rngs, rules=sharding.DEFAULT_RULES):
  """The model family config.model.arch names: Transformer (decoder), Encoder or
  EncoderDecoder."""
  family = {"decoder": Transformer, "encoder": Encoder, "encoder_decoder": EncoderDecoder}
  return family[cfg.arch](cfg, rngs, rules)


def num_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (6N plus attention), as in the PaLM/nanoGPT MFU estimate."""
  attn_params = 2 * cfg.d_model * cfg.head_dim * (cfg.num_heads + cfg.kv_heads)
  mlp_params = cfg.d_model * cfg.ff_dim * (3 if cfg.mlp in ("swiglu", "gated_gelu") else 2)
  layers = cfg.num_layers
  if cfg.arch == "encoder_decoder":  # as if every token went through both stacks (S = T)
    layers += cfg.decoder_layers
    mlp_params += attn_params * cfg.decoder_layers / layers  # the decoder's cross-attention
  n = layers * (attn_params + mlp_params) + cfg.vocab_size * cfg.d_model
  attn = 12 * layers * cfg.d_model * seq_len / (2 if cfg.arch == "decoder" else 1)
  return 6 * n + attn


"""The shared pieces every model family is built from (Flax NNX), and their config.

Read top to bottom: ModelConfig (the model's shape and numerics), parameters with logical
axis names, dense, LayerNorm/RMSNorm, rotary positions, attention with its KV cache, MLP,
the residual block, and the layer stack (make_blocks/run_blocks: scanned over stacked
parameters or looped, with remat). lm/model.py builds the families from these; nothing here
imports it.

Every parameter carries logical axis names ("vocab", "embed", "heads", "kv_heads", "head_dim",
"mlp"); lm/sharding.py maps them to mesh axes with rules from the config, so the layers know
nothing of devices. Parameters are fp32; activations use `config.dtype` (bf16 on GPU).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lm import attention as attention_lib
from lm import sharding


# Model fields a run may change on resume, init_from or evaluation: how the model computes,
# not what it computes. Every other field (checkpoint_fields) is fixed by a checkpoint, so a
# new field is fixed unless it is added here.
RUNTIME_FIELDS = ("dropout", "attention_impl", "dtype", "attention_window", "scan_layers",
                  "remat")
# What configs and checkpoints written before a field existed meant by its absence (issues 16,
# 17: a checkpoint without scan_layers holds one parameter set per layer).
LEGACY_DEFAULTS = {"norm_type": "layernorm", "qkv_bias": False, "rope_scaling": "",
                   "attention_window": -1,  # -1: auto, the training length (issue 18)
                   "arch": "decoder", "type_vocab_size": 0, "mlm_head": False, "pooler": False,
                   "scan_layers": False, "remat": "none",
                   "d_kv": 0, "num_decoder_layers": 0, "relative_buckets": 0,  # issue 15
                   "relative_max_distance": 0, "decoder_start_id": 0, "relative_bias_init": 0.0}
ARCHS = ("decoder", "encoder", "encoder_decoder")
POSITIONS = ("rope", "learned", "relative")  # relative: T5's bias, for encoder_decoder only
MLPS = ("gelu", "gelu_erf", "swiglu", "relu", "gated_gelu")
# model.remat: what a layer keeps for the backward pass ("none": everything, no recompute;
# "full": only its input, jax's nothing_saveable; "auto": the measured default, AUTO_REMAT;
# the others are jax.checkpoint_policies).
REMAT_POLICIES = ("auto", "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable", "everything_saveable")
# Keep the dense layers' outputs, recompute the rest (attention scores and probabilities,
# norms, activations). On the CPU the faster step at every depth measured (issue 17, base.py,
# 3 sittings, ms: 6 layers 54.8 vs dots_saveable 57.5, full 65.3; 48 layers 466.7 vs 507.9,
# 498.1): XLA pages its temporaries in afresh every step, so the [B, H, T, T] scores
# dots_saveable keeps cost more than recomputing them.
AUTO_REMAT = "dots_with_no_batch_dims_saveable"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's shape and numerics. No defaults: they live in one place, lm/config.py
  (experiments/base.py), and `from_config` builds this from a config's model section."""
  vocab_size: int
  # decoder (causal LM, lm/model.py Transformer) | encoder (BERT, Encoder) | encoder_decoder
  # (T5, EncoderDecoder)
  arch: str
  max_seq_len: int
  num_layers: int
  num_heads: int
  num_kv_heads: int  # 0: same as num_heads (MHA); fewer: grouped-query attention
  d_model: int
  d_ff: int  # 0: 4 * d_model
  dropout: float
  attention_impl: str  # xla | cudnn | triton | triton_softmax | auto
  positions: str  # rope | learned | relative (T5's bucketed bias, encoder_decoder)
  norm: str  # pre (x + f(LN(x))) | post (LN(x + f(x)), the original Transformer)
  norm_type: str  # layernorm (scale and bias) | rmsnorm (scale only; Llama, T5)
  # gelu (tanh approximation, as GPT-2) | gelu_erf (exact, as BERT) | swiglu | relu (T5 v1.0)
  # | gated_gelu (T5 v1.1: gelu(x W_gate) * x W_in)
  mlp: str
  use_bias: bool  # biases in every dense layer (GPT-2)
  qkv_bias: bool  # biases on the q, k, v projections only (Qwen2); implied by use_bias
  tie_embeddings: bool
  ln_eps: float  # of either norm_type
  rope_theta: float
  rope_scaling: str  # "" (none) or "llama3:factor=8,low_freq_factor=1,..." (rope_frequencies)
  dtype: str  # activation/compute dtype
  num_classes: int  # > 0 adds a sequence-classification head
  # 0: full causal attention; W > 0: each query sees the last W keys (sliding window) and the
  # KV cache keeps W slots. A runtime field: config.model.attention_window -1 (auto) means the
  # window the run was trained with, resolved before this is built (from_config's auto_window).
  attention_window: int
  # Encoder only (0/False for a decoder): segment A/B embeddings (BERT: 2), the masked-LM head
  # (dense, GELU, LayerNorm, tied decoder + bias), the pooler (dense + tanh on [CLS]; also
  # present whenever num_classes > 0, as the classifier reads it).
  type_vocab_size: int
  mlm_head: bool
  pooler: bool
  scan_layers: bool  # one Block with stacked [layers, ...] parameters under lax.scan, or a list
  remat: str  # REMAT_POLICIES: what each layer saves for the backward pass
  # Encoder-decoder (T5) fields; 0 for the other families. d_kv: the head width when it is not
  # d_model / num_heads (flan-t5-small: 6 heads of 64 in d_model 512); 0: d_model / num_heads.
  # num_decoder_layers: 0 = num_layers. relative_buckets / relative_max_distance: T5's relative
  # position bias (32 / 128). decoder_start_id: the token the decoder starts from (T5: pad, 0).
  # relative_bias_init: the std of the bias tables at initialisation (0: T5's d_model^-0.5).
  d_kv: int
  num_decoder_layers: int
  relative_buckets: int
  relative_max_distance: int
  decoder_start_id: int
  relative_bias_init: float

  def __post_init__(self):
    kv = self.kv_heads
    if not self.d_kv and self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model}: expected a multiple of model.num_heads="
                       f"{self.num_heads}")
    if self.num_heads % kv:
      raise ValueError(f"model.num_kv_heads={kv}: expected a divisor of model.num_heads="
                       f"{self.num_heads}")
    for name, value, allowed in (("arch", self.arch, ARCHS),
                                 ("positions", self.positions, POSITIONS),
                                 ("norm", self.norm, ("pre", "post")),
                                 ("norm_type", self.norm_type, ("layernorm", "rmsnorm")),
                                 ("mlp", self.mlp, MLPS),
                                 ("attention_impl", self.attention_impl, attention_lib.IMPLS),
                                 ("dtype", self.dtype, ("float32", "bfloat16", "float16")),
                                 ("remat", self.remat, REMAT_POLICIES)):
      if value not in allowed:
        raise ValueError(f"model.{name}={value!r} is not one of {allowed}")
    if self.positions == "rope" and self.head_dim % 2:
      raise ValueError(f"rotary positions need an even head_dim (model.d_model / "
                       f"model.num_heads), got {self.head_dim}")
    if self.attention_window < 0:
      raise ValueError(f"model.attention_window={self.attention_window}: expected 0 (full) or "
                       f"a window > 0 (-1, auto, is resolved before the model is built)")
    attention_lib.check_impl(self.attention_impl, self.head_dim)
    if self.attention_window and self.arch != "decoder":
      raise ValueError(f"model.attention_window={self.attention_window}: sliding windows are for "
                       f"causal attention (model.arch='decoder'); use 0 or -1 for an {self.arch}")
    if self.arch != "encoder":
      for name in ("type_vocab_size", "mlm_head", "pooler"):
        if getattr(self, name):
          raise ValueError(f"model.{name}={getattr(self, name)!r} is for model.arch='encoder' "
                           f"(this model is a {self.arch})")
    t5 = self.arch == "encoder_decoder"
    if t5 != (self.positions == "relative"):
      raise ValueError(f"model.positions={self.positions!r} with model.arch={self.arch!r}: "
                       "relative positions (T5's bias) go with arch='encoder_decoder', and only "
                       "they")
    if t5 and (self.relative_buckets < 2 or self.relative_max_distance < self.relative_buckets):
      raise ValueError(f"model.relative_buckets={self.relative_buckets}, relative_max_distance="
                       f"{self.relative_max_distance}: expected >= 2 buckets and a max distance of "
                       "at least that (T5: 32, 128)")
    if not t5:
      for name in ("d_kv", "num_decoder_layers", "relative_buckets", "relative_max_distance",
                   "decoder_start_id", "relative_bias_init"):
        if getattr(self, name):
          raise ValueError(f"model.{name}={getattr(self, name)!r} is for "
                           f"model.arch='encoder_decoder' (this model is a {self.arch})")
    if min(self.d_kv, self.num_decoder_layers, self.decoder_start_id, self.relative_bias_init) < 0:
      raise ValueError("model.d_kv, num_decoder_layers, decoder_start_id and relative_bias_init "
                       "must be >= 0")
    parse_rope_scaling(self.rope_scaling)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_kv or self.d_model // self.num_heads

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers

  @property
  def t5(self) -> bool:
    """T5's conventions: unscaled scores (its initialisation absorbs 1/sqrt(d)), and that
    initialisation (Mesh TensorFlow's, as Hugging Face's T5PreTrainedModel._init_weights)."""
    return self.arch == "encoder_decoder"

  @property
  def ff_dim(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int, auto_window: int = 0) -> "ModelConfig":
    """Builds from the ml_collections `config.model` section (or a dict); a field written
    before it existed takes its LEGACY_DEFAULTS value; ValueError naming the first field
    missing otherwise. attention_window -1 (auto) becomes `auto_window`: the training
    data.seq_len when training (lm.validate.model_config), 0 (full) by default."""
    model_cfg = {**LEGACY_DEFAULTS, **model_cfg}
    if model_cfg["attention_window"] == -1:  # an encoder's attention is never windowed
      model_cfg["attention_window"] = auto_window if model_cfg["arch"] == "decoder" else 0
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "vocab_size"]
    missing = [f for f in fields if f not in model_cfg]
    if missing:
      raise ValueError(f"the config has no field model.{missing[0]} (start from "
                       "experiments/base.py)")
    return cls(vocab_size=vocab_size, **{k: model_cfg[k] for k in fields})


def checkpoint_fields() -> tuple[str, ...]:
  """The config.model fields a checkpoint fixes (all but vocab_size, which the tokenizer
  fixes, and RUNTIME_FIELDS): resume refuses to change them, init_from, evaluation and
  lm.convert take them from the checkpoint."""
  return tuple(f.name for f in dataclasses.fields(ModelConfig)
               if f.name != "vocab_size" and f.name not in RUNTIME_FIELDS)


def param(rngs: nnx.Rngs, init, shape, axes) -> nnx.Param:
  """An fp32 parameter annotated with logical axis names (sharded later, by jit)."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, jnp.float32),
                   out_sharding=axes, eager_sharding=False)


normal = nnx.initializers.normal
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def dense(x, w, b=None):
  """x[..., in] @ w[in, *out] as one 2-D matmul (faster than a batched one, notably on CPU)."""
  lead, out = x.shape[:-1], w.shape[1:]
  y = x.reshape(-1, x.shape[-1]) @ w[...].reshape(w.shape[0], -1).astype(x.dtype)
  y = y.reshape(*lead, *out)
  return y if b is None else y + b[...].astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm (mean removed, scale and bias) or, with norm_type="rmsnorm", RMSNorm
  (x / sqrt(mean(x^2) + eps) * scale: no mean, no bias; Llama and T5)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.eps = cfg.ln_eps
    self.scale = param(rngs, ones, (cfg.d_model,), ("norm",))
    rms = cfg.norm_type == "rmsnorm"
    self.bias = None if rms else param(rngs, zeros, (cfg.d_model,), ("norm",))

  def __call__(self, x):
    # Statistics in fp32 whatever the compute dtype.
    xf = x.astype(jnp.float32)
    if self.bias is not None:
      xf = xf - xf.mean(-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps) * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x.dtype)


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def parse_rope_scaling(spec: str) -> dict[str, float] | None:
  """None for "" (no scaling); the four numbers of "llama3:factor=8,low_freq_factor=1,..."
  (all of LLAMA3_KEYS, in any order). Raises ValueError for anything else."""
  if not spec:
    return None
  kind, _, args = spec.partition(":")
  try:
    p = {k: float(v) for k, v in (a.split("=") for a in args.split(","))}
  except ValueError:
    p = {}
  if kind != "llama3" or set(p) != set(LLAMA3_KEYS) or \
      p["high_freq_factor"] <= p["low_freq_factor"]:
    raise ValueError(f"model.rope_scaling={spec!r}: expected '' or 'llama3:"
                     + "=..,".join(LLAMA3_KEYS) + "=..' with high_freq_factor > low_freq_factor")
  return p


def rope_frequencies(cfg: ModelConfig):
  """The rotary inverse frequencies [head_dim // 2] (fp32): theta^(-2i/head_dim), rescaled by
  cfg.rope_scaling. "llama3" (Llama 3.1) divides the low frequencies (wavelength above
  original_max_position_embeddings / low_freq_factor) by factor, keeps the high ones (below
  .../high_freq_factor) and interpolates linearly in 1/wavelength between."""
  half = cfg.head_dim // 2
  freq = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  p = parse_rope_scaling(cfg.rope_scaling)
  if p is None:
    return freq
  ratio = p["original_max_position_embeddings"] * freq / (2 * math.pi)  # context / wavelength
  low, high = p["low_freq_factor"], p["high_freq_factor"]
  smooth = jnp.clip((ratio - low) / (high - low), 0, 1)  # 0: low frequency, 1: high
  return (1 - smooth) * freq / p["factor"] + smooth * freq


def rope(x, positions, freq):
  """Rotary embedding on [B, T, H, D] at integer positions [B, T] (rotate-half convention, as
  Hugging Face Llama: dimension i pairs with i + D/2) with frequencies freq [D // 2]."""
  angle = positions[..., None, None].astype(jnp.float32) * freq  # [B, T, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's bucket [same shape] (int32) of key position - query position (relative_position).

  Half the buckets (of num_buckets, or of each sign's half when bidirectional) hold exact
  distances 0, 1, ...; the rest grow logarithmically up to max_distance, beyond which
  everything shares the last bucket. Causal (not bidirectional): keys after the query all
  land in bucket 0. Source: Raffel et al. 2020; Mesh TensorFlow / HF `_relative_position_bucket`.
  """
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (relative_position > 0) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = jnp.maximum(-relative_position, 0)
  exact = num_buckets // 2
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(
      max_distance / exact)
  far = jnp.minimum(exact + (log_ratio * (num_buckets - exact)).astype(distance.dtype),
                    num_buckets - 1)
  return (bucket + jnp.where(distance < exact, distance, far)).astype(jnp.int32)


class RelativePositionBias(nnx.Module):
  """T5's relative position bias: a learned scalar per (bucket, head), added to the attention
  scores. One per stack, computed once and shared by all its layers (T5 keeps it in layer 0).
  Bidirectional buckets for an encoder, causal ones for a decoder (relative_position_bucket).

  Initialised with std cfg.relative_bias_init, or T5's d_model^-0.5 (0.09 at d_model 128)
  when that is 0. From scratch at a small budget T5's std is too small: a copy task needs
  heads that look at fixed offsets (the previous token: a bias of several units), which a
  table of near-equal biases reaches only after thousands of AdamW steps (train.
  relative_bias_lr; measured in BUILD_NOTES.md, "T5 encoder-decoders")."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, bidirectional: bool):
    self.bidirectional = bidirectional
    self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
    std = cfg.relative_bias_init or cfg.d_model ** -0.5
    self.embedding = param(rngs, normal(std), (cfg.relative_buckets,
                                                               cfg.num_heads), (None, "heads"))

  def __call__(self, q_times, k_times):
    """Bias [1, heads, Tq, Tk] (fp32) for queries and keys at integer times [Tq], [Tk]."""
    bucket = relative_position_bucket(k_times[None, :] - q_times[:, None],
                                      bidirectional=self.bidirectional,
                                      num_buckets=self.num_buckets, max_distance=self.max_distance)
    return jnp.take(self.embedding[...], bucket, axis=0).transpose(2, 0, 1)[None]


class LayerCache(NamedTuple):
  """Keys and values of one layer for incremental decoding: [B, kv_heads, slots, head_dim].

  A rolling buffer: the token at time t (its index in the decoded sequence, padding included)
  lives in slot t % slots, so with a sliding window of W <= slots the cache never grows and
  generation runs for any number of tokens; without a window, slots covers every time.
  Head-major, so each decode step's attention reads the cache as stored; a [B, len, kv, d]
  cache made XLA transpose all of it every step (cached attention 3-4x slower at batch 16, CPU).
  """
  k: jax.Array
  v: jax.Array

  def write(self, k, v, cache_index) -> "LayerCache":
    """The cache with a chunk k, v [B, T, kv_heads, head_dim] at times cache_index.. written
    in (only its last `slots` tokens when T is longer: the others are outside any window)."""
    def put(c, new):
      slots, t = c.shape[2], new.shape[1]
      new = new.astype(c.dtype).transpose(0, 2, 1, 3)
      if t == 1:  # a decode step: an in-place update slice
        return jax.lax.dynamic_update_slice_in_dim(c, new, cache_index % slots, 2)
      keep = min(t, slots)
      where = (cache_index + t - keep + jnp.arange(keep)) % slots
      return c.at[:, :, where].set(new[:, :, t - keep:])
    return LayerCache(put(self.k, k), put(self.v, v))


class Attention(nnx.Module):
  """Multi-head attention softmax(QK^T/sqrt(d_k) + bias)V with grouped-query K/V: causal
  self-attention (a decoder's), bidirectional (causal=False: an encoder's, no KV cache), or
  cross-attention (causal=False, keys and values from `kv`: an encoder-decoder's decoder).
  T5 (cfg.t5) leaves the scores unscaled and initialises as Mesh TensorFlow."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules=sharding.DEFAULT_RULES,
               causal: bool = True):
    self.cfg = cfg
    self.rules = rules
    self.causal = causal
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    if cfg.t5:  # the query's std absorbs the 1/sqrt(d_k) the scores go without
      std_q, std_kv, out_std = (d * hd) ** -0.5, d ** -0.5, (h * hd) ** -0.5
    else:  # GPT-2's: 0.02, residual outputs scaled down by depth
      std_q = std_kv = 0.02
      out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    self.wq = param(rngs, normal(std_q), (d, h, hd), ("embed", "heads", "head_dim"))
    self.wk = param(rngs, normal(std_kv), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
    self.wv = param(rngs, normal(std_kv), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
    self.wo = param(rngs, normal(out_std), (h * hd, d), ("heads_merged", "embed"))
    if cfg.use_bias or cfg.qkv_bias:
      self.bq = param(rngs, zeros, (h, hd), ("heads", "head_dim"))
      self.bk = param(rngs, zeros, (kv, hd), ("kv_heads", "head_dim"))
      self.bv = param(rngs, zeros, (kv, hd), ("kv_heads", "head_dim"))
    else:
      self.bq = self.bk = self.bv = None
    self.bo = param(rngs, zeros, (d,), ("embed",)) if cfg.use_bias else None

  def kv(self, y):
    """Keys and values [B, S, kv_heads, head_dim] of y [B, S, d_model] (cross-attention's,
    computed once per encoder output)."""
    return dense(y, self.wk, self.bk), dense(y, self.wv, self.bv)

  def __call__(self, x, positions, segment_ids, cache: LayerCache | None, cache_index,
               bias=None, kv=None):
    """x [B, T, d_model] -> ([B, T, d_model], cache). bias: None or [1|B, H, T, keys] added
    to the scores (with a cache: keys = its slots then the chunk's T). kv: cross-attention's
    keys and values (Attention.kv of the encoder output), else computed from x."""
    cfg = self.cfg
    q = dense(x, self.wq, self.bq)
    k, v = self.kv(x) if kv is None else kv
    if cfg.positions == "rope":
      freq = rope_frequencies(cfg)
      q, k = rope(q, positions, freq), rope(k, positions, freq)
    window = cfg.attention_window
    scale = 1.0 if cfg.t5 else None
    if cache is None:
      # A window as long as the sequence masks nothing: leave it out (the kernels' fast path).
      out = attention_lib.attention(q, k, v, impl=cfg.attention_impl, causal=self.causal,
                                    segment_ids=segment_ids, bias=bias, scale=scale,
                                    window=window if window < x.shape[1] else 0, rules=self.rules)
    else:
      # Decoding: attend over the cache as it was plus the chunk itself, then write the chunk.
      out = attention_lib.cached_attention(q, k, v, cache.k, cache.v, cache_index, segment_ids,
                                           window, bias=bias, scale=scale)
      cache = cache.write(k, v, cache_index)
    out = out.reshape(*out.shape[:-2], -1)
    return dense(out, self.wo, self.bo), cache


class MLP(nnx.Module):
  """The feed-forward sublayer: act(x W_in) W_out, or gated act(x W_gate) * (x W_in) W_out
  (swiglu: SiLU, Llama; gated_gelu: tanh GELU, T5 v1.1)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.kind = cfg.mlp
    d, f = cfg.d_model, cfg.ff_dim
    std_in, out_std = ((d ** -0.5, f ** -0.5) if cfg.t5
                       else (0.02, 0.02 / math.sqrt(2 * cfg.num_layers)))
    gated = cfg.mlp in ("swiglu", "gated_gelu")
    self.w_in = param(rngs, normal(std_in), (d, f), ("embed", "mlp"))
    self.w_gate = param(rngs, normal(std_in), (d, f), ("embed", "mlp")) if gated else None
    self.w_out = param(rngs, normal(out_std), (f, d), ("mlp", "embed"))
    use_b = cfg.use_bias
    self.b_in = param(rngs, zeros, (f,), ("mlp",)) if use_b else None
    self.b_out = param(rngs, zeros, (d,), ("embed",)) if use_b else None

  def __call__(self, x):
    h = dense(x, self.w_in, self.b_in)
    if self.kind == "swiglu":
      h = jax.nn.silu(dense(x, self.w_gate)) * h
    elif self.kind == "gated_gelu":
      h = gelu(dense(x, self.w_gate), self.kind) * h
    elif self.kind == "relu":
      h = jax.nn.relu(h)
    else:
      h = gelu(h, self.kind)
    return dense(h, self.w_out, self.b_out)


def gelu(x, mlp: str):
  """GELU as config.model.mlp names it: exact (erf) for "gelu_erf" (BERT), else the tanh
  approximation (GPT-2)."""
  if mlp == "gelu_erf":
    # x/2 (1 + erf(x/sqrt 2)), not jax.nn.gelu's erfc form: XLA's CPU erf is a polynomial,
    # erfc adds an exp and a division; the forward and backward of the exact GELU took 11% of
    # a nanoGPT-sized CPU step (issue 17). Both are within 1 ulp-scale of each other in fp32.
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
  return jax.nn.gelu(x, approximate=True)


class Block(nnx.Module):
  """Attention and MLP sublayers with residuals; pre-LN: x + f(LN(x)), post-LN: LN(x + f(x)).

  cross=True adds cross-attention on an encoder's output between the two (a T5 decoder layer);
  its cache is then a pair (self-attention LayerCache, cross (k, v) of Attention.kv).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules=sharding.DEFAULT_RULES,
               causal: bool = True, cross: bool = False):
    self.pre = cfg.norm == "pre"
    self.ln1, self.ln2 = LayerNorm(cfg, rngs), LayerNorm(cfg, rngs)
    self.attn = Attention(cfg, rngs, rules, causal)
    if cross:
      self.ln_cross = LayerNorm(cfg, rngs)
      self.cross_attn = Attention(cfg, rngs, rules, causal=False)
    else:
      self.ln_cross = self.cross_attn = None
    self.mlp = MLP(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x, positions, segment_ids, cache, cache_index, rngs, bias=None,
               context=None, context_segments=None):
    """context [B, S, d_model]: the encoder output cross-attention reads (when there is no
    cache to hold its keys and values); context_segments: the (query, key) segment ids pair
    that hides the encoder's padding from it."""
    drop = lambda y: self.dropout(y, rngs=rngs, deterministic=rngs is None)
    norm_in = lambda ln, h: ln(h) if self.pre else h  # pre-LN normalises a sublayer's input,
    norm_out = lambda ln, h: h if self.pre else ln(h)  # post-LN the residual sum
    cross_kv = None
    if self.cross_attn is not None:
      cache, cross_kv = (None, None) if cache is None else cache
      if cross_kv is None:
        cross_kv = self.cross_attn.kv(context)
    a, new_cache = self.attn(norm_in(self.ln1, x), positions, segment_ids, cache, cache_index,
                             bias)
    x = norm_out(self.ln1, x + drop(a))
    if self.cross_attn is not None:
      c, _ = self.cross_attn(norm_in(self.ln_cross, x), positions, context_segments, None, 0,
                             kv=cross_kv)
      x = norm_out(self.ln_cross, x + drop(c))
      if cache is not None:
        new_cache = (new_cache, cross_kv)
    x = norm_out(self.ln2, x + drop(self.mlp(norm_in(self.ln2, x))))
    return x, new_cache


# --- the layer stack -------------------------------------------------------------------------
# A model's num_layers Blocks in one of two layouts (cfg.scan_layers):
#   scanned: one Block whose parameters carry a leading "layers" axis [num_layers, ...], run
#     by lax.scan: the step traces and compiles one layer, whatever the depth (issue 17: at 48
#     layers the unrolled loop took 144 s to compile); the optimizer updates a few big arrays.
#   looped: an nnx.List of Blocks run by a Python loop, the readable reference (tests hold the
#     two equal). Its parameter paths (blocks/<i>/...) are those of checkpoints from before
#     issue 17; stack_layers / unstack_layers convert pure dicts between the layouts.
# Encoders and decoders alike build theirs with make_blocks and run them with run_blocks.

def make_blocks(cfg: ModelConfig, rngs: nnx.Rngs, rules=sharding.DEFAULT_RULES, block=Block,
                num_layers: int | None = None):
  """num_layers (default cfg.num_layers) `block(cfg, rngs, rules)` modules: one with stacked
  parameters (the logical axis "layers" first; no rule maps it, so it is never split over
  devices) when cfg.scan_layers, else an nnx.List. Each layer draws its own initial values."""
  n = num_layers or cfg.num_layers
  if not cfg.scan_layers:
    return nnx.List([block(cfg, rngs, rules) for _ in range(n)])

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs):
    return block(cfg, rngs, rules)
  return create(rngs)


def layer_modules(blocks) -> list:
  """make_blocks' layers as a list of Blocks (for stacked parameters, one view per layer)."""
  if isinstance(blocks, nnx.List):
    return list(blocks)
  graphdef, state = nnx.split(blocks)
  n = jax.tree.leaves(state)[0].shape[0]
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


def remat_name(name: str) -> str:
  """The jax.checkpoint policy name (or "none" / "full") a model.remat name means ("auto"
  resolved)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat={name!r} is not one of {REMAT_POLICIES}")
  return AUTO_REMAT if name == "auto" else name


def remat_policy(name: str):
  """jax.checkpoint's policy for a model.remat name; None for "none" (no rematerialisation)."""
  name = remat_name(name)
  if name == "none":
    return None
  return getattr(jax.checkpoint_policies, "nothing_saveable" if name == "full" else name)


def run_blocks(blocks, cfg: ModelConfig, x, positions, segment_ids=None, cache=None,
               cache_index=0, rngs: nnx.Rngs | None = None, rules=sharding.DEFAULT_RULES,
               **shared):
  """x [B, T, d_model] through the blocks of make_blocks, in order -> (x, new cache).

  shared: keyword arguments every block gets alike (an encoder-decoder's relative position
  `bias`, the decoder's `context` and `context_segments`: Block.__call__).

  cache: None, or a list of per-layer caches (LayerCache) that each block updates at
  cache_index; the new list comes back (None without one). With a cache the layers run as a
  loop (also over stacked parameters, one slice per layer), so the cache keeps its per-layer
  layout whichever way the parameters are stored; without one, stacked parameters are scanned.
  rngs (a "dropout" stream) gives layer i the stream of key fold_in(rngs.dropout(), i) in both
  layouts. Each layer is rematerialised by cfg.remat.
  """
  stacked = not isinstance(blocks, nnx.List)
  n = len(blocks) if not stacked else jax.tree.leaves(nnx.state(blocks))[0].shape[0]
  key = None if rngs is None else rngs.dropout()

  def layer(graphdef, state, x, layer_cache, i, shared):
    # Residual stream split over batch only (no-op without a mesh): weights are gathered.
    x = sharding.constrain(x, ("batch", None, None), rules)
    layer_rngs = None if key is None else nnx.Rngs(dropout=jax.random.fold_in(key, i))
    return nnx.merge(graphdef, state)(x, positions, segment_ids, layer_cache, cache_index,
                                      layer_rngs, **shared)

  policy = remat_policy(cfg.remat)
  if policy is not None:
    layer = jax.checkpoint(layer, policy=policy, static_argnums=(0,), prevent_cse=not stacked)
  if stacked:
    graphdef, state = nnx.split(blocks)
    if cache is None:
      def body(x, xs):
        return layer(graphdef, xs[0], x, None, xs[1], shared)[0], None
      x, _ = jax.lax.scan(body, x, (state, jnp.arange(n)))
      return x, None
    states = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(n)]
  else:
    graphdef, states = None, [nnx.split(b) for b in blocks]
  new_cache = []
  for i in range(n):
    g, s = (graphdef, states[i]) if stacked else states[i]
    x, c = layer(g, s, x, None if cache is None else cache[i], i, shared)
    new_cache.append(c)
  return x, (None if cache is None else new_cache)


def _is_layer_dict(node) -> bool:
  """A per-layer {0: ..., 1: ...} dict (keys ints, or digit strings as Orbax reads them)."""
  return isinstance(node, dict) and bool(node) and all(str(k).isdigit() for k in node)


def _map_blocks(tree, fn):
  """`tree` (a nested dict: a pure-dict model or train state) with fn applied to the value of
  every "blocks" key."""
  if not isinstance(tree, dict):
    return tree
  return {k: fn(v) if k == "blocks" else _map_blocks(v, fn) for k, v in tree.items()}


def stack_layers(tree, stack=None):
  """Per-layer "blocks" ({i: {...}}) of a pure dict -> stacked ({... [num_layers, ...]});
  already stacked blocks are kept. stack(list of leaves) -> leaf (default jnp.stack)."""
  stack = stack or jnp.stack

  def fn(blocks):
    if not _is_layer_dict(blocks):
      return blocks
    layers = [blocks[k] for k in sorted(blocks, key=int)]
    return jax.tree.map(lambda *xs: stack(list(xs)), *layers)
  return _map_blocks(tree, fn)


def unstack_layers(tree, take=None):
  """Inverse of stack_layers: stacked "blocks" -> {i: {...}}, one entry per index of the
  leading axis; per-layer blocks are kept. take(leaf, i) -> layer i's leaf (default leaf[i])."""
  take = take or (lambda x, i: x[i])

  def fn(blocks):
    if _is_layer_dict(blocks):
      return blocks
    n = jax.tree.leaves(blocks)[0].shape[0]
    return {i: jax.tree.map(lambda x, i=i: take(x, i), blocks) for i in range(n)}
  return _map_blocks(tree, fn)


def layout_of(tree) -> str | None:
  """"stacked" or "per_layer": how the first "blocks" of a pure dict holds its layers (None
  without blocks)."""
  found = []
  _map_blocks(tree, lambda b: found.append("per_layer" if _is_layer_dict(b) else "stacked"))
  return found[0] if found else None

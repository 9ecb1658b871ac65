"""The defaults of every config field, in one place: experiments/base.py is exactly this.

Experiment files (experiments/*.py) start from `base_config()` and change a few fields; the
library uses it where it needs a whole config without one (lm.convert writes a converted
checkpoint's config from it). It lives in the package, not in experiments/, so an installed
`lm` never imports experiments/ (which is not installed).
"""

from __future__ import annotations

import ml_collections

from lm.sharding import DEFAULT_RULES


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Every field of a run config with its default (arg "smoke": a 30-step plumbing run)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model, config.data, config.train = _model(), _data(), _train()
  config.mesh, config.sample = _mesh(), _sample()
  if arg == "smoke":
    config.train.num_steps = 30
    config.train.warmup_steps = 10  # warmup may not exceed the steps
    config.train.log_every = 10
    config.train.eval_every = 30
    config.train.eval_batches = 2
    config.train.checkpoint_every = 30
    config.sample.max_new_tokens = 40
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (known: smoke)")
  return config


def _model() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  # decoder (causal LM) | encoder (BERT: experiments/bert_mlm.py) | encoder_decoder (T5)
  model.arch = "decoder"
  model.num_layers = 4
  model.num_heads = 4
  model.num_kv_heads = 0  # 0: multi-head; fewer than num_heads: grouped-query attention
  model.d_model = 128
  model.d_ff = 320  # 0: 4 * d_model; SwiGLU uses ~2/3 of that for the same parameters
  model.dropout = 0.0
  model.attention_impl = "auto"  # xla | cudnn | triton | triton_softmax | auto
  model.positions = "rope"  # rope | learned | relative (T5's bias; encoder_decoder only)
  model.norm = "pre"  # pre | post
  model.norm_type = "layernorm"  # layernorm | rmsnorm
  # gelu (tanh approximation) | gelu_erf (exact, BERT) | swiglu | relu (T5) | gated_gelu (T5 v1.1)
  model.mlp = "swiglu"
  model.use_bias = False  # biases in every dense layer (GPT-2)
  model.qkv_bias = False  # biases on the q, k, v projections only (Qwen2)
  model.tie_embeddings = True
  model.max_seq_len = 256
  model.ln_eps = 1e-5
  model.rope_theta = 10000.0
  model.rope_scaling = ""  # "" | "llama3:factor=8,low_freq_factor=1,high_freq_factor=4,..."
  model.dtype = "float32"  # compute dtype: bfloat16 on GPU
  model.num_classes = 0  # > 0 adds a sequence-classification head
  # Sliding-window attention: 0 full, W > 0 the last W keys, -1 (auto) the window the run was
  # trained with: data.seq_len in training (full attention over its windows), and in eval and
  # sampling the checkpoint's (its window, or its training data.seq_len). A runtime field.
  model.attention_window = -1
  model.type_vocab_size = 0  # encoder: token-type (segment A/B) embeddings, BERT 2
  model.mlm_head = False  # encoder: the masked-LM head (dense, GELU, LayerNorm, tied decoder)
  model.pooler = False  # encoder: dense + tanh on [CLS] (implied by num_classes > 0)
  model.scan_layers = True  # layers as one lax.scan over stacked parameters (compile time flat
  # in depth); False: a Python loop over per-layer parameters. Checkpoints load either way.
  # What each layer keeps for the backward pass: auto | none | full | dots_saveable (matmul
  # outputs; the rest is recomputed) | dots_with_no_batch_dims_saveable | nothing_saveable |
  # everything_saveable; auto: dots_with_no_batch_dims_saveable, the fastest on the CPU at every
  # depth measured (issue 17: XLA's temporaries are paged in afresh every step, so a smaller
  # working set beats the recompute; lm.layers.AUTO_REMAT).
  model.remat = "auto"
  # Encoder-decoder (T5, model.arch="encoder_decoder", lm.config.t5_model) only; 0 otherwise.
  model.d_kv = 0  # head width when not d_model / num_heads
  model.num_decoder_layers = 0  # 0: num_layers
  model.relative_buckets = 0  # T5's relative position bias: 32 buckets
  model.relative_max_distance = 0  # ... reaching 128 tokens
  model.decoder_start_id = 0  # the token the decoder starts from (T5: pad, 0)
  model.relative_bias_init = 0.0  # std of the relative bias tables at init (0: T5's d_model^-0.5)
  return model

def _data() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.path = ""  # "": the embedded plays; else text files / glob, *.jsonl, *.bin / *.npy
  data.tokenizer = "char"  # char | byte | bpe | wordpiece | path to a tokenizer.json
  data.vocab_size = 1024  # bpe and wordpiece: the vocabulary to train
  data.seq_len = 64
  data.val_fraction = 0.1
  data.text_field = "text"  # jsonl only
  data.token_dtype = "uint16"  # *.bin only
  return data

def _train() -> ml_collections.ConfigDict:
  train = ml_collections.ConfigDict()
  train.task = "lm"  # an objective of lm/tasks/: lm (next token) | classify (genre) | mlm
  train.num_steps = 1100
  train.batch_size = 12  # global, over all devices and micro-batches
  train.grad_accum = 1
  train.learning_rate = 3e-3
  train.min_lr_ratio = 0.1
  train.warmup_steps = 50
  train.weight_decay = 0.1
  train.beta1 = 0.9
  train.beta2 = 0.99
  train.adam_eps = 1e-8  # AdamW's epsilon (optax `eps`), added to sqrt(v)
  train.grad_clip = 1.0
  train.log_every = 100
  train.eval_every = 500
  train.eval_batches = 20
  train.eval_batch_size = 64
  train.checkpoint_every = 1000
  train.keep_checkpoints = 3
  train.init_from = ""  # a workdir or converted checkpoint to fine-tune from
  # Learning-rate multiplier of the relative position bias tables (T5): scalars in units of
  # attention logits, which AdamW moves by ~lr a step (experiments/t5_restore.py uses 30).
  train.relative_bias_lr = 1.0
  return train

def _mesh() -> ml_collections.ConfigDict:
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all remaining devices
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.rules = DEFAULT_RULES
  return mesh

def _sample() -> ml_collections.ConfigDict:
  sample = ml_collections.ConfigDict()
  sample.num_samples = 2
  sample.max_new_tokens = 200
  sample.temperature = 0.8
  sample.top_k = 40
  sample.top_p = 1.0
  sample.prompt = ""
  sample.seed = 0
  sample.num_beams = 1  # > 1: beam search (deterministic; temperature, top_k, top_p unused)
  sample.length_penalty = 1.0  # beam score: sum log p / length ** length_penalty
  sample.early_stopping = False  # True: a prompt ends at num_beams finished beams
  return sample

def bert_model(model: ml_collections.ConfigDict, num_layers=4, num_heads=4, d_model=128,
               d_ff=512, max_seq_len=128) -> ml_collections.ConfigDict:
  """`model` (a config's model section) set to BERT's conventions at the given size: an
  encoder with learned positions, token types A/B, post-LN with eps 1e-12, exact-erf GELU,
  biases, the MLM head tied to the word embeddings (experiments/bert_*.py, lm.convert)."""
  model.arch, model.type_vocab_size, model.mlm_head = "encoder", 2, True
  model.positions, model.norm, model.mlp, model.use_bias = "learned", "post", "gelu_erf", True
  model.ln_eps, model.tie_embeddings = 1e-12, True
  model.num_layers, model.num_heads, model.d_model, model.d_ff = num_layers, num_heads, d_model, d_ff
  model.max_seq_len = max_seq_len
  return model


def t5_model(model: ml_collections.ConfigDict, num_layers=4, num_heads=4, d_model=128,
             d_ff=512, version="1.1") -> ml_collections.ConfigDict:
  """`model` set to T5's conventions at the given size: an encoder-decoder with relative
  position bias (32 buckets to 128 tokens), pre-LN RMSNorm (eps 1e-6), no biases; version
  "1.0": ReLU MLP, head tied to the embeddings; "1.1" (and flan-t5): gated-GELU, untied head."""
  model.arch, model.positions, model.norm, model.norm_type = ("encoder_decoder", "relative",
                                                              "pre", "rmsnorm")
  model.relative_buckets, model.relative_max_distance = 32, 128
  model.use_bias, model.qkv_bias, model.ln_eps = False, False, 1e-6
  model.mlp, model.tie_embeddings = ("relu", True) if version == "1.0" else ("gated_gelu", False)
  model.num_layers, model.num_heads, model.d_model, model.d_ff = num_layers, num_heads, d_model, d_ff
  model.attention_window = 0
  return model


def model_config(vocab_size: int, **fields):
  """ModelConfig of the default model section with `fields` replaced (tests, lm.convert)."""
  from lm.model import ModelConfig
  return ModelConfig.from_config({**base_config().model, **fields}, vocab_size)

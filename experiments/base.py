"""Character-level Transformer on the embedded Shakespeare plays: the laptop-sized baseline.

Command:
  python experiments/run.py --config=experiments/base.py --workdir=runs/base
Expected on a 2-core CPU (measured 2026-11-23, BUILD_NOTES.md): 1 min 50 s wall time, start
to end (about 80 ms and 9,500 tokens/s per step of 12 x 64 characters); validation loss 1.765
nats/char at step 1100 (20 eval batches), 1.749 over the whole validation split
(`--mode=eval`), then two samples that look like a play script. With the nanoGPT warmup start
(issue 11, rerun 2026-11-29): 1.760 and 1.747.
Override any field on the command line, e.g. `--config.train.num_steps=200`;
`--config=experiments/base.py:smoke` is a 30-step run for checking the plumbing.
Fork it: import this file, call get_config(), change a few fields (see gpt2_small.py).
"""

import ml_collections

from lm.sharding import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = model = ml_collections.ConfigDict()
  model.num_layers = 4
  model.num_heads = 4
  model.num_kv_heads = 0  # 0: multi-head; fewer than num_heads: grouped-query attention
  model.d_model = 128
  model.d_ff = 320  # 0: 4 * d_model; SwiGLU uses ~2/3 of that for the same parameters
  model.dropout = 0.0
  model.attention_impl = "auto"  # xla | cudnn | triton | triton_softmax | auto
  model.positions = "rope"  # rope | learned
  model.norm = "pre"  # pre | post
  model.norm_type = "layernorm"  # layernorm | rmsnorm
  model.mlp = "swiglu"  # gelu | swiglu
  model.use_bias = False  # biases in every dense layer (GPT-2)
  model.qkv_bias = False  # biases on the q, k, v projections only (Qwen2)
  model.tie_embeddings = True
  model.max_seq_len = 256
  model.ln_eps = 1e-5
  model.rope_theta = 10000.0
  model.rope_scaling = ""  # "" | "llama3:factor=8,low_freq_factor=1,high_freq_factor=4,..."
  model.dtype = "float32"  # compute dtype: bfloat16 on GPU
  model.num_classes = 0  # > 0 adds a sequence-classification head

  config.data = data = ml_collections.ConfigDict()
  data.path = ""  # "": the embedded plays; else text files / glob, *.jsonl, *.bin / *.npy
  data.tokenizer = "char"  # char | byte | bpe | path to a tokenizer.json
  data.vocab_size = 1024  # bpe only: the vocabulary to train
  data.seq_len = 64
  data.val_fraction = 0.1
  data.text_field = "text"  # jsonl only
  data.token_dtype = "uint16"  # *.bin only

  config.train = train = ml_collections.ConfigDict()
  train.task = "lm"  # lm (next-token, lm/train.py) | classify (lm/classify.py)
  train.num_steps = 1100
  train.batch_size = 12  # global, over all devices and micro-batches
  train.grad_accum = 1
  train.learning_rate = 3e-3
  train.min_lr_ratio = 0.1
  train.warmup_steps = 50
  train.weight_decay = 0.1
  train.beta1 = 0.9
  train.beta2 = 0.99
  train.grad_clip = 1.0
  train.log_every = 100
  train.eval_every = 500
  train.eval_batches = 20
  train.eval_batch_size = 64
  train.checkpoint_every = 1000
  train.keep_checkpoints = 3
  train.init_from = ""  # a workdir or converted checkpoint to fine-tune from

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all remaining devices
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.rules = DEFAULT_RULES

  config.sample = sample = ml_collections.ConfigDict()
  sample.num_samples = 2
  sample.max_new_tokens = 200
  sample.temperature = 0.8
  sample.top_k = 40
  sample.top_p = 1.0
  sample.prompt = ""
  sample.seed = 0

  if arg == "smoke":
    train.num_steps = 30
    train.warmup_steps = 10  # warmup may not exceed the steps
    train.log_every = 10
    train.eval_every = 30
    train.eval_batches = 2
    train.checkpoint_every = 30
    sample.max_new_tokens = 40
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (known: smoke)")
  return config

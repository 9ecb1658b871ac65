"""GPT-2 small (124M): the exact GPT-2 architecture, for a GPU.

Command (one GPU, bf16, GPT-2's tokenizer and a pre-tokenized corpus):
  python experiments/run.py --config=experiments/gpt2_small.py --workdir=runs/gpt2 \
      --config.data.path=/data/owt/train.bin --config.data.tokenizer=/models/gpt2/tokenizer.json
With no data flags it trains a byte-level BPE (vocabulary up to 50257) on the embedded plays,
which is a shape check rather than a meaningful GPT-2 run. 8 GPUs: add --config.mesh.fsdp=8
(or leave mesh.data=-1 for data parallel). Expected runtime and loss: not measured yet (no GPU
was lent when this was written); BUILD_NOTES.md will carry the numbers when one is.
"""

from lm.config import base_config


def get_config(arg: str | None = None):
  config = base_config(arg)
  m = config.model
  m.num_layers, m.num_heads, m.d_model, m.d_ff = 12, 12, 768, 3072
  m.positions, m.mlp, m.use_bias, m.tie_embeddings = "learned", "gelu", True, True
  m.max_seq_len, m.ln_eps, m.dropout = 1024, 1e-5, 0.0
  m.dtype = "bfloat16"
  config.data.seq_len = 1024
  config.data.tokenizer = "bpe"
  config.data.vocab_size = 50257
  t = config.train
  t.batch_size, t.grad_accum = 64, 1  # 64 x 1024 tokens a step; raise grad_accum for 0.5M
  t.num_steps, t.warmup_steps = 5000, 200
  t.learning_rate, t.min_lr_ratio, t.weight_decay, t.beta2 = 6e-4, 0.1, 0.1, 0.95
  t.eval_every, t.eval_batches, t.eval_batch_size = 500, 50, 64
  t.checkpoint_every, t.log_every = 1000, 10
  config.sample.max_new_tokens = 256
  return config

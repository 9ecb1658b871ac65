"""A Llama-shaped fork of base.py: RMSNorm, SwiGLU, rotary positions, grouped-query attention
(4 query heads over 2 K/V heads) and an untied output head, on the embedded plays.

Command:
  python experiments/run.py --config=experiments/llama_small.py --workdir=runs/llama_small
Everything else (data, 1100 steps of 12 x 64 characters, optimizer, schedule) is base.py's, so
the two compare at equal steps and about equal wall time on the 2-core CPU.
Measured 2026-11-29 on the 2-core CPU while other jobs shared it (load average 4.5-7, so
times are loose; BUILD_NOTES.md "Llama family"): 776,064 parameters, no slower per step than
base.py (bench_train 87-127 ms against 137-153 ms, same sitting), 3 min 52 s wall under load
7. Validation loss 1.841 nats/char at step 1100 (20 eval batches), 1.821 over the whole split
(`--mode=eval`). base.py in the same sitting gave 1.758 and 1.743. A tied head
(`--config.model.tie_embeddings=True`) gets 1.795 at step 1100.
The same file with `:smoke` is a 30-step plumbing check. `lm.convert.to_hf` exports a run of
it as a Hugging Face `llama` checkpoint (`python -m lm.convert --export ...`).
"""

from lm.config import base_config


def get_config(arg: str | None = None):
  config = base_config(arg)
  m = config.model
  m.norm_type, m.mlp, m.positions, m.norm = "rmsnorm", "swiglu", "rope", "pre"
  m.num_heads, m.num_kv_heads = 4, 2
  m.tie_embeddings, m.use_bias = False, False
  return config

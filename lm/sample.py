"""Text generation with a KV cache: one prefill of the prompts, then a compiled decode loop.

Prompts of different lengths are left-padded into one batch; padding slots are masked out
of attention and positions count from each prompt's first real token, so every row decodes
as if it were alone. The loop is a `lax.while_loop` inside one jit (no Python per token).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import tokenizers
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


class Mode(NamedTuple):
  """The static part of the filters. top_k: 0 (off) or the width of the `lax.top_k` that the
  compiled loop takes, the next power of two >= k (at most the vocabulary), so k=40 and k=50
  share one compile. top_p: whether the nucleus filter runs. Everything else is traced: a new
  temperature (0 included), k within the width, p, stop token or seed reuses the loop."""
  top_k: int
  top_p: bool

  @classmethod
  def of(cls, top_k, top_p, vocab_size: int) -> "Mode":
    width = min(vocab_size, 1 << max(int(top_k) - 1, 0).bit_length()) if top_k > 0 else 0
    return cls(width, top_p < 1)


def sample_logits(logits, key, temperature, top_k, top_p, mode: Mode | None = None):
  """Next tokens [B] from fp32 logits [B, V]: greedy at temperature 0, else sampling from
  softmax(logits / temperature) restricted to the top_k tokens (0: all), then to the smallest
  set of most likely tokens whose probability reaches top_p (nucleus; 1: all)."""
  mode = mode or Mode.of(top_k, top_p, logits.shape[-1])
  greedy = jnp.argmax(logits, -1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  if mode.top_k or mode.top_p:
    # The candidates in descending order: the top `width` only (a partial sort), or all.
    ranked = jax.lax.top_k(scaled, mode.top_k)[0] if mode.top_k else -jnp.sort(-scaled, -1)
    width = ranked.shape[-1]
    if mode.top_k:
      k = jnp.clip(jnp.asarray(top_k), 1, width)
      kth = jnp.take_along_axis(ranked, jnp.broadcast_to(k - 1, ranked.shape[:-1])[..., None], -1)
      scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
      ranked = jnp.where(jnp.arange(width) < k, ranked, -jnp.inf)
    if mode.top_p:
      probs = jax.nn.softmax(ranked, -1)
      # Keep a token while the mass before it is under top_p (the top token always stays).
      n_keep = ((jnp.cumsum(probs, -1) - probs) < top_p).sum(-1, keepdims=True)
      cutoff = jnp.take_along_axis(ranked, jnp.maximum(n_keep, 1) - 1, -1)
      scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
  sampled = jax.random.categorical(key, scaled, -1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, state, tokens, valid, max_new_tokens, mode, temperature, top_k, top_p,
              stop_token, key):
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  total = p + max_new_tokens
  valid = jnp.concatenate([valid, jnp.ones((b, max_new_tokens), valid.dtype)], 1)
  positions = positions_of(valid)
  cache = model.init_cache(b, total)
  logits, cache = model.decode(tokens, cache, 0, positions=positions[:, :p], segment_ids=valid)
  out = jnp.zeros((b, max_new_tokens), jnp.int32)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, last_logits, cache, out, done = carry
    tok = sample_logits(last_logits, jax.random.fold_in(key, i), temperature, top_k, top_p,
                        mode)
    tok = jnp.where(done, stop_token, tok)  # stop_token -1: no stop token, never done
    done = done | (tok == stop_token)
    out = out.at[:, i].set(tok)
    pos = jax.lax.dynamic_slice_in_dim(positions, p + i, 1, 1)
    logits, cache = model.decode(tok[:, None], cache, p + i, positions=pos, segment_ids=valid)
    return i + 1, logits[:, -1], cache, out, done

  carry = (0, logits[:, -1], cache, out, jnp.zeros((b,), bool))
  n, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
  return out, n


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Token-id prompts -> (tokens, valid) int32 [B, longest], right-aligned (left padding).

  valid is 1 on real tokens and 0 on padding; positions then count from each row's first
  real token (`positions_of`), so a padded row decodes exactly as it would alone.
  """
  p = max(len(x) for x in prompts)
  tokens = np.zeros((len(prompts), p), np.int32)
  valid = np.zeros((len(prompts), p), np.int32)
  for r, x in enumerate(prompts):
    if len(x):
      tokens[r, p - len(x):] = np.asarray(x, np.int32)
      valid[r, p - len(x):] = 1
  return tokens, valid


def positions_of(valid):
  """Position of each slot counted over real tokens only (padding slots get 0)."""
  return jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)


def check_prompts(prompts, *, max_new_tokens: int, context: int, vocab_size: int,
                  stop_token: int | None = None) -> None:
  if not len(prompts) or any(len(p) == 0 for p in prompts):
    raise UsageError("every prompt needs at least one token")
  longest = max(len(x) for x in prompts)
  if longest + max_new_tokens > context:
    raise UsageError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"the model's context of {context} tokens")
  for x in prompts:
    x = np.asarray(x)
    if x.min() < 0 or x.max() >= vocab_size:
      raise UsageError(f"prompt token ids must lie in [0, {vocab_size}), got {x.min()}..{x.max()}")
  if stop_token is not None and not 0 <= stop_token < vocab_size:
    raise UsageError(f"stop_token must lie in [0, {vocab_size}), got {stop_token}")


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 100,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_return_sequences: int = 1, stop_token: int | None = None,
             seed: int = 0) -> list[list[np.ndarray]]:
  """Continuations of token-id prompts: result[i][j] is the j-th sequence for prompt i.

  A sequence ends before `stop_token` when it emits it; otherwise it has max_new_tokens ids.
  Bad settings raise UsageError before anything is compiled.
  """
  check_settings(temperature=temperature, top_k=top_k, top_p=top_p,
                 max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences)
  check_prompts(prompts, max_new_tokens=max_new_tokens, context=model.cfg.max_seq_len,
                vocab_size=model.cfg.vocab_size, stop_token=stop_token)
  rows = [x for x in prompts for _ in range(num_return_sequences)]
  tokens, valid = left_pad(rows)
  graphdef, state = nnx.split(model)
  mode = Mode.of(top_k, top_p, model.cfg.vocab_size)
  out, n = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid), max_new_tokens,
                     mode, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                     jnp.int32(-1 if stop_token is None else stop_token), jax.random.key(seed))
  out = np.asarray(out)[:, :int(n)]
  results = []
  for r in range(len(rows)):
    seq = out[r]
    if stop_token is not None and (seq == stop_token).any():
      seq = seq[:int(np.argmax(seq == stop_token))]
    results.append(seq)
  k = num_return_sequences
  return [results[i * k:(i + 1) * k] for i in range(len(prompts))]


def stop_token_of(sample_cfg) -> int | None:
  """config.sample.stop_token: a token id, or -1 (or absent) for none."""
  stop = sample_cfg.get("stop_token", -1)
  return None if stop is None or int(stop) < 0 else int(stop)


def sample_text(model, tokenizer, sample_cfg, prompt: str | None = None) -> list[str]:
  """Prompt (default "\\n") + continuation strings for the `config.sample` settings."""
  prompt = sample_cfg.prompt if prompt is None else prompt
  # A command-line prompt carries undecodable bytes as lone surrogates: U+FFFD before it is
  # encoded and printed (lm/tokenizers.py).
  prompt = tokenizers.clean_text(prompt or "\n", "prompt")
  seqs = generate(model, [tokenizer.encode(prompt)], max_new_tokens=sample_cfg.max_new_tokens,
                  temperature=sample_cfg.temperature, top_k=sample_cfg.top_k,
                  top_p=sample_cfg.top_p, num_return_sequences=sample_cfg.num_samples,
                  stop_token=stop_token_of(sample_cfg), seed=sample_cfg.seed)[0]
  return [prompt + tokenizer.decode(s) for s in seqs]


def sample_workdir(config, workdir: str, **overrides) -> list[str]:
  """Prints (and returns) samples of the latest checkpoint in `workdir`; overrides replace
  fields of config.sample. UsageError for a bad config or workdir."""
  import copy
  from lm import runtime, validate
  config = copy.deepcopy(config)
  with config.unlocked():
    config.sample.update(overrides)
  validate.check_config(config, "sample")
  run, state, tokenizer, _ = runtime.load(config, workdir)
  if run.model_cfg.arch != "decoder":
    raise UsageError(f"{workdir} holds an {run.model_cfg.arch} (model.arch): only a decoder "
                     f"generates text")
  model = nnx.merge(run.graphdef, state)[0]
  texts = sample_text(model, tokenizer, run.config.sample)
  for text in texts:
    print(f"--- sample ---\n{text}", flush=True)
  return texts

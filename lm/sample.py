"""Text generation with a KV cache: one prefill of the prompts, then a compiled decode loop.

Prompts of different lengths are left-padded into one batch; padding slots are masked out
of attention and positions count from each prompt's first real token, so every row decodes
as if it were alone. The loop is a `lax.while_loop` inside one jit (no Python per token).
Sampling (greedy, temperature, top-k, top-p) or beam search (`beam_search`, over any step
function that takes a cache, so other model families reuse it).

With a sliding window (model.attention_window = W > 0) the KV cache is a rolling buffer of W
slots (lm/layers.py LayerCache): its size does not depend on the generated length, and
a rotary model generates any number of tokens, never attending further back than it was
trained to. Learned absolute positions end at model.max_seq_len: longer is a UsageError.
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
                   num_return_sequences: int, num_beams: int = 1,
                   length_penalty: float = 1.0) -> None:
  if num_beams < 1:
    raise UsageError(f"num_beams must be >= 1 (1: no beam search), got {num_beams}")
  if num_beams > 1 and num_return_sequences > num_beams:
    raise UsageError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams "
                     f"({num_beams}): beam search returns its best beams")
  if not np.isfinite(length_penalty) or abs(length_penalty) > 1e3:
    raise UsageError(f"length_penalty must be a finite number in [-1000, 1000], got "
                     f"{length_penalty}")
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


def start_decoding(model, tokens, valid, max_new_tokens: int, repeat: int = 1):
  """Runs the left-padded prompts tokens, valid [B, P] into a fresh cache: (logits of the
  first new token [B, V], cache, step). step(tokens [B * repeat], cache, i) -> (logits
  [B * repeat, V], cache) feeds the i-th generated token (i from 0) with every row of the
  cache repeated `repeat` times (beam search's copies). Public so that a task can wrap step
  (seq2seq.restore_texts constrains its logits) and hand it to beam_search.

  A decoder reads the prompt into its KV cache (tokens at times 0..P-1, positions counted
  over real tokens). An encoder-decoder encodes the prompt once (padding masked; relative
  positions make left padding harmless), caches each decoder layer's cross-attention keys
  and values (EncoderDecoder.init_cache), and decodes from decoder_start_id at time 0.
  """
  rep = lambda x: jnp.repeat(x, repeat, axis=0)
  if model.cfg.arch == "encoder_decoder":
    context = model.encode(tokens, valid)
    cache = model.init_cache(context, 1 + max_new_tokens)
    start = jnp.full((tokens.shape[0], 1), model.cfg.decoder_start_id, jnp.int32)
    logits, cache = model.decode(start, context, valid, cache=cache, cache_index=0)
    mask = rep(valid)

    def step(tok, cache, i):
      logits, cache = model.decode(tok[:, None], None, mask, cache=cache, cache_index=i + 1)
      return logits[:, -1], cache
    return logits[:, -1], cache, step

  p = tokens.shape[1]
  positions = positions_of(valid)
  cache = model.init_cache(tokens.shape[0], p + max_new_tokens)
  logits, cache = model.decode(tokens, cache, 0, positions=positions, segment_ids=valid)
  next_pos, valid = rep(positions[:, -1] + 1), rep(valid)

  def step(tok, cache, i):
    # Valid covers the prompt only: the generated tokens (times p + i) are all real.
    logits, cache = model.decode(tok[:, None], cache, p + i, positions=(next_pos + i)[:, None],
                                 segment_ids=valid)
    return logits[:, -1], cache
  return logits[:, -1], cache, step


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, state, tokens, valid, max_new_tokens, mode, temperature, top_k, top_p,
              stop_token, key):
  model = nnx.merge(graphdef, state)
  b = tokens.shape[0]
  logits, cache, step = start_decoding(model, tokens, valid, max_new_tokens)
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
    logits, cache = step(tok, cache, i)
    return i + 1, logits, cache, out, done

  carry = (0, logits, cache, out, jnp.zeros((b,), bool))
  n, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
  return out, n


class Beams(NamedTuple):
  """Beam search hypotheses, best first: tokens int32 [B, K, max_new_tokens] (valid up to
  lengths), scores fp32 [B, K] (sum of log-probabilities / length ** length_penalty; -inf: no
  hypothesis), lengths int32 [B, K] (generated tokens, a final stop token included)."""
  tokens: jax.Array
  scores: jax.Array
  lengths: jax.Array


def _keep_best(fin: Beams, new: Beams, frozen) -> Beams:
  """The K best of the finished hypotheses `fin` [B, K] and the candidates `new` [B, 2K]
  (-inf: not finished), best first; rows where `frozen` [B] keep `fin`."""
  scores, pick = jax.lax.top_k(jnp.concatenate([fin.scores, new.scores], -1),
                               fin.scores.shape[1])
  take = lambda a, b: jnp.take_along_axis(jnp.concatenate([a, b], 1),
                                          pick.reshape(*pick.shape, *[1] * (a.ndim - 2)), 1)
  best = Beams(take(fin.tokens, new.tokens), scores, take(fin.lengths, new.lengths))
  return jax.tree.map(lambda old, m: jnp.where(frozen.reshape(-1, *[1] * (m.ndim - 1)), old, m),
                      fin, best)


def beam_search(step, logits, cache, *, num_beams: int, max_new_tokens: int, length_penalty,
                early_stopping, stop_token) -> Beams:
  """Beam search over a step function, inside a trace (one `lax.while_loop`).

  logits [B, V] fp32: the next-token logits after each prompt; cache: the model's state after
  the prompts, any pytree of batch-first arrays [B, ...] (repeated here for the beams and
  reordered as beams are chosen). step(tokens [B * num_beams], cache, i) -> (logits
  [B * num_beams, V], cache) feeds every beam its i-th generated token (i from 0).
  Hugging Face's rules: each step extends the beams to their 2K best continuations; one that
  ends in stop_token (traced int; -1: none) and ranks among the K best becomes a finished
  hypothesis scored sum(log p) / length ** length_penalty (length: generated tokens, the stop
  token included); the K best others continue; at max_new_tokens the running beams finish.
  A prompt is done once it has K finished hypotheses and, without early_stopping (a traced
  bool), no running beam can still beat the worst of them (an exact bound: log-probabilities
  only decrease; Hugging Face's early_stopping="never", where its False is a heuristic).
  Returns the K best hypotheses per prompt (Beams).
  """
  b, v = logits.shape
  k, n = num_beams, max_new_tokens
  rows = jnp.arange(b)[:, None]
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
  # The K copies of a prompt are equal: only the first is live at the first step.
  run_sum = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (b, k))
  run_tok = jnp.zeros((b, k, n), jnp.int32)
  fin = Beams(jnp.zeros((b, k, n), jnp.int32), jnp.full((b, k), -jnp.inf),
              jnp.zeros((b, k), jnp.int32))
  penalty = lambda length: jnp.asarray(length, jnp.float32) ** length_penalty

  def cond(carry):
    i, *_, done = carry
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, run_sum, run_tok, fin, done = carry
    logp = jax.nn.log_softmax(logits, -1).reshape(b, k, v)
    top, idx = jax.lax.top_k((run_sum[:, :, None] + logp).reshape(b, k * v), 2 * k)
    beam, tok = idx // v, (idx % v).astype(jnp.int32)
    seqs = jnp.take_along_axis(run_tok, beam[:, :, None], 1).at[:, :, i].set(tok)  # [B, 2K, n]
    stops = tok == stop_token
    # The K best continuations without a stop token run on (sorted by (is stop, rank)).
    order = jnp.argsort(jnp.where(stops, 2 * k, 0) + jnp.arange(2 * k), -1)[:, :k]
    goes_on = jnp.zeros_like(stops).at[rows, order].set(True)
    finishing = (stops & (jnp.arange(2 * k) < k)) | (goes_on & (i + 1 == n))
    new = jnp.where(finishing & jnp.isfinite(top), top / penalty(i + 1), -jnp.inf)
    fin = _keep_best(fin, Beams(seqs, new, jnp.full_like(new, i + 1, jnp.int32)), done)
    run_sum = jnp.take_along_axis(top, order, -1)
    run_tok = jnp.take_along_axis(seqs, order[:, :, None], 1)
    src = (rows * k + jnp.take_along_axis(beam, order, -1)).reshape(-1)
    cache = jax.tree.map(lambda x: x[src], cache)
    full = jnp.isfinite(fin.scores).all(-1)
    # The best score a running beam could still reach: its sum over the longest length when
    # the penalty rewards length, else over the next one.
    best_len = jnp.where(length_penalty > 0, n, i + 2)
    can_improve = run_sum.max(-1) / penalty(best_len) > fin.scores[:, -1]
    done = done | (full & (early_stopping | ~can_improve))
    logits, cache = step(jnp.take_along_axis(tok, order, -1).reshape(-1), cache, i)
    return i + 1, logits, cache, run_sum, run_tok, fin, done

  carry = (0, jnp.repeat(logits, k, axis=0), cache, run_sum, run_tok, fin, jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, carry)[5]


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _beam_generate(graphdef, state, tokens, valid, max_new_tokens, num_beams, early_stopping,
                   length_penalty, stop_token):
  model = nnx.merge(graphdef, state)
  logits, cache, step = start_decoding(model, tokens, valid, max_new_tokens, repeat=num_beams)
  return beam_search(step, logits, cache, num_beams=num_beams, max_new_tokens=max_new_tokens,
                     length_penalty=length_penalty, early_stopping=early_stopping,
                     stop_token=stop_token)


def left_pad(prompts: Sequence[Sequence[int]], length: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token-id prompts -> (tokens, valid) int32 [B, max(longest, length)], right-aligned (left
  padding).

  valid is 1 on real tokens and 0 on padding; positions then count from each row's first
  real token (`positions_of`), so a padded row decodes exactly as it would alone.
  """
  p = max(length, max(len(x) for x in prompts))
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


def check_prompts(prompts, *, max_new_tokens: int, context: int | None, vocab_size: int,
                  stop_token: int | None = None) -> None:
  """UsageError for empty prompts, token ids outside the vocabulary, or a prompt plus
  max_new_tokens longer than `context` (None: no limit)."""
  if not len(prompts) or any(len(p) == 0 for p in prompts):
    raise UsageError("every prompt needs at least one token")
  longest = max(len(x) for x in prompts)
  if context is not None and longest + max_new_tokens > context:
    raise UsageError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"the model's context of {context} tokens")
  for x in prompts:
    x = np.asarray(x)
    if x.min() < 0 or x.max() >= vocab_size:
      raise UsageError(f"prompt token ids must lie in [0, {vocab_size}), got {x.min()}..{x.max()}")
  if stop_token is not None and not 0 <= stop_token < vocab_size:
    raise UsageError(f"stop_token must lie in [0, {vocab_size}), got {stop_token}")


def context_of(cfg) -> int | None:
  """The longest sequence (prompt + generated) `cfg`'s model may decode: None (any length)
  for rotary positions under a sliding window and for an encoder-decoder (relative positions;
  prompt and output are separate sequences), else max_seq_len (learned positions end there;
  full attention was trained up to it at most)."""
  if cfg.arch == "encoder_decoder" or (cfg.positions == "rope" and cfg.attention_window):
    return None
  return cfg.max_seq_len


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 100,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_return_sequences: int = 1, stop_token: int | None = None,
             seed: int = 0, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool = False, pad_to: int = 0) -> list[list[np.ndarray]]:
  """Continuations of token-id prompts: result[i][j] is the j-th sequence for prompt i.

  A decoder continues each prompt; an encoder-decoder reads it as the encoder's input and
  returns the decoder's new tokens (without the start token). Batched prompts of different
  lengths are left-padded (masked); one compiled `lax.while_loop` decodes with the KV cache.
  A sequence ends before `stop_token` when it emits it; otherwise it has max_new_tokens ids.
  num_beams > 1: beam search (beam_generate: deterministic, temperature, top_k, top_p and
  seed do not apply), the num_return_sequences best beams, best first. pad_to: prompts are
  padded to at least this length, so that batches of varying prompts share one compile.
  Bad settings raise UsageError before anything is compiled.
  """
  check_settings(temperature=temperature, top_k=top_k, top_p=top_p,
                 max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                 num_beams=num_beams, length_penalty=length_penalty)
  if num_beams > 1:
    beams = beam_generate(model, prompts, max_new_tokens=max_new_tokens, num_beams=num_beams,
                          length_penalty=length_penalty, early_stopping=early_stopping,
                          num_return_sequences=num_return_sequences, stop_token=stop_token,
                          pad_to=pad_to)
    return [[seq for seq, _ in hyps] for hyps in beams]
  check_prompts(prompts, max_new_tokens=max_new_tokens, context=context_of(model.cfg),
                vocab_size=model.cfg.vocab_size, stop_token=stop_token)
  rows = [x for x in prompts for _ in range(num_return_sequences)]
  tokens, valid = left_pad(rows, pad_to)
  graphdef, state = nnx.split(model)
  mode = Mode.of(top_k, top_p, model.cfg.vocab_size)
  out, n = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid), max_new_tokens,
                     mode, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                     jnp.int32(-1 if stop_token is None else stop_token), jax.random.key(seed))
  out = np.asarray(out)[:, :int(n)]
  results = [cut_at_stop(seq, stop_token) for seq in out]
  k = num_return_sequences
  return [results[i * k:(i + 1) * k] for i in range(len(prompts))]


def cut_at_stop(seq, stop_token):
  """seq up to (without) its first stop_token."""
  if stop_token is not None and (seq == stop_token).any():
    seq = seq[:int(np.argmax(seq == stop_token))]
  return seq


def beam_generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  num_beams: int, length_penalty: float = 1.0, early_stopping: bool = False,
                  num_return_sequences: int = 1,
                  stop_token: int | None = None,
                  pad_to: int = 0) -> list[list[tuple[np.ndarray, float]]]:
  """Beam search (`beam_search`) from token-id prompts, batched (left padding), one compile.

  result[i]: the num_return_sequences best (tokens without the stop token, score) of prompt
  i, best first; score = sum of the tokens' log-probabilities (the stop token's included) /
  length ** length_penalty (Hugging Face's convention; length counts the stop token). Fewer
  when fewer distinct sequences exist. UsageError for bad settings, before compiling.
  """
  check_settings(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                 num_return_sequences=num_return_sequences, num_beams=num_beams,
                 length_penalty=length_penalty)
  check_prompts(prompts, max_new_tokens=max_new_tokens, context=context_of(model.cfg),
                vocab_size=model.cfg.vocab_size, stop_token=stop_token)
  tokens, valid = left_pad(prompts, pad_to)
  graphdef, state = nnx.split(model)
  beams = _beam_generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid),
                         max_new_tokens, num_beams, jnp.bool_(early_stopping),
                         jnp.float32(length_penalty),
                         jnp.int32(-1 if stop_token is None else stop_token))
  tokens, scores, lengths = map(np.asarray, beams)
  return [[(cut_at_stop(tokens[i, j, :lengths[i, j]], stop_token), float(scores[i, j]))
           for j in range(num_return_sequences) if np.isfinite(scores[i, j])]
          for i in range(len(prompts))]


def stop_token_of(sample_cfg) -> int | None:
  """config.sample.stop_token: a token id, or -1 (or absent) for none."""
  stop = sample_cfg.get("stop_token", -1)
  return None if stop is None or int(stop) < 0 else int(stop)


EOS = "</s>"  # T5's end-of-sequence token: a char tokenizer's special, or a converted T5's


def eos_of(tokenizer) -> int | None:
  """The id of `tokenizer`'s EOS (a special of a char tokenizer, or a token of a Hugging Face
  tokenizer.json), None if it has none."""
  return tokenizers.token_id(tokenizer, EOS)


def sample_text(model, tokenizer, sample_cfg, prompt: str | None = None) -> list[str]:
  """Texts generated for the `config.sample` settings (prompt default "\\n"): a decoder's
  are prompt + continuation; an encoder-decoder's are the decoded target alone, generated
  from the encoded prompt ending in the tokenizer's EOS (T5 appends </s> to its inputs; added
  here unless the tokenizer did) and ending at that EOS (unless sample.stop_token names
  another token)."""
  prompt = sample_cfg.prompt if prompt is None else prompt
  # A command-line prompt carries undecodable bytes as lone surrogates: U+FFFD before it is
  # encoded and printed (lm/tokenizers.py).
  prompt = tokenizers.clean_text(prompt or "\n", "prompt")
  ids = tokenizer.encode(prompt)
  if not len(ids):  # e.g. a word-piece tokenizer drops the default "\n" as whitespace
    raise UsageError(f"the prompt {prompt!r} encodes to no tokens with the {tokenizer.kind} "
                     "tokenizer: give one with text (--prompt=... or config.sample.prompt)")
  stop, lead = stop_token_of(sample_cfg), prompt
  if model.cfg.arch == "encoder_decoder":
    eos, lead = eos_of(tokenizer), ""
    if eos is not None:
      if ids[-1] != eos:  # a converted T5's tokenizer appends it itself (its post-processor)
        ids = np.append(ids, eos)
      stop = eos if stop is None else stop
  seqs = generate(model, [ids], max_new_tokens=sample_cfg.max_new_tokens,
                  temperature=sample_cfg.temperature, top_k=sample_cfg.top_k,
                  top_p=sample_cfg.top_p, num_return_sequences=sample_cfg.num_samples,
                  stop_token=stop, seed=sample_cfg.seed,
                  num_beams=sample_cfg.get("num_beams", 1),
                  length_penalty=sample_cfg.get("length_penalty", 1.0),
                  early_stopping=sample_cfg.get("early_stopping", False))[0]
  return [lead + tokenizer.decode(s) for s in seqs]


def sample_workdir(config, workdir: str, **overrides) -> list[str]:
  """Prints (and returns) samples of the latest checkpoint in `workdir` (a decoder's
  continuations of the prompt, an encoder-decoder's outputs for it: sample_text); overrides
  replace fields of config.sample. UsageError for a bad config or workdir, or an encoder
  (it generates no text)."""
  import copy
  from lm import runtime, validate
  config = copy.deepcopy(config)
  with config.unlocked():
    config.sample.update(overrides)
  validate.check_config(config, "sample")
  run, state, tokenizer, _ = runtime.load(config, workdir)
  if run.model_cfg.arch == "encoder":
    raise UsageError(f"{workdir} holds an encoder (model.arch): it generates no text; a "
                     f"decoder or an encoder_decoder does")
  model = nnx.merge(run.graphdef, state)[0]
  texts = sample_text(model, tokenizer, run.config.sample)
  for text in texts:
    print(f"--- sample ---\n{text}", flush=True)
  return texts

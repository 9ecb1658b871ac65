"""Supervised sequence-to-sequence pairs for encoder-decoders (T5): the task `seq2seq`, and
the data, loss and evaluation that span corruption (lm/tasks/span_corruption.py) shares.

Pairs (input text, target text) come from a `.jsonl` file (data.path: one object per line, the
two texts in the fields seq2seq.input_field / seq2seq.target_field; its last data.val_fraction
of pairs are held out) or, with data.path "", from the embedded task: restoring a Shakespeare
speech's punctuation, capitals and line breaks from its lower-cased, unpunctuated one-line
form. Held-out plays give its validation pairs (the same split as genre classification), so no
speech is in both.

Tokens: the char tokenizer of the training pairs (capitals, punctuation and line breaks
included) with T5's specials after the characters: <pad> (also the decoder's start token:
model.decoder_start_id is set to it) and </s> (EOS); span corruption adds the sentinels
<extra_id_99> .. <extra_id_0> (so <extra_id_i> is <extra_id_0> - i, as in T5's vocabulary).
A tokenizer.json that has these tokens (a converted T5's) works too. Inputs and targets end
with EOS and are right-padded with <pad> to fixed lengths: data.seq_len (encoder) and
seq2seq.max_target_len (decoder); a longer one is a UsageError naming the pair. With
seq2seq.length_buckets = n > 1, training batches hold pairs of about the same length
(bucketed_indices) and are cut to k/n of those lengths (n shapes, n compiles; the restoration
pairs average a third of the longest, so most of a fixed-length batch is padding).

A batch: {"inputs", "attention_mask" [B, data.seq_len], "decoder_inputs", "targets", "weights"
[B, max_target_len]}; decoder_inputs are the targets shifted right behind the start token
(teacher forcing), weights 1 on the real target tokens (EOS included). Training batches draw
pairs from a permutation of the training pairs per epoch, from (seed, epoch): every pair once
an epoch, the same batches after a resume.

Metrics: teacher-forced cross-entropy and per-token accuracy (training and every evaluation);
from greedy generation (lm.sample.generate, stopping at EOS): character error rate
(Levenshtein edit distance over target characters, summed over the corpus) and exact match,
beside the copy baseline (output = input), which a model must beat; for the embedded
restoration task also from greedy decoding constrained to spell the input (restore_texts: the
model chooses case, punctuation and line breaks, not the letters). Generation runs over every
validation pair in --mode=eval, and over the first seq2seq.eval_generate (0: none) pairs at the
evaluations during training (it costs a compile and a decode loop).
Config: experiments/t5_restore.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from lm import data as data_lib
from lm import runtime
from lm import tokenizers
from lm import train as train_lib
from lm.errors import UsageError
from lm.tasks import classify
from lm.tasks.lm import cross_entropy


@dataclasses.dataclass
class Pairs:
  inputs: list[str]
  targets: list[str]
  where: list[str] = dataclasses.field(default_factory=list)  # each pair's source, for errors


def strip_for_restoration(text: str) -> str:
  """The restoration task's input: lower case, no punctuation (Unicode category P*), every run
  of whitespace (line breaks included) one space."""
  kept = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
  return " ".join(kept.split())


def restoration_pairs(val_fraction: float = 0.1, min_chars: int = 20, max_chars: int = 200,
                      docs: list[tuple[str, str]] | None = None) -> tuple[Pairs, Pairs]:
  """(train, validation) pairs of the embedded restoration task: every speech of
  min_chars..max_chars characters (as printed) whose stripped form is not empty."""
  docs = data_lib.play_documents() if docs is None else docs
  held = classify.split_plays([n for n, _ in docs], val_fraction)
  train, val = Pairs([], []), Pairs([], [])
  for name, text in docs:
    part = val if name in held else train
    for speech in classify.speeches(text):
      stripped = strip_for_restoration(speech)
      if min_chars <= len(speech) <= max_chars and stripped:
        part.inputs.append(stripped)
        part.targets.append(speech)
        part.where.append(f"the restoration pair {len(part.inputs) - 1} ({name})")
  for split, part in (("training", train), ("validation", val)):
    if not part.inputs:
      raise UsageError(f"the restoration task has no {split} speeches of {min_chars}..{max_chars} "
                       "characters")
  return train, val


def read_pairs(path: str, input_field: str, target_field: str) -> Pairs:
  """Pairs from a .jsonl file, valid Unicode (U+FFFD for undecodable bytes, as every source);
  UsageError naming the line for bad JSON or a missing field, or for a file without pairs."""
  rows = data_lib.read_jsonl(path, input_field, target_field)
  if not rows:
    raise UsageError(f"{path}: no input/target pairs")
  clean = lambda i: [tokenizers.clean_text(r[i], path) for r in rows]
  return Pairs(clean(1), clean(2), [r[0] for r in rows])


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (insertions, deletions, substitutions cost 1), one DP row at a time."""
  if len(a) < len(b):
    a, b = b, a
  row = np.arange(len(b) + 1)
  codes = np.frombuffer(b.encode("utf-32-le"), np.uint32)
  for i, ch in enumerate(a, 1):
    sub = row[:-1] + (codes != ord(ch))  # diagonal: substitute or match
    new = np.empty_like(row)
    new[0] = i
    new[1:] = np.minimum(sub, row[1:] + 1)  # ... or delete ch
    # Insertions chain along the row: new[j] = min(new[j], new[j-1] + 1), a running minimum.
    new = np.minimum.accumulate(new - np.arange(len(new))) + np.arange(len(new))
    row = new
  return int(row[-1])


def char_error_rate(predictions: list[str], targets: list[str]) -> float:
  """Total edit distance / total target characters (corpus-level CER)."""
  if len(predictions) != len(targets):
    raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
  chars = sum(len(t) for t in targets)
  return sum(edit_distance(p, t) for p, t in zip(predictions, targets)) / max(chars, 1)


def exact_match(predictions: list[str], targets: list[str]) -> float:
  """Fraction of predictions equal to their target."""
  return float(np.mean([p == t for p, t in zip(predictions, targets)])) if targets else 0.0


# --- tokens ------------------------------------------------------------------------------------

PAD, EOS = "<pad>", "</s>"  # T5's names (a converted T5 tokenizer has them too)
NUM_SENTINELS = 100  # span corruption's <extra_id_0> .. <extra_id_99>, as T5's vocabulary


def sentinel(i: int) -> str:
  return f"<extra_id_{i}>"


def char_specials(num_sentinels: int = 0) -> tuple[str, ...]:
  """The specials a char tokenizer gains (after its characters): <pad>, </s>, then the
  sentinels counting down, so that <extra_id_i> is the id of <extra_id_0> minus i."""
  return (PAD, EOS, *(sentinel(i) for i in reversed(range(num_sentinels))))


@dataclasses.dataclass(frozen=True)
class Specials:
  """The ids of a tokenizer's T5 specials."""
  pad: int  # also the decoder's start token
  eos: int
  first_sentinel: int  # <extra_id_0>, or -1 without sentinels
  num_sentinels: int  # <extra_id_i> = first_sentinel - i for i < num_sentinels


def specials_of(tokenizer) -> Specials:
  """The tokenizer's <pad>, </s> and sentinels; UsageError if it lacks <pad> or </s>."""
  pad, eos = tokenizers.token_id(tokenizer, PAD), tokenizers.token_id(tokenizer, EOS)
  if pad is None or eos is None:
    raise UsageError(f"an encoder-decoder task needs a tokenizer with {PAD} and {EOS}; this "
                     f"{tokenizer.kind} tokenizer lacks them (use data.tokenizer=char)")
  first, n = tokenizers.token_id(tokenizer, sentinel(0)), 0
  while first is not None and tokenizers.token_id(tokenizer, sentinel(n)) == first - n:
    n += 1
  return Specials(pad, eos, -1 if first is None else first, n)


def task_tokenizer(config, texts: list[str], num_sentinels: int = 0):
  """A new tokenizer for an encoder-decoder task: data.tokenizer (char: the characters of
  `texts` with char_specials(num_sentinels); a tokenizer.json is loaded as it is)."""
  return data_lib.make_tokenizer(config.data, texts, char_specials(num_sentinels))


def with_start_token(config, specials: Specials):
  """config with model.decoder_start_id = the tokenizer's <pad> (0 in the config: take it, as
  T5 starts from pad; another value is a UsageError)."""
  start = config.model.get("decoder_start_id", 0)
  if start not in (0, specials.pad):
    raise UsageError(f"model.decoder_start_id={start} but the tokenizer's {PAD} is "
                     f"{specials.pad}: the decoder starts from {PAD} (leave it 0)")
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.decoder_start_id = specials.pad
  return config


def check_model(config, task: str) -> None:
  """UsageError unless the model (the config's, or the checkpoint's it now holds) is an
  encoder-decoder."""
  arch = config.model.get("arch", "decoder")
  if arch != "encoder_decoder":
    raise UsageError(f"train.task={task!r} needs model.arch='encoder_decoder' (T5: "
                     f"lm.config.t5_model); this model is a {arch}")


# --- examples and batches ----------------------------------------------------------------------

@dataclasses.dataclass
class Examples:
  """Token rows of fixed lengths, right-padded with <pad>: inputs [N, S], targets [N, T]
  (int32; both end with EOS)."""
  inputs: np.ndarray
  targets: np.ndarray


def pad_rows(rows: list[np.ndarray], length: int, pad: int) -> np.ndarray:
  out = np.full((len(rows), length), pad, np.int32)
  for r, row in enumerate(rows):
    out[r, :len(row)] = row
  return out


def encode_pairs(tokenizer, specials: Specials, pairs: Pairs, input_len: int,
                 target_len: int) -> Examples:
  """Pairs -> Examples, each text + EOS; UsageError naming the first pair whose input or target
  is longer than its side's maximum (data.seq_len, seq2seq.max_target_len)."""
  rows = {"input": [], "target": []}
  for i, (x, y) in enumerate(zip(pairs.inputs, pairs.targets)):
    where = pairs.where[i] if pairs.where else f"pair {i}"
    for side, text, limit, field in (("input", x, input_len, "data.seq_len"),
                                     ("target", y, target_len, "seq2seq.max_target_len")):
      ids = np.append(tokenizer.encode(text), specials.eos)
      if len(ids) > limit:
        raise UsageError(f"{where}: its {side} is {len(ids)} tokens with EOS, longer than "
                         f"{field}={limit}")
      rows[side].append(ids)
  return Examples(pad_rows(rows["input"], input_len, specials.pad),
                  pad_rows(rows["target"], target_len, specials.pad))


def make_batch(inputs: np.ndarray, targets: np.ndarray, specials: Specials) -> dict:
  """Rows inputs [B, S], targets [B, T] (right-padded with <pad>) -> the model's batch (see
  the module doc): attention_mask and weights mark what is not <pad>."""
  start = np.full((len(targets), 1), specials.pad, np.int32)
  return {"inputs": inputs.astype(np.int32),
          "attention_mask": (inputs != specials.pad).astype(np.int32),
          "decoder_inputs": np.concatenate([start, targets[:, :-1]], 1).astype(np.int32),
          "targets": targets.astype(np.int32),
          "weights": (targets != specials.pad).astype(np.float32)}


def fill(examples: Examples, specials: Specials) -> np.ndarray:
  """float [N]: the fraction of its row that each pair fills, on its fuller side."""
  used = lambda rows: (rows != specials.pad).sum(1) / rows.shape[1]
  return np.maximum(used(examples.inputs), used(examples.targets))


def bucketed_indices(fills: np.ndarray, *, seed: int, step: int, batch_size: int,
                     num_buckets: int, chunk: int = 16) -> tuple[np.ndarray, float]:
  """(indices [batch_size], fraction of the full lengths the batch needs) of a step's batch,
  by length: the `chunk` batches of steps chunk*c .. chunk*c + chunk - 1 share the next
  chunk * batch_size pairs of the epoch permutations (epoch_indices), sorted by fill, split in
  order and handed out in a random order from (seed, c); each batch is cut to the smallest
  k / num_buckets of the full lengths that holds it. num_buckets 1: epoch_indices' batch at
  the full lengths."""
  if num_buckets == 1:
    return epoch_indices(len(fills), seed=seed, step=step, batch_size=batch_size), 1.0
  c = step // chunk
  pool = epoch_indices(len(fills), seed=seed, step=c, batch_size=chunk * batch_size)
  batches = pool[np.argsort(fills[pool], kind="stable")].reshape(chunk, batch_size)
  idx = batches[np.random.default_rng([seed, c, 4]).permutation(chunk)[step % chunk]]
  return idx, np.ceil(fills[idx].max() * num_buckets - 1e-9) / num_buckets


def epoch_indices(n: int, *, seed: int, step: int, batch_size: int) -> np.ndarray:
  """Indices [batch_size] into n examples of a step's batch: the step's slice of a permutation
  drawn per epoch from (seed, epoch), so every example comes once an epoch."""
  flat = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs = flat // n
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([seed, int(e), 3]).permutation(n)
    out[epochs == e] = perm[flat[epochs == e] % n]
  return out


# --- loss and evaluation (shared with span corruption) ------------------------------------------

def seq2seq_sums(model, batch, rngs=None):
  """(loss sum, correct tokens, scored tokens) of a batch, teacher-forced."""
  logits = model(batch["inputs"], batch["decoder_inputs"], batch["attention_mask"], rngs=rngs)
  loss_sum, count = cross_entropy(logits, batch["targets"], batch["weights"])
  correct = ((logits.argmax(-1) == batch["targets"]) * batch["weights"]).sum()
  return loss_sum, correct, count


def teacher_forced(run, state, examples: Examples, specials: Specials,
                   max_batches: int | None) -> dict:
  """Loss and per-token accuracy over the first max_batches (None: all) batches of
  train.eval_batch_size rows; the last batch is filled with weightless rows."""
  batch_size = run.config.train.eval_batch_size
  train_lib.check_divides_data_parallel(run, eval_batch_size=batch_size)
  step = train_lib.make_eval_step(run, seq2seq_sums)
  n = len(examples.inputs)
  if max_batches is not None:
    n = min(n, max_batches * batch_size)
  totals = np.zeros(3)
  for i in range(0, n, batch_size):
    idx = np.arange(i, i + batch_size)
    real = idx < n
    idx = np.where(real, idx, 0)
    targets = np.where(real[:, None], examples.targets[idx], specials.pad)  # fill: no weight
    batch = make_batch(examples.inputs[idx], targets, specials)
    totals += [float(x) for x in step(state, train_lib.put_batch(run, batch))]
  count = max(totals[2], 1.0)
  return {"val_loss": totals[0] / count, "val_accuracy": totals[1] / count,
          "val_tokens": int(totals[2])}


def _in_batches(examples: Examples, specials: Specials, batch_size: int, decode,
                label: str) -> list:
  """decode(rows [batch_size, S]) -> one token sequence per row, over every input row in
  batches of batch_size (the last one filled with copies, so it compiles once), shortest rows
  first so that a batch's rows end at about the same step; the sequences in row order."""
  order = np.argsort((examples.inputs != specials.pad).sum(1), kind="stable")
  out = [None] * len(order)
  starts, t0 = range(0, len(order), batch_size), time.time()
  for n, i in enumerate(starts, 1):
    chunk = list(order[i:i + batch_size])
    chunk += [chunk[-1]] * (batch_size - len(chunk))
    for j, seq in zip(chunk, decode(examples.inputs[chunk])):
      out[j] = seq
    if len(starts) >= 10 and n % (len(starts) // 5) == 0:  # --mode=eval takes minutes
      logging.info("%s: %d of %d pairs (%.0f s)", label, min(i + batch_size, len(order)),
                   len(order), time.time() - t0)
  return out


def generate_texts(model, tokenizer, specials: Specials, examples: Examples, batch_size: int,
                   max_new_tokens: int) -> list[str]:
  """Greedy outputs for every input row, decoded (up to EOS)."""
  from lm import sample as sample_lib

  def decode(rows):
    seqs = sample_lib.generate(model, [row[row != specials.pad] for row in rows],
                               temperature=0.0, max_new_tokens=max_new_tokens,
                               stop_token=specials.eos, pad_to=rows.shape[1])
    return [seq[0] for seq in seqs]
  return [tokenizer.decode(seq)
          for seq in _in_batches(examples, specials, batch_size, decode, "greedy decoding")]


# --- restoration decoding: the output spells the input ------------------------------------------

PUNCT, SPACE, CHAR = 1, 2, 3  # restoration_tables' kinds (0: a token never emitted)


def restoration_tables(tokenizer, specials: Specials) -> tuple[np.ndarray, np.ndarray]:
  """(kind [V], key [V]) int32 over the vocabulary, for restore_texts: tokens of one
  punctuation character (Unicode P*) are PUNCT; a whitespace character is SPACE and a
  character whose lower case is one token is CHAR, each keyed by the input token it spells
  (the space, or the lower-case character); anything else is 0."""
  v = tokenizer.vocab_size
  kind, key = np.zeros(v, np.int32), np.full(v, -1, np.int32)
  space = tokenizer.encode(" ")
  for i in range(v):
    if i in (specials.pad, specials.eos):
      continue
    ch = tokenizer.decode([i])
    if len(ch) != 1:
      continue
    lower = space if ch.isspace() else tokenizer.encode(ch.lower())
    if unicodedata.category(ch).startswith("P"):
      kind[i] = PUNCT
    elif len(lower) == 1:
      kind[i], key[i] = (SPACE if ch.isspace() else CHAR), lower[0]
  return kind, key


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _restore(graphdef, state, inputs, max_new_tokens, num_beams, length_penalty, valid, kind,
             key, eos):
  """Beam search (lm.sample.beam_search; one beam: greedy) over the outputs that spell
  `inputs` [B, S]: the decoder step is wrapped so that its logits allow only the tokens
  restore_texts names, and the beams carry their pointer into the input with the cache."""
  from lm import sample as sample_lib
  model = nnx.merge(graphdef, state)
  s = inputs.shape[1]
  logits, cache, step = sample_lib.start_decoding(model, inputs, valid, max_new_tokens,
                                                  repeat=num_beams)
  vocab = jnp.arange(kind.shape[0])[None]

  def constrain(logits, ptr, rows, j):
    """logits [N, V] of output token j with -inf where the output would not spell rows [N, S]
    (ptr [N]: the next input token to spell): punctuation only while the tokens left after
    this one can still spell the rest, so every output within the budget spells its input."""
    nxt = jnp.take_along_axis(rows, ptr[:, None], 1)  # [N, 1]
    left_to_spell = jnp.argmax(rows == eos, axis=1) - ptr  # [N]: input tokens before EOS
    punct_ok = (max_new_tokens - j - 1 >= left_to_spell)[:, None]
    allowed = (((kind[None] == PUNCT) & punct_ok) | ((kind[None] > PUNCT) & (key[None] == nxt))
               | ((vocab == eos) & (nxt == eos)))
    return jnp.where(allowed, logits, -jnp.inf)

  def spelling_step(tok, carry, i):  # tok: output token i; returns the logits of token i + 1
    cache, ptr, rows = carry
    ptr = jnp.minimum(ptr + (kind[tok] > PUNCT), s - 1)  # punctuation spells nothing
    logits, cache = step(tok, cache, i)
    return constrain(logits, ptr, rows, i + 1), (cache, ptr, rows)

  ptr = jnp.zeros(inputs.shape[0], jnp.int32)
  beams = sample_lib.beam_search(spelling_step, constrain(logits, ptr, inputs, 0),
                                 (cache, ptr, inputs), num_beams=num_beams,
                                 max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                 early_stopping=True, stop_token=eos)
  return beams.tokens[:, 0]


def restore_texts(model, tokenizer, specials: Specials, examples: Examples, batch_size: int,
                  max_new_tokens: int, num_beams: int = 1, length_penalty: float = 1.0
                  ) -> list[str]:
  """Outputs constrained to spell their input, for the restoration task: at each step only
  the tokens that keep the output equal to the input up to case, punctuation and whitespace
  are allowed (the input's next character in either case, or a line break or space for its
  next space, or any punctuation while the max_new_tokens budget can still spell the rest of
  the input; EOS once the input is spelled), so every output spells its input (max_new_tokens
  at least the input's length); one beam is greedy among them, more run
  lm.sample.beam_search (Hugging Face's rules; a hypothesis's score is its sum of
  log-probabilities renormalised over the allowed tokens, / length ** length_penalty).
  This is how a tagger restores punctuation (it cannot change the words), and Hugging Face's
  prefix_allowed_tokens_fn; the free greedy output (generate_texts) shows how well the model
  copies on its own."""
  from lm import sample as sample_lib
  kind, key = (jnp.asarray(t) for t in restoration_tables(tokenizer, specials))
  graphdef, state = nnx.split(model)

  def decode(rows):
    out = _restore(graphdef, state, jnp.asarray(rows), max_new_tokens, num_beams,
                   jnp.float32(length_penalty), jnp.asarray(rows != specials.pad, jnp.int32),
                   kind, key, jnp.int32(specials.eos))
    return [sample_lib.cut_at_stop(seq, specials.eos) for seq in np.asarray(out)]
  return [tokenizer.decode(seq)
          for seq in _in_batches(examples, specials, batch_size, decode, "constrained decoding")]


def generation_metrics(predictions: list[str], pairs: Pairs) -> dict:
  """CER and exact match of `predictions` for the first len(predictions) pairs, and the copy
  baseline's on the same pairs."""
  n = len(predictions)
  inputs, targets = pairs.inputs[:n], pairs.targets[:n]
  return {"cer": char_error_rate(predictions, targets),
          "exact_match": exact_match(predictions, targets),
          "copy_cer": char_error_rate(inputs, targets),
          "copy_exact_match": exact_match(inputs, targets), "generated_pairs": n}


def describe(result: dict) -> str:
  """The log line of a seq2seq or span-corruption evaluation."""
  line = (f"val_loss {result['val_loss']:.4f} | token accuracy {result['val_accuracy']:.4f} "
          f"over {result['val_tokens']} tokens")
  if "cer" in result:
    line += (f" | CER {result['cer']:.4f} (copy baseline {result['copy_cer']:.4f}) | exact "
             f"match {result['exact_match']:.4f} (copy {result['copy_exact_match']:.4f}) over "
             f"{result['generated_pairs']} pairs")
  if "cer_constrained" in result:
    line += (f" | constrained to spell the input: CER {result['cer_constrained']:.4f}, exact "
             f"match {result['exact_match_constrained']:.4f}")
  return line


# --- the task ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
  tokenizer: object
  specials: Specials
  train: Examples
  val: Examples
  val_pairs: Pairs  # the validation texts, in the order of `val`
  train_fill: np.ndarray  # fill(train): the length buckets of the training batches
  generate_all: bool = False  # --mode=eval: generation metrics over every validation pair
  restoration: bool = False  # the embedded restoration pairs: also restore_texts' metrics


def options(config) -> dict:
  """config.seq2seq with its defaults."""
  sc = config.get("seq2seq") or {}
  return {"input_field": sc.get("input_field", "input"),
          "target_field": sc.get("target_field", "target"),
          "max_target_len": int(sc.get("max_target_len", 256)),
          "eval_generate": int(sc.get("eval_generate", 0)),
          "length_buckets": int(sc.get("length_buckets", 1)),
          # the embedded restoration task: speeches of 20..max_chars characters as printed
          "max_chars": int(sc.get("max_chars", 200))}


def load_pairs(config, path: str | None = None) -> tuple[Pairs, Pairs]:
  """(training, validation) pairs of data.path (or `path`: all of them validation)."""
  opts = options(config)
  if path is not None:
    return Pairs([], []), read_pairs(path, opts["input_field"], opts["target_field"])
  if not config.data.path:
    return restoration_pairs(config.data.val_fraction, max_chars=opts["max_chars"])
  if not config.data.path.endswith(".jsonl"):
    raise UsageError(f"data.path={config.data.path!r}: the seq2seq task reads a .jsonl file of "
                     f"pairs ('' for the embedded restoration task)")
  pairs = read_pairs(config.data.path, opts["input_field"], opts["target_field"])
  n_val = max(1, round(len(pairs.inputs) * config.data.val_fraction))
  if len(pairs.inputs) - n_val < 1:
    raise UsageError(f"{config.data.path}: {len(pairs.inputs)} pair(s); the seq2seq task needs "
                     f"at least 2 (training and validation)")
  cut = len(pairs.inputs) - n_val
  part = lambda sl: Pairs(pairs.inputs[sl], pairs.targets[sl], pairs.where[sl])
  return part(slice(0, cut)), part(slice(cut, None))


def shuffled(pairs: Pairs) -> Pairs:
  """The pairs in a fixed random order, so that an evaluation over the first few batches
  samples the whole split (the restoration pairs come play by play)."""
  order = np.random.default_rng(0).permutation(len(pairs.inputs))
  pick = lambda xs: [xs[i] for i in order] if xs else xs
  return Pairs(pick(pairs.inputs), pick(pairs.targets), pick(pairs.where))


class Seq2Seq(runtime.Task):
  name = "seq2seq"

  def load_data(self, config, tokenizer):
    check_model(config, self.name)
    train, val = load_pairs(config)
    tokenizer = tokenizer or task_tokenizer(config, train.targets + train.inputs)
    config, data = self._encode(config, tokenizer, train, val, restoration=not config.data.path)
    logging.info("seq2seq: %d training pairs, %d validation pairs; vocabulary %d, start token %d",
                 len(data.train.inputs), len(data.val.inputs), tokenizer.vocab_size,
                 data.specials.pad)
    return config, tokenizer, data

  def eval_data(self, config, tokenizer, data_path):
    check_model(config, self.name)
    train, val = load_pairs(config, data_path)
    restoration = not (data_path or config.data.path)
    return dataclasses.replace(self._encode(config, tokenizer, train, val, restoration)[1],
                               generate_all=True)

  @staticmethod
  def _encode(config, tokenizer, train: Pairs, val: Pairs, restoration: bool):
    specials = specials_of(tokenizer)
    config = with_start_token(config, specials)
    lengths = config.data.seq_len, options(config)["max_target_len"]
    val = shuffled(val)
    train = encode_pairs(tokenizer, specials, train, *lengths)
    return config, Data(tokenizer, specials, train,
                        encode_pairs(tokenizer, specials, val, *lengths), val,
                        fill(train, specials), restoration=restoration)

  def batch(self, data: Data, config, step):
    idx, part = bucketed_indices(data.train_fill, seed=config.seed, step=step,
                                 batch_size=config.train.batch_size,
                                 num_buckets=options(config)["length_buckets"])
    cut = lambda rows: rows[idx, :int(np.ceil(rows.shape[1] * part))]
    return make_batch(cut(data.train.inputs), cut(data.train.targets), data.specials)

  def batch_tokens(self, batch):
    """Input and target positions, padding included (what the step computes; a bucketed
    batch is cut short)."""
    return sum(int(np.prod(batch[k].shape)) for k in ("inputs", "targets"))

  def loss(self, model, batch, rngs):
    loss_sum, correct, count = seq2seq_sums(model, batch, rngs)
    count = jnp.maximum(count, 1.0)
    return loss_sum / count, {"train_accuracy": correct / count}

  def evaluate(self, run, state, data: Data, max_batches):
    result = teacher_forced(run, state, data.val, data.specials, max_batches)
    n = len(data.val.inputs) if data.generate_all else options(run.config)["eval_generate"]
    if n:
      val = Examples(data.val.inputs[:n], data.val.targets[:n])
      model = nnx.merge(run.graphdef, state)[0]
      args = (model, data.tokenizer, data.specials, val, run.config.train.eval_batch_size,
              val.targets.shape[1])
      result.update(generation_metrics(generate_texts(*args), data.val_pairs))
      if data.restoration:
        restored = generation_metrics(restore_texts(*args), data.val_pairs)
        result.update(cer_constrained=restored["cer"],
                      exact_match_constrained=restored["exact_match"])
    return result

  def describe(self, result):
    return describe(result)

  def report(self, run, state, tokenizer, data: Data):
    """config.sample.num_samples validation pairs with the model's greedy output (and on the
    restoration task its output constrained to spell the input), on stdout."""
    n = min(run.config.sample.num_samples, len(data.val.inputs))
    if not n:
      return
    val = Examples(data.val.inputs[:n], data.val.targets[:n])
    model = nnx.merge(run.graphdef, state)[0]
    args = (model, tokenizer, data.specials, val, run.config.train.eval_batch_size,
            val.targets.shape[1])
    texts = generate_texts(*args)
    restored = restore_texts(*args) if data.restoration else [None] * n
    for i, (text, spelled) in enumerate(zip(texts, restored)):
      constrained = "" if spelled is None else f"--- constrained ---\n{spelled}\n"
      print(f"--- input ---\n{data.val_pairs.inputs[i]}\n--- output ---\n{text}\n{constrained}"
            f"--- target ---\n{data.val_pairs.targets[i]}", flush=True)


TASK = Seq2Seq()

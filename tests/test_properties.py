"""Properties that exact-reference tests cannot see (issue 20): the sampled distribution
itself, the exact value of every reported metric, dropout keys, batches across processes and
accumulated gradients compared directly.

Each test says how it was checked to fail: the code was broken once, the test run and seen to
fail, and the code restored.
"""

import hashlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lm import sample as sample_lib
from tests.conftest import ROOT, tiny_config

# ---------------------------------------------------------------- sampling distributions

DRAWS = 20_000
# Per-bin false-alarm probability; with < 100 bins in all, a correct sampler fails this test
# with probability < 1e-6 (and the seed is fixed anyway, so it either always passes or not).
DELTA = 1e-8


def binomial_bound(n: int, p: float, delta: float = DELTA) -> float:
  """t with P(|X - n p| >= t) <= delta for X ~ Binomial(n, p): Bernstein's inequality
  2 exp(-t^2 / (2 (n p (1 - p) + t / 3))) = delta solved for t (rigorous, no normal
  approximation, so it also holds for the rare tokens)."""
  a = math.log(2 / delta)
  return a / 3 + math.sqrt((a / 3) ** 2 + 2 * a * n * p * (1 - p))


def filtered_distribution(logits, temperature, top_k, top_p):
  """float64 numpy: softmax(logits / T) restricted to the top_k tokens, renormalised, then to
  the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
  p = np.exp(logits / temperature - np.max(logits / temperature))
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  keep = np.zeros(len(p), bool)
  keep[order[:top_k or len(p)]] = True
  p = np.where(keep, p, 0.0) / p[keep].sum()
  before = np.cumsum(p[order]) - p[order]  # mass of the tokens ranked above each one
  # The nucleus edge must not be within float32 rounding of top_p (fixed logits: checked once).
  assert top_p == 1 or np.min(np.abs(before - top_p)) > 1e-3
  keep = np.zeros(len(p), bool)
  keep[order[before < top_p]] = True
  return np.where(keep, p, 0.0) / p[keep].sum()


def worst_excess(counts, probs):
  """max over bins of |count - n p| / bound (> 1: the counts do not come from probs); a token of
  probability 0 drawn even once counts as infinite."""
  n = counts.sum()
  if np.any(counts[probs == 0] > 0):
    return np.inf
  return max(abs(c - n * p) / binomial_bound(n, p) for c, p in zip(counts, probs) if p > 0)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.5, 0, 1.0), (2.0, 0, 1.0),  # plain temperature, both sides of 1
    (1.7, 3, 1.0),  # top-k (a compiled width of 4 keeps 3)
    (0.8, 0, 0.7),  # nucleus
    (1.3, 6, 0.85),  # both
])
def test_sampled_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
  """20,000 draws from fixed logits, one jitted vmap over keys, against the numpy
  distribution; every bin within a Bernstein bound at false-alarm 1e-8.

  The test also checks that it could tell softmax(logits / T^2) (temperature applied twice)
  apart. Checked to fail (break, run, revert): a second `scaled = scaled / temperature` in
  sample_logits fails all five cases; ranking the candidates on the unscaled logits fails the
  three filtered cases; a nucleus over the top-k width without renormalising to the k kept
  tokens fails the combined case."""
  logits = np.random.default_rng(5).normal(0, 1.5, 10)
  keys = jax.random.split(jax.random.key(17), DRAWS)
  draw = jax.jit(jax.vmap(lambda k: sample_lib.sample_logits(
      jnp.asarray(logits[None], jnp.float32), k, jnp.float32(temperature), jnp.int32(top_k),
      jnp.float32(top_p), sample_lib.Mode.of(top_k, top_p, len(logits)))[0]))
  counts = np.bincount(np.asarray(draw(keys)), minlength=len(logits))
  expected = filtered_distribution(logits, temperature, top_k, top_p)
  assert worst_excess(counts, expected) <= 1.0, (counts / DRAWS, expected)
  # Power: these counts reject the temperature applied twice.
  assert worst_excess(counts, filtered_distribution(logits, temperature ** 2, top_k, top_p)) > 1


# ---------------------------------------------------------------- metric values


def random_state(run, seed: int):
  """A train state built without compiling anything: model parameters N(0, 0.3) (LayerNorm
  scales N(1, 0.3)), far from the near-uniform initialisation; optimizer state zero."""
  state = jax.tree.map(lambda a: jnp.asarray(np.zeros(a.shape, a.dtype)), run.abstract_state())
  rng = np.random.default_rng(seed)
  nnx.replace_by_pure_dict(state[0], jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(rng.normal(path[-1].key == "scale", 0.3, x.shape), x.dtype),
      nnx.to_pure_dict(state[0])))
  return state


def bigram_state(run, seed: int):
  """`random_state` with every block's residual outputs (attention wo, MLP w_out) zero: the
  logits after token t are then LN(embed[t]) @ head, which numpy computes (`bigram_logits`)."""
  state = random_state(run, seed)
  pure = nnx.to_pure_dict(state[0])
  residual_out = (("attn", "wo"), ("mlp", "w_out"))
  # Either layout (per-layer blocks/<i>/attn/wo or stacked blocks/attn/wo): by the path's end.
  pure["blocks"] = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if tuple(k.key for k in path[-2:]) in residual_out else x,
      pure["blocks"])
  nnx.replace_by_pure_dict(state[0], pure)
  return state


def bigram_logits(run, state, head: str = "head") -> np.ndarray:
  """float64 [V, V]: row t is the logits after token t of the `bigram_state` model; with
  head="cls_head": [V, num_classes], the class logits of a row whose last token is t."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(state)[0])
  x = p["embed"]
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + run.model_cfg.ln_eps)
  y = y * p["ln_f"]["scale"] + p["ln_f"]["bias"]
  return y @ p[head] + (p["cls_bias"] if head == "cls_head" else 0)


def nll(logits, inputs, targets) -> np.ndarray:
  """float64 negative log-likelihoods of targets after inputs under bigram logits [V, V]."""
  rows = logits[inputs]
  top = rows.max(-1)
  return top + np.log(np.exp(rows - top[:, None]).sum(-1)) - rows[np.arange(len(rows)), targets]


TEXT = "Ça m'émeut: naïve façade, cœur brûlé — «où?» dit Zoë. And then plain ASCII.\n" * 40


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_validation_metrics_have_their_exact_values(tokenizer, tmp_path):
  """val_loss, val_ppl, val_bpb and val_tokens of the lm task's evaluate on a bigram model, against
  float64 numpy over every target of the validation text (the ragged tail and the padding rows
  of the last batch included).

  Bits per byte = (nats per scored token / ln 2) x (tokens / UTF-8 bytes of the validation
  text): with the byte tokenizer that is loss / ln 2; the char tokenizer has multibyte
  characters (fewer tokens than bytes). Checked to fail: reporting bits per byte in nats
  (dropping `/ math.log(2)`), counting characters instead of UTF-8 bytes in load_corpus
  (len(text) for val_bytes), and scoring padding (weights of 1
  everywhere in eval_batches) each fail."""
  from lm import data, train
  from lm.tasks import lm as lm_task
  path = tmp_path / "text.txt"
  path.write_text(TEXT, encoding="utf-8")
  config = tiny_config(**{"data.path": str(path), "data.tokenizer": tokenizer,
                          "model.tie_embeddings": False})
  corpus = data.load_corpus(config.data)
  run = train.make_run(config, corpus.tokenizer.vocab_size)
  state = bigram_state(run, seed=3)
  with jax.set_mesh(run.mesh):
    got = lm_task.TASK.evaluate(run, state, corpus, None)  # eval_batch_size 8

  ids = np.asarray(corpus.val)
  val_text = corpus.tokenizer.decode(ids)
  assert TEXT.endswith(val_text) and len(val_text) > 200
  n_bytes = len(val_text.encode("utf-8"))
  assert (n_bytes > len(ids)) == (tokenizer == "char")  # multibyte characters are one token
  assert len(ids) % 32 != 1 and (len(ids) - 1) // 32 % 8  # a ragged tail, padding rows
  nats = nll(bigram_logits(run, state), ids[:-1], ids[1:])
  loss = nats.sum() / len(nats)
  assert got["val_tokens"] == len(ids) - 1
  assert got["val_loss"] == pytest.approx(loss, rel=1e-5)
  assert got["val_ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
  assert got["val_bpb"] == pytest.approx(loss / math.log(2) * len(ids) / n_bytes, rel=1e-5)
  if tokenizer == "byte":
    assert got["val_bpb"] == pytest.approx(loss / math.log(2), rel=1e-5)


def test_classification_metrics_have_their_exact_values():
  """lm.tasks.classify.evaluate (real eval step) and the train step's metrics on a bigram classifier
  (class logits from the last real token alone), against numpy: 13 held-out rows in batches
  of 4 (3 padding rows), labels chosen so that exactly 8 of 13 predictions are right.

  Checked to fail (break, run, revert), each: accuracy as the mean of per-batch accuracies
  (the last batch has one real row), per-class accuracy as the frequency of predicting the
  class, Dataset.majority from the held-out labels instead of the training ones, pooling the
  first token instead of the last (lengths - 1 -> 0 in Transformer.classify), and the train
  step's accuracy from an argmax over the wrong axis."""
  from lm import train
  from lm.tasks import classify
  classes = ["comedies", "histories", "roman", "tragedies", "problems"]
  config = tiny_config(**{"model.num_classes": len(classes), "train.eval_batch_size": 4})
  vocab = 40
  run = train.make_run(config, vocab)
  state = bigram_state(run, seed=4)
  rng = np.random.default_rng(4)
  n, seq_len = 13, 32
  lengths = rng.integers(1, seq_len + 1, n).astype(np.int32)
  tokens = rng.integers(1, vocab, (n, seq_len)).astype(np.int32)
  tokens[np.arange(seq_len) >= lengths[:, None]] = 0  # right padding, as classify.encode
  logits = bigram_logits(run, state, "cls_head")[tokens[np.arange(n), lengths - 1]]
  pred = logits.argmax(-1)
  assert len(set(pred.tolist())) > 1  # the model does not answer a constant
  right = np.arange(n) < 8
  labels = np.where(right, pred, (pred + 1 + rng.integers(0, len(classes) - 1, n)) % len(classes))
  labels = labels.astype(np.int32)
  plays = [f"{classes[y]}/play{i % 3}" for i, y in enumerate(labels)]
  train_labels = np.asarray([2, 2, 2, 0, 1, 2, 4], np.int32)
  ds = classify.Dataset(classes, classify.Examples(["x"] * 7, train_labels, ["p"] * 7),
                        classify.Examples(["x"] * n, labels, plays))
  assert ds.majority == 2  # the commonest training genre
  with jax.set_mesh(run.mesh):
    got = classify.evaluate(run, state, ds.val, tokens, lengths, ds.majority, classes)
  top = logits.max(-1)
  row_loss = top + np.log(np.exp(logits - top[:, None]).sum(-1)) - logits[np.arange(n), labels]
  counts = np.bincount(labels, minlength=len(classes))
  assert got["val_accuracy"] == 8 / 13
  assert got["val_loss"] == pytest.approx(row_loss.mean(), rel=1e-5)
  assert got["majority_class"] == "roman"
  assert got["majority_baseline"] == np.sum(labels == 2) / 13
  assert got["best_constant_baseline"] == counts.max() / 13
  assert got["val_examples"] == 13 and got["val_plays"] == len(set(plays))
  assert got["val_accuracy_per_class"] == {
      c: (float(np.mean(right[labels == k])) if counts[k] else None) for k, c in enumerate(classes)}

  # The train step reports the loss and accuracy of the parameters before its update.
  with jax.set_mesh(run.mesh):
    batch = {"tokens": tokens[:12], "lengths": lengths[:12], "labels": labels[:12]}
    _, metrics = train.make_train_step(run, classify.TASK.loss)(
        state, train.put_micro_batches(run, batch, 1), 0)
  assert float(metrics["train_loss"]) == pytest.approx(row_loss[:12].mean(), rel=1e-5)
  assert float(metrics["train_accuracy"]) == pytest.approx(8 / 12)


# ---------------------------------------------------------------- dropout


def fresh(state):
  """A copy of a train state (the train step donates its input)."""
  return jax.tree.map(jnp.copy, state)


def test_dropout_masks_come_from_the_step_and_are_off_in_evaluation():
  """Dropout 0.3 in the LM train step: the same step twice gives the same loss and gradient
  norm; other steps (same parameters, same batch) give other values, as do the two
  micro-batches of one step; the training loss differs from the loss without dropout;
  evaluation (no rngs) is deterministic and equals the dropout-0 model's.

  Checked to fail: a dropout key independent of the step (`base_key = jax.random.key(seed)`
  in make_train_step), one key for every micro-batch (dropping the fold_in of the micro-batch
  index), and dropout left on in evaluation (`deterministic=False` in Block) each fail."""
  from lm import train
  from lm.data import get_batch
  from lm.tasks import lm as lm_task
  vocab = 50
  ids = np.random.default_rng(0).integers(0, vocab, 3000).astype(np.int32)
  batch = get_batch(ids, seed=0, step=0, batch_size=8, seq_len=32)
  runs = {p: train.make_run(tiny_config(**{"model.dropout": p, "model.num_layers": 1}), vocab)
          for p in (0.0, 0.3)}
  run = runs[0.3]
  # Large random weights, so that dropout moves the loss a lot. Dropout has no parameters:
  # the same state serves both runs.
  state = random_state(run, seed=0)
  step_fn = lm_task.train_step(run)

  def metrics(step, micro_batches=1):
    stacked = np.stack([batch] * micro_batches)
    with jax.set_mesh(run.mesh):
      _, m = step_fn(fresh(state), train.put_batch(run, {"tokens": stacked}, micro=True), step)
    return float(m["train_loss"]), float(m["grad_norm"])

  same = metrics(5)
  assert metrics(5) == same
  others = [metrics(s) for s in (0, 6, 1000)]
  assert len({same, *others}) == 4  # every step its own mask
  # Two identical micro-batches, two masks: the mean loss is not the one-micro-batch loss.
  assert metrics(5, micro_batches=2)[0] != same[0]

  evals, eval_steps = [], {p: lm_task.eval_step(r) for p, r in runs.items()}
  for p in (0.3, 0.3, 0.0):
    with jax.set_mesh(runs[p].mesh):
      s, c = eval_steps[p](state, train.put_batch(
          runs[p], {"tokens": batch, "weights": np.ones((8, 32), np.float32)}))
    evals.append(float(s) / float(c))
  assert evals[0] == evals[1] == pytest.approx(evals[2], rel=1e-6)
  # Dropout changes what training sees: every training loss differs from the clean one
  # (here by 0.01 to 0.11; float32 rounding is ~1e-6).
  assert min(abs(x[0] - evals[2]) for x in [same, *others]) > 1e-4


def test_classifier_dropout_masks_come_from_the_step():
  """The classifier's train step with dropout 0.3: the same step twice gives the same loss,
  other steps other losses. Checked to fail: `key = jax.random.key(seed)` (no fold_in of the
  step) in the classifier's train step (the shared lm.train.make_train_step)."""
  from lm import train
  from lm.tasks import classify
  run = train.make_run(tiny_config(**{"model.dropout": 0.3, "model.num_layers": 1,
                                      "model.num_classes": 3}), 50)
  state = random_state(run, seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (8, 32)).astype(np.int32)
  lengths = rng.integers(1, 33, 8).astype(np.int32)
  labels = rng.integers(0, 3, 8).astype(np.int32)
  step_fn = train.make_train_step(run, classify.TASK.loss)

  def loss(step):
    with jax.set_mesh(run.mesh):
      batch = {"tokens": tokens, "lengths": lengths, "labels": labels}
      _, m = step_fn(fresh(state), train.put_micro_batches(run, batch, 1), step)
    return float(m["train_loss"])

  assert loss(5) == loss(5)
  assert len({loss(s) for s in (0, 5, 6, 1000)}) == 4


# ---------------------------------------------------------------- batches across processes

# Run in fresh processes: the corpus of a folder of documents, then training batches (LM and
# classifier, plain and balanced) for a few (seed, step); prints a digest of each.
_DRAW_BATCHES = """
import hashlib, json, sys, types
import numpy as np
from lm import data
from lm.tasks import classify
cfg = types.SimpleNamespace(path=sys.argv[1], tokenizer="char", val_fraction=0.25, seq_len=16,
                            text_field="text")
corpus = data.load_corpus(cfg)
labels = np.arange(100, dtype=np.int32) % 7
out = {"train": corpus.train, "val": corpus.val}
for seed, step in ((0, 0), (0, 1), (1, 0), (3, 12345)):
  out[f"lm/{seed}/{step}"] = data.get_batch(corpus.train, seed=seed, step=step, batch_size=8,
                                            seq_len=16)
  for balanced in (False, True):
    out[f"cls/{seed}/{step}/{balanced}"] = classify.sample_batch(
        labels, seed=seed, step=step, batch_size=8, balanced=balanced)
print(json.dumps({k: hashlib.sha256(np.ascontiguousarray(v)).hexdigest() for k, v in out.items()}))
"""


def test_batches_are_the_same_in_every_process(tmp_path):
  """Two fresh processes (different PYTHONHASHSEED, run side by side) split the same corpus
  and draw the same LM and classifier batches for each (seed, step) as this process, while
  different steps or seeds draw different batches.

  Checked to fail: get_batch seeded with [seed, step, os.getpid()] (same within a process, so
  tests/test_data.py passes), and split_documents ranking documents by hash() instead of
  crc32, each fail."""
  for i in range(12):  # >= 10 documents: whole documents go to validation, ranked by name
    (tmp_path / f"doc{i:02d}.txt").write_text(f"Document {i}: " + "to be or not to be, " * (5 + i))
  procs = [subprocess.Popen([sys.executable, "-c", _DRAW_BATCHES, str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT, "PYTHONHASHSEED": str(seed)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for seed in (1, 2)]
  digests = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    digests.append(json.loads(out))
  assert digests[0] == digests[1]
  # This process agrees, and the digests tell batches apart (so equality means something).
  from lm import data
  corpus = data.load_corpus(tiny_config(**{"data.path": str(tmp_path), "data.val_fraction": 0.25,
                                           "data.seq_len": 16}).data)
  batch = data.get_batch(corpus.train, seed=3, step=12345, batch_size=8, seq_len=16)
  assert digests[0]["lm/3/12345"] == hashlib.sha256(batch).hexdigest()
  assert digests[0]["val"] == hashlib.sha256(np.ascontiguousarray(corpus.val)).hexdigest()
  assert len(set(digests[0].values())) == len(digests[0])


# ---------------------------------------------------------------- gradient accumulation


def capture_gradients() -> optax.GradientTransformation:
  """An 'optimizer' whose state is the gradient it was last given (its updates are zero)."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def test_accumulated_gradients_equal_the_full_batch_gradient(monkeypatch):
  """The gradient the train step hands to the optimizer, for grad_accum 1 and 2 on the same
  global batch of 8 rows (at step 7), against jax.grad of the mean loss over all 8 rows in one
  plain call; the reported train_loss and grad_norm too. Large random weights, so every gradient entry is
  far from zero; tolerance 1e-5 of each array's largest entry (float32 summation order).

  Checked to fail (break, run, revert): keeping only the last micro-batch's gradient (with
  the loss still summed right: the gradient comparison fails), summing instead of averaging
  the micro-batch gradients, and dividing them by the micro-batch size instead of their
  number each fail, and so does a grad_norm divided by the number of micro-batches. Measured
  agreement: 1.2e-6 of the largest entry."""
  from lm import train
  from lm.data import get_batch
  from lm.tasks import lm as lm_task
  make_optimizer = train.make_optimizer
  monkeypatch.setattr(train, "make_optimizer", lambda tc: (capture_gradients(),
                                                           make_optimizer(tc)[1]))
  vocab = 50
  ids = np.random.default_rng(1).integers(0, vocab, 3000).astype(np.int32)
  batch = get_batch(ids, seed=0, step=7, batch_size=8, seq_len=32)
  run = train.make_run(tiny_config(**{"model.num_layers": 1}), vocab)
  state = random_state(run, seed=1)

  def direct_loss(model):
    logits = model(jnp.asarray(batch[:, :-1]))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  model = nnx.merge(run.graphdef, fresh(state))[0]
  want_loss, want = nnx.jit(nnx.value_and_grad(direct_loss))(model)
  want = nnx.to_pure_dict(want)
  want_norm = math.sqrt(sum(np.sum(np.square(w, dtype=np.float64)) for w in jax.tree.leaves(want)))
  for accum in (1, 2):
    config = tiny_config(**{"train.grad_accum": accum, "model.num_layers": 1})
    run = train.make_run(config, vocab)
    with jax.set_mesh(run.mesh):
      out, metrics = lm_task.train_step(run)(
          fresh(state), train.put_micro_batches(run, {"tokens": batch}, accum), 7)
    got = nnx.to_pure_dict(out)[1]["opt_state"]
    assert float(metrics["train_loss"]) == pytest.approx(float(want_loss), rel=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(want_norm, rel=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(
        g, w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=f"grad_accum={accum}"), got, want)

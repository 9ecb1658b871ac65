"""Using trained runs: evaluation over a whole split, fine-tuning that starts at the source
checkpoint's loss, and a genre classifier that beats the majority baseline on held-out plays."""

import json
import math
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from lm import data, runtime, tasks
from lm.tasks import classify
from lm.errors import UsageError
from tests.conftest import tiny_config


def _play_texts():
  docs = dict(data.play_documents())
  return docs["comedies/twelfth-night"], docs["tragedies/othello"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A tiny LM trained on part of one play; and a second play's text as new data."""
  root = tmp_path_factory.mktemp("finetune")
  a, b = _play_texts()
  old, new = root / "old.txt", root / "new.txt"
  old.write_text(a[:40000])
  new.write_text(b[:20000])
  config = tiny_config(**{"data.path": str(old), "train.num_steps": 60,
                          "train.learning_rate": 3e-3, "train.eval_every": 60,
                          "train.checkpoint_every": 60, "train.log_every": 20})
  workdir = str(root / "source")
  runtime.train(config, workdir, tasks.get("lm"))
  return config, workdir, str(new), root


def test_eval_covers_the_whole_split(source):
  config, workdir, new, _ = source
  run, _, tokenizer, _ = runtime.load(config, workdir)
  val = data.load_corpus(run.config.data, tokenizer).val
  result = runtime.evaluate(config, workdir, tasks.get("lm"))
  assert result["val_tokens"] == len(val) - 1  # every target once, not eval_batches' worth
  assert math.isclose(result["val_ppl"], math.exp(result["val_loss"]), rel_tol=1e-9)
  assert result["val_bpb"] > 0
  on_new = runtime.evaluate(config, workdir, tasks.get("lm"), data_path=new)
  assert on_new["data"] == new and on_new["val_tokens"] != result["val_tokens"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["val_loss"] for r in records[-2:]] == [result["val_loss"], on_new["val_loss"]]
  assert records[-1]["step"] == 60 and records[-1]["mode"] == "eval"


def test_finetuning_starts_at_the_checkpoint_loss(source):
  config, workdir, new, root = source
  # The source model's loss on the fine-tuning run's first batch, computed independently.
  run, state, tokenizer, _ = runtime.load(config, workdir)
  model = nnx.merge(run.graphdef, state)[0]
  ft = tiny_config(**{"data.path": new, "train.init_from": workdir, "train.num_steps": 15,
                      "train.log_every": 1, "train.eval_every": 15, "train.learning_rate": 1e-3,
                      "train.warmup_steps": 1, "seed": 5,
                      # a different model in the config: the source's shape wins
                      "model.d_model": 64, "data.tokenizer": "byte"})
  corpus = data.load_corpus(ft.data, tokenizer)
  batch = data.get_batch(corpus.train, seed=5, step=0, batch_size=8, seq_len=32)
  logits = model(batch[:, :-1])
  want = float(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean())
  fresh = math.log(tokenizer.vocab_size)  # what a freshly initialised model starts near
  assert want < fresh - 1.0
  before = runtime.evaluate(config, workdir, tasks.get("lm"), data_path=new)["val_loss"]

  ft_dir = str(root / "ft")
  out = runtime.train(ft, ft_dir, tasks.get("lm"))
  with open(os.path.join(ft_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  first = next(r for r in records if r["step"] == 1 and "train_loss" in r)
  assert abs(first["train_loss"] - want) < 1e-4
  assert out["val_loss"] < before  # continued MLE on the new data helps on the new data
  ckpt, meta = runtime.ckpt_lib.read_meta(ft_dir)
  ckpt.close()
  assert meta["config"]["model"]["d_model"] == 32  # adopted from the source
  assert json.loads(meta["tokenizer"]) == json.loads(tokenizer.to_json())


def test_speeches_and_play_split():
  text = ("ACT I\n\nSCENE I. A room.\n\nEnter ORSINO\n\nORSINO:\nIf music be the food of love,"
          " play on;\nGive me excess of it.\n\nExit\n\nFIRST OFFICER:\nOrsino, this is that "
          "Antonio.\n\nVIOLA:\nHe did me kindness, sir.\n")
  assert classify.speeches(text) == [
      "If music be the food of love, play on;\nGive me excess of it.",
      "Orsino, this is that Antonio.", "He did me kindness, sir."]
  ds = classify.genre_dataset(0.1, min_chars=80)
  assert set(ds.train.plays).isdisjoint(ds.val.plays)
  held = {p.split("/")[0] for p in ds.val.plays}
  assert held == set(ds.classes) and len(set(ds.val.plays)) == len(ds.classes)
  assert min(len(t) for t in ds.train.texts + ds.val.texts) >= 80
  idx = classify.sample_batch(ds.train.labels, seed=0, step=0, batch_size=6000, balanced=True)
  share = np.bincount(ds.train.labels[idx]) / 6000
  assert np.all(np.abs(share - 1 / len(ds.classes)) < 0.03)
  with pytest.raises(UsageError, match="unknown genre"):
    cfg = tiny_config()
    with cfg.unlocked():
      cfg.classify = {"genres": "comedies,sonnets"}
    classify.dataset_for(cfg)


def test_classifier_beats_majority_baseline_on_held_out_plays(tmp_path):
  """Comedies against histories (a subset of the six genres, to train in seconds), one play
  of each held out; the baselines are measured on those plays, not assumed."""
  config = tiny_config(**{
      "train.task": "classify", "data.tokenizer": "bpe", "data.vocab_size": 2048,
      "data.seq_len": 64, "train.num_steps": 150, "train.batch_size": 32,
      "train.learning_rate": 3e-3, "train.warmup_steps": 20, "train.eval_every": 150,
      "train.checkpoint_every": 150, "train.log_every": 50, "train.eval_batch_size": 256})
  with config.unlocked():
    config.classify = {"min_chars": 80, "balanced": True, "genres": "comedies,histories"}
  workdir = str(tmp_path / "genre")
  out = runtime.train(config, workdir, tasks.get("classify"))
  assert out["val_plays"] == 2 and out["val_examples"] > 300
  result = runtime.evaluate(config, workdir, tasks.get("classify"))  # run.py --mode=eval
  assert result["val_accuracy"] == pytest.approx(out["val_accuracy"])
  assert result["majority_class"] == "histories"
  print(result)
  assert result["val_accuracy"] > result["majority_baseline"] + 0.05
  assert result["val_accuracy"] > result["best_constant_baseline"] + 0.05


def test_init_from_a_classifier_of_other_classes_gets_a_fresh_head(tmp_path):
  """A 3-genre classifier as init_from of a 2-genre one: the trunk is the source's, the head
  (cls_head [d, 2], cls_bias [2]) fresh. Before: the source's [d, 3] head was taken, and the
  first step was a TypeError traceback (add got incompatible shapes (3,), (2,))."""
  def config(genres, **overrides):
    c = tiny_config(**{"train.task": "classify", "train.num_steps": 2, "train.warmup_steps": 0,
                       "train.eval_every": 2, "train.checkpoint_every": 2, **overrides})
    with c.unlocked():
      c.classify = {"min_chars": 80, "balanced": True, "genres": genres}
    return c
  source = str(tmp_path / "three")
  runtime.train(config("comedies,histories,tragedies"), source, tasks.get("classify"))
  job = runtime.prepare(config("comedies,histories", **{"train.init_from": source}),
                        str(tmp_path / "two"), tasks.get("classify"))
  state = runtime.start_state(job, None)
  _, src_state, _, _ = runtime.load(config("comedies,histories,tragedies"), source)
  got, want = nnx.to_pure_dict(state[0]), nnx.to_pure_dict(src_state[0])
  assert got["cls_head"].shape == (32, 2) and got["cls_bias"].shape == (2,)
  assert want["cls_head"].shape == (32, 3)
  assert not np.any(np.asarray(got["cls_bias"]))  # fresh: zeros
  np.testing.assert_array_equal(np.asarray(got["embed"]), np.asarray(want["embed"]))

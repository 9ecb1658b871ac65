"""The masked-LM task (lm/tasks/mlm.py): BERT's masking proportions and determinism, the
word-piece tokenizer, an end-to-end run that learns and resumes bit-exactly, bad input."""

import numpy as np
import pytest

from lm import tokenizers
from lm.errors import UsageError
from lm.tasks import mlm

ENCODER = {"model.arch": "encoder", "model.positions": "learned", "model.norm": "post",
           "model.mlp": "gelu_erf", "model.use_bias": True, "model.type_vocab_size": 2,
           "model.mlm_head": True, "model.attention_impl": "xla", "train.task": "mlm"}


def encoder_config(make_config, **overrides):
  return make_config(**{**ENCODER, **overrides})


def test_masking_proportions_specials_and_determinism():
  """Over many rows: 15% of the non-special tokens chosen, 80/10/10 among them, no special
  token (CLS, SEP, PAD) ever chosen, loss weights exactly on the chosen, and the same draws
  for the same generator seed. (Fails with the 80/10/10 thresholds swapped or specials not
  excluded: checked.)"""
  tok = tokenizers.CharTokenizer.train("abcdefghij", tokenizers.CHAR_SPECIALS)
  ids = tok.special_ids
  masker = mlm.Masker(tok, 0.15, False)
  rng = np.random.default_rng(0)
  normal = np.array([256 + i for i in range(10)])
  windows = normal[rng.integers(0, 10, (2000, 40))]
  windows[::3, 30:] = -1  # shorter rows: padding after [SEP]
  tokens, attention = mlm.wrap(windows, ids, 44)
  k = mlm.max_predictions(44, 0.15)
  out = masker(tokens, np.random.default_rng([7, 3, 1]), k)
  again = masker(tokens, np.random.default_rng([7, 3, 1]), k)
  for name in out:
    np.testing.assert_array_equal(out[name], again[name])
  other = masker(tokens, np.random.default_rng([7, 4, 1]), k)
  assert (other["inputs"] != out["inputs"]).any()
  rows = np.arange(len(tokens))[:, None]
  chosen = np.zeros(tokens.shape, bool)
  chosen[np.broadcast_to(rows, out["positions"].shape)[out["weights"] > 0],
         out["positions"][out["weights"] > 0]] = True
  special = np.isin(tokens, list(ids.values()))
  assert not (chosen & special).any()
  assert ((out["inputs"] != tokens) <= chosen).all()  # only chosen tokens are changed
  np.testing.assert_array_equal(out["targets"][out["weights"] > 0], tokens[chosen])
  n = (~special).sum()
  assert abs(chosen.sum() / n - 0.15) < 0.01, chosen.sum() / n
  sel = out["inputs"][chosen]
  masked = (sel == ids["[MASK]"]).mean()
  kept = (sel == tokens[chosen]).mean()  # includes random draws equal to the token (1/13)
  replaced = 1 - masked - kept
  assert abs(masked - 0.8) < 0.02 and abs(replaced - 0.1 * 12 / 13) < 0.015, (masked, replaced)
  assert not np.isin(sel[sel != ids["[MASK]"]], list(ids.values())).any()  # random: no specials
  assert attention.sum() == (tokens != ids["[PAD]"]).sum()


def test_whole_word_masking_chooses_all_pieces_of_a_word():
  text = "the kingdom of denmark is rotten, the kingdoms are everlasting " * 30
  tok = tokenizers.WordPieceTokenizer.train([text], 60)
  cont = tok.continuation()
  assert cont.any()
  ids = tok.encode("the kingdoms of denmark are everlasting rotten kingdoms")
  assert cont[ids].any()  # some words are several pieces
  tokens, _ = mlm.wrap(np.tile(ids, (500, 1)), tok.special_ids, len(ids) + 2)
  out = mlm.Masker(tok, 0.3, True)(tokens, np.random.default_rng(0), tokens.shape[1])
  chosen = np.zeros(tokens.shape, bool)
  r = np.broadcast_to(np.arange(500)[:, None], out["positions"].shape)
  chosen[r[out["weights"] > 0], out["positions"][out["weights"] > 0]] = True
  pieces = cont[tokens]
  # a continuation piece is chosen exactly when the piece before it is
  np.testing.assert_array_equal(chosen[:, 1:][pieces[:, 1:]], chosen[:, :-1][pieces[:, 1:]])
  assert 0.2 < chosen[:, 1:-1].mean() < 0.4


def test_wordpiece_tokenizer_post_processor_and_round_trip():
  tok = tokenizers.WordPieceTokenizer.train(["To be, or not to be: that is the question."] * 5, 80)
  assert tok.special_ids == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
  ids, types = tok.encode_special("to be", "or not")
  assert ids[0] == 2 and list(ids).count(3) == 2 and ids[-1] == 3
  assert list(types) == [0] * (list(ids).index(3) + 1) + [1] * (len(ids) - list(ids).index(3) - 1)
  assert 2 not in tok.encode("to be") and tok.decode(tok.encode("To be, or")) == "to be, or"
  again = tokenizers.from_json(tok.to_json())
  assert again.kind == "wordpiece" and list(again.encode("question")) == list(tok.encode("question"))
  # The same ids from every training on real text: the trainer's own numbering of the "##x"
  # alphabet varied (26 of 512 ids differed between two trainings on the plays; this fails
  # without the renumbering). A text of one line repeated still varies: equal-count merges.
  from lm import data
  texts = [t for _, t in data.play_documents()[:4]]
  jsons = {tokenizers.WordPieceTokenizer.train(texts, 512).to_json() for _ in range(4)}
  assert len(jsons) == 1


def test_mlm_loss_is_cross_entropy_of_the_chosen_tokens_only(make_config):
  """The task's loss (MLM head on the gathered positions) against numpy cross-entropy of the
  full logits model(inputs) at the chosen positions (fails if the positions and targets are
  misaligned, or unchosen tokens are scored: checked by weighting every position)."""
  import jax.numpy as jnp
  from flax import nnx
  from lm import validate
  from lm.model import build
  config, tok, corpus = mlm.TASK.load_data(encoder_config(make_config), None)
  batch = mlm.TASK.batch(corpus, config, 3)
  again, other = mlm.TASK.batch(corpus, config, 3), mlm.TASK.batch(corpus, config, 4)
  for name in batch:  # the same (seed, step): the same windows and masking
    np.testing.assert_array_equal(batch[name], again[name])
  assert (batch["inputs"] != other["inputs"]).any()
  model = build(validate.model_config(config, tok.vocab_size), nnx.Rngs(0))
  loss, metrics = mlm.TASK.loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, None)
  logits = np.asarray(model(jnp.asarray(batch["inputs"])), np.float64)  # [B, T, V]
  rows = np.arange(len(logits))[:, None]
  chosen = logits[rows, batch["positions"]]  # [B, K, V]
  logp = chosen - np.log(np.exp(chosen - chosen.max(-1, keepdims=True)).sum(-1,
                                                                         keepdims=True)) \
      - chosen.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  w = batch["weights"]
  assert 0 < w.sum() < w.size
  np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)
  acc = ((chosen.argmax(-1) == batch["targets"]) * w).sum() / w.sum()
  np.testing.assert_allclose(float(metrics["train_accuracy"]), acc, rtol=1e-6)


def test_mlm_run_resumes_bit_exactly(tmp_path, make_config):
  """20 steps in one go, and the same run stopped after its step-10 checkpoint then resumed:
  identical parameters and evaluation (masking drawn from (seed, step))."""
  import shutil
  import jax
  from flax import nnx
  from lm import runtime, tasks
  config = encoder_config(make_config, **{"train.num_steps": 20, "train.checkpoint_every": 10,
                                          "train.eval_every": 20})
  task = tasks.get("mlm")
  whole = runtime.train(config, str(tmp_path / "a"), task)
  assert whole["val_masked_tokens"] > 0 and np.isfinite(whole["val_loss"])
  want = runtime.load(config, str(tmp_path / "a"))[1]
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "20")
  resumed = runtime.train(config, str(tmp_path / "b"), task)
  assert resumed["step"] == 20 and resumed["val_loss"] == whole["val_loss"]
  got = runtime.load(config, str(tmp_path / "b"))[1]
  for (p, x), (_, y) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want)):
    np.testing.assert_array_equal(np.asarray(jax.device_get(x.get_value())),
                                  np.asarray(jax.device_get(y.get_value())), err_msg=str(p))


def test_bad_input_is_one_clear_error(make_config):
  from lm import validate
  with pytest.raises(UsageError, match="train.task='mlm' needs model.arch='encoder'"):
    validate.check_config(make_config(**{"train.task": "mlm"}))
  with pytest.raises(UsageError, match="train.task='lm' needs model.arch='decoder'"):
    validate.check_config(encoder_config(make_config, **{"train.task": "lm"}))
  with pytest.raises(UsageError, match="model.mlm_head=True"):
    validate.check_config(encoder_config(make_config, **{"model.mlm_head": False}))
  with pytest.raises(UsageError, match="model.arch='bert': expected one of decoder, encoder"):
    validate.check_config(encoder_config(make_config, **{"model.arch": "bert"}))
  config = encoder_config(make_config, **{"data.tokenizer": "byte"})
  with pytest.raises(UsageError, match="has no \\[PAD\\]/\\[CLS\\]"):
    mlm.TASK.load_data(config, None)
  with pytest.raises(UsageError, match="whole_word needs a word-piece"):
    mlm.Masker(tokenizers.CharTokenizer.train("ab", tokenizers.CHAR_SPECIALS), 0.15, True)


@pytest.mark.slow
def test_encoder_classifies_genres_from_scratch_and_from_an_mlm_checkpoint(tmp_path, make_config):
  """The genre task with the encoder: [CLS] + speech + [SEP] rows, pooled [CLS]; init_from an
  MLM run loads its encoder (same embeddings) and adds a fresh pooler and head."""
  import jax
  from flax import nnx
  from lm import runtime, tasks
  from lm.tasks import classify
  mlm_config = encoder_config(make_config, **{"train.num_steps": 2, "train.checkpoint_every": 2,
                                              "train.eval_every": 2})
  runtime.train(mlm_config, str(tmp_path / "mlm"), tasks.get("mlm"))
  over = {**ENCODER, "train.task": "classify", "model.mlm_head": False, "train.num_steps": 2,
          "train.checkpoint_every": 2, "train.eval_every": 2, "train.eval_batch_size": 64}
  for init_from in ("", str(tmp_path / "mlm")):
    config = make_config(**over, **{"train.init_from": init_from})
    with config.unlocked():
      config.classify = {"min_chars": 400, "balanced": True, "genres": "comedies,tragedies"}
    workdir = str(tmp_path / f"cls{bool(init_from)}")
    out = runtime.train(config, workdir, tasks.get("classify"))
    assert 0 <= out["val_accuracy"] <= 1 and out["val_examples"] > 10
    run, state, tok, _ = runtime.load(config, workdir)
    assert run.model_cfg.arch == "encoder" and run.model_cfg.num_classes == 2
    data = classify.TASK.eval_data(run.config, tok, None)
    ids = tok.special_ids
    assert (data.val_tokens[:, 0] == ids["[CLS]"]).all()
    rows = np.arange(len(data.val_lengths))
    assert (data.val_tokens[rows, data.val_lengths - 1] == ids["[SEP]"]).all()
  src = dict(nnx.to_flat_state(runtime.load(mlm_config, str(tmp_path / "mlm"))[1][0]))
  got = dict(nnx.to_flat_state(state[0]))
  assert ("pool_w",) not in src and ("pool_w",) in got
  # 2 steps at a small lr moved the loaded embeddings only a little from the MLM run's
  delta = np.abs(np.asarray(jax.device_get(got[("embed",)].get_value()))
                 - np.asarray(jax.device_get(src[("embed",)].get_value()))).max()
  assert delta < 0.05

"""BERT interop: Hugging Face-format checkpoints written here (random weights, the exact key
names and layouts of BertModel, BertForMaskedLM and BertForSequenceClassification) load,
match an independent numpy BERT forward with padding and two token types, round-trip
exactly, convert on the command line; bad input is one clear error."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lm import convert
from lm.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_bert(directory, kind, *, vocab=61, positions=24, d=32, layers=2, heads=4, ff=48,
               types=2, labels=3, seed=0, act="gelu", extra=()):
  """kind: "model" (BertModel: no prefix, pooler), "mlm" (BertForMaskedLM: "bert." prefix,
  cls.predictions.*, no pooler) or "cls" (BertForSequenceClassification: pooler +
  classifier). nn.Linear weights are [out, in]."""
  rng = np.random.default_rng(seed)
  r = lambda *shape, s=0.2: rng.normal(0, s, shape).astype(np.float32)
  e = "embeddings."
  t = {e + "word_embeddings.weight": r(vocab, d), e + "position_embeddings.weight": r(positions, d),
       e + "token_type_embeddings.weight": r(types, d), e + "LayerNorm.weight": 1 + r(d),
       e + "LayerNorm.bias": r(d), e + "position_ids": np.arange(positions)[None]}
  for i in range(layers):
    p = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      t[p + f"attention.self.{name}.weight"], t[p + f"attention.self.{name}.bias"] = r(d, d), r(d)
    t.update({p + "attention.output.dense.weight": r(d, d), p + "attention.output.dense.bias": r(d),
              p + "attention.output.LayerNorm.weight": 1 + r(d),
              p + "attention.output.LayerNorm.bias": r(d),
              p + "intermediate.dense.weight": r(ff, d), p + "intermediate.dense.bias": r(ff),
              p + "output.dense.weight": r(d, ff), p + "output.dense.bias": r(d),
              p + "output.LayerNorm.weight": 1 + r(d), p + "output.LayerNorm.bias": r(d)})
  if kind in ("model", "cls"):
    t.update({"pooler.dense.weight": r(d, d), "pooler.dense.bias": r(d)})
  if kind != "model":
    t = {"bert." + k: v for k, v in t.items()}
  if kind == "mlm":
    c = "cls.predictions."
    t.update({c + "transform.dense.weight": r(d, d), c + "transform.dense.bias": r(d),
              c + "transform.LayerNorm.weight": 1 + r(d), c + "transform.LayerNorm.bias": r(d),
              c + "bias": r(vocab)})
  if kind == "cls":
    t.update({"classifier.weight": r(labels, d), "classifier.bias": r(labels)})
  t.update(dict(extra))
  os.makedirs(directory, exist_ok=True)
  save_file(t, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  arch = {"model": "BertModel", "mlm": "BertForMaskedLM",
          "cls": "BertForSequenceClassification"}[kind]
  config = {"architectures": [arch], "model_type": "bert", "vocab_size": vocab,
            "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": ff, "hidden_act": act, "max_position_embeddings": positions,
            "type_vocab_size": types, "layer_norm_eps": 1e-12,
            "position_embedding_type": "absolute", "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "pad_token_id": 0}
  if kind == "cls":
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  return {k[5:] if k.startswith("bert.") else k: v for k, v in t.items()}, config


def numpy_bert(t, config, ids, mask, types):
  """BERT's forward, written from the Hugging Face modules, in float64: (sequence output,
  MLM logits or None, pooled or None, classifier logits or None). The attention mask adds
  -inf to padding keys' scores (every row has a real token)."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  eps, h = config["layer_norm_eps"], config["num_attention_heads"]
  erf = np.vectorize(math.erf)
  gelu = lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * t[p + ".weight"] + t[p + ".bias"]

  lin = lambda x, p: x @ t[p + ".weight"].T + t[p + ".bias"]
  b, n = ids.shape
  e = "embeddings."
  x = (t[e + "word_embeddings.weight"][ids] + t[e + "position_embeddings.weight"][np.arange(n)]
       + t[e + "token_type_embeddings.weight"][types])
  x = ln(x, e + "LayerNorm")
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{m}").reshape(b, n, h, -1).transpose(0, 2, 1, 3)
               for m in ("query", "key", "value"))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None, None, :] == 1, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)
    x = ln(lin(y, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
    m = gelu(lin(x, p + "intermediate.dense"))
    x = ln(lin(m, p + "output.dense") + x, p + "output.LayerNorm")
  mlm = pooled = logits = None
  if "cls.predictions.bias" in t:
    z = ln(gelu(lin(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
    mlm = z @ t[e + "word_embeddings.weight"].T + t["cls.predictions.bias"]
  if "pooler.dense.weight" in t:
    pooled = np.tanh(lin(x[:, 0], "pooler.dense"))
  if "classifier.weight" in t:
    logits = lin(pooled, "classifier")
  return x, mlm, pooled, logits


def inputs(seed, vocab, n=20):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (3, n))
  mask = (np.arange(n) < np.array([[n], [13], [5]])).astype(np.int32)
  types = ((np.arange(n) >= np.array([[8], [6], [2]])) * mask).astype(np.int32)  # A then B
  return ids, mask, types


@pytest.mark.parametrize("kind", ["model", "mlm", "cls"])
def test_outputs_match_numpy_bert(tmp_path, kind):
  seed = 21  # fixed: a failure must reproduce
  tensors, config = write_bert(str(tmp_path), kind, seed=seed)
  model = convert.from_hf(str(tmp_path))
  ids, mask, types = inputs(seed, config["vocab_size"])
  hidden, mlm, pooled, logits = numpy_bert(tensors, config, ids, mask, types)
  out = np.asarray(model(ids, attention_mask=mask, token_type_ids=types))
  if kind == "mlm":
    assert out.shape == (3, 20, 61) and mlm.std() > 0.5
    np.testing.assert_allclose(out, mlm, rtol=1e-4, atol=1e-4)
  else:
    np.testing.assert_allclose(out, hidden, rtol=1e-4, atol=1e-4)  # hidden states, pads too
  if pooled is not None:
    np.testing.assert_allclose(model.pooled(ids, mask, types), pooled, rtol=1e-4, atol=1e-5)
  if kind == "cls":
    got = np.asarray(model.classify(ids, attention_mask=mask, token_type_ids=types))
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-5)
  else:
    with pytest.raises(UsageError, match="no classification head"):
      model.classify(ids)


@pytest.mark.parametrize("kind", ["model", "mlm", "cls"])
def test_export_import_round_trip_exact(tmp_path, kind):
  seed = 22
  write_bert(str(tmp_path / "a"), kind, seed=seed, act="gelu_new")
  model = convert.from_hf(str(tmp_path / "a"))
  assert model.cfg.mlp == "gelu"
  convert.to_hf(model, str(tmp_path / "b"))
  original = load_file(str(tmp_path / "a" / "model.safetensors"))
  original = {k: v for k, v in original.items() if not k.endswith("position_ids")}
  exported = load_file(str(tmp_path / "b" / "model.safetensors"))
  assert exported.keys() == original.keys()
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  with open(tmp_path / "a" / "config.json") as f:
    a = json.load(f)
  with open(tmp_path / "b" / "config.json") as f:
    b = json.load(f)
  for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers",
              "intermediate_size", "hidden_act", "type_vocab_size", "layer_norm_eps"):
    assert a[key] == b[key], key
  ids, mask, types = inputs(seed, 61)
  again = convert.from_hf(str(tmp_path / "b"))
  np.testing.assert_array_equal(np.asarray(again(ids, mask, types)),
                                np.asarray(model(ids, mask, types)))


def test_bad_checkpoints_are_one_clear_error(tmp_path):
  write_bert(str(tmp_path / "ok"), "mlm")
  with pytest.raises(UsageError, match="no config.json"):
    convert.from_hf(str(tmp_path / "missing"))
  with open(tmp_path / "ok" / "config.json") as f:
    config = json.load(f)
  for change, match in (({"model_type": "roberta"}, "model_type='roberta'"),
                        ({"hidden_size": 40}, "shape"),
                        ({"hidden_act": "relu"}, "hidden_act='relu'"),
                        ({"position_embedding_type": "relative_key"}, "position_embedding_type")):
    d = tmp_path / str(len(os.listdir(tmp_path)))
    write_bert(str(d), "mlm")
    with open(d / "config.json", "w") as f:
      json.dump({**config, **change}, f)
    with pytest.raises(UsageError, match=match):
      convert.from_hf(str(d))
  bert = convert.from_hf(str(tmp_path / "ok"))
  with pytest.raises(UsageError, match="not GPT-2 shaped: arch='encoder'"):
    convert.to_hf(bert, str(tmp_path / "out"), model_type="gpt2")
  from flax import nnx
  from lm.config import model_config
  from lm.model import Transformer
  gpt = Transformer(model_config(vocab_size=50, num_layers=1, d_model=16, num_heads=2,
                                 max_seq_len=8, positions="learned", norm="post",
                                 mlp="gelu", use_bias=True), nnx.Rngs(0))
  with pytest.raises(UsageError, match="not bert shaped: arch='decoder'.*type_vocab_size=0"):
    convert.to_hf(gpt, str(tmp_path / "out"), model_type="bert")
  write_bert(str(tmp_path / "x"), "mlm", extra={"bert.surprise.weight": np.zeros(2, np.float32)})
  with pytest.raises(UsageError, match="unexpected tensors.*surprise"):
    convert.from_hf(str(tmp_path / "x"))
  # the command line: one error line, exit 2
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "lm.convert", f"--hf_dir={tmp_path / '1'}",
                      f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True, cwd=ROOT,
                     env=env, timeout=300)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_bad_tensors_and_config_values_are_one_clear_error(tmp_path):
  """A tensor with NaN, an integer tensor where a weight belongs, a config.json without a
  size, an ill-typed or out-of-range value: one UsageError naming it. Before (checked): the
  three tensors converted (NaN outputs; integer bits read as weights), a string layer_norm_eps
  was a TypeError, a negative one converted (NaN for small variances), a missing size a
  KeyError."""
  bad = np.full((32, 32), 0.1, np.float32)
  bad[3, 5] = np.nan
  for extra, match in (({"bert.encoder.layer.1.output.dense.weight": np.zeros((32, 48))
                         + np.inf}, "layer.1.output.dense.weight: holds non-finite"),
                       ({"bert.encoder.layer.0.attention.self.key.weight": bad},
                        "layer.0.attention.self.key.weight: holds non-finite"),
                       ({"cls.predictions.bias": np.zeros(61, np.int32)},
                        "cls.predictions.bias: dtype int32, expected a float")):
    d = tmp_path / str(len(os.listdir(tmp_path)))
    write_bert(str(d), "mlm", extra=extra)
    with pytest.raises(UsageError, match=match):
      convert.from_hf(str(d))
  write_bert(str(tmp_path / "ok"), "mlm")
  with open(tmp_path / "ok" / "config.json") as f:
    config = json.load(f)
  for change, match in ((dict(layer_norm_eps="x"), "model.ln_eps='x': expected a number"),
                        (dict(layer_norm_eps=-1), "model.ln_eps=-1: expected a number > 0"),
                        (dict(max_position_embeddings=None), "model.max_seq_len=None"),
                        (dict(hidden_size=None), "lacks 'hidden_size'")):
    d = tmp_path / str(len(os.listdir(tmp_path)))
    write_bert(str(d), "mlm")
    with open(d / "config.json", "w") as f:
      json.dump({k: v for k, v in {**config, **change}.items() if v is not None}
                if "lacks" in match else {**config, **change}, f)
    with pytest.raises(UsageError, match=match):
      convert.from_hf(str(d))
  # BERT's own vocabulary file is named (before: GPT-2's vocab.json + merges.txt)
  with pytest.raises(UsageError, match=r"no tokenizer.json \(nor vocab.txt\)"):
    convert.hf_to_workdir(str(tmp_path / "ok"), str(tmp_path / "run"))


def test_cli_converts_a_bert_with_its_vocab_into_a_run_directory(tmp_path, make_config):
  """python -m lm.convert on a BertForMaskedLM with vocab.txt: the run directory's model gives
  the same MLM logits as from_hf, its tokenizer has BERT's specials and post-processor, and
  --export writes the same tensors back."""
  from lm import runtime
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(56)]
  write_bert(str(tmp_path / "hf"), "mlm", seed=5)
  (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  workdir = str(tmp_path / "run")
  r = subprocess.run([sys.executable, "-m", "lm.convert", f"--hf_dir={tmp_path / 'hf'}",
                      f"--workdir={workdir}"], capture_output=True, text=True, cwd=ROOT, env=env,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  config = make_config()
  run, state, tok, _ = runtime.load(config, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["task"] == "mlm"  # what --mode=eval of it evaluates
  assert run.model_cfg.arch == "encoder" and run.model_cfg.mlm_head
  assert tok.kind == "wordpiece" and tok.special_ids["[MASK]"] == 4
  from lm import sample
  with pytest.raises(UsageError, match="holds an encoder"):
    sample.sample_workdir(config, workdir, num_samples=1)
  ids, types = tok.encode_special("w3 w7", "w9")
  assert list(ids) == [2, 8, 12, 3, 14, 3] and list(types) == [0, 0, 0, 0, 1, 1]
  from flax import nnx
  ours = nnx.merge(run.graphdef, state)[0]
  ids, mask, types = inputs(5, 61)
  np.testing.assert_allclose(np.asarray(ours(ids, mask, types)),
                             np.asarray(convert.from_hf(str(tmp_path / "hf"))(ids, mask, types)),
                             rtol=1e-6, atol=1e-6)
  r = subprocess.run([sys.executable, "-m", "lm.convert", "--export", f"--workdir={workdir}",
                      f"--hf_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=ROOT,
                     env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  exported = load_file(str(tmp_path / "out" / "model.safetensors"))
  original = load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert exported.keys() == {k for k in original if not k.endswith("position_ids")}
  for name in exported:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  assert os.path.isfile(tmp_path / "out" / "tokenizer.json")

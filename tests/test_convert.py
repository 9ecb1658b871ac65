"""GPT-2 interop: a Hugging Face-format checkpoint written here (random weights, exact key
names and layouts) loads, matches an independent numpy GPT-2 forward, round-trips exactly,
and its converted run directory samples, evaluates and fine-tunes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lm import convert
from lm.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_gpt2(directory, *, vocab=97, n_positions=40, d=32, layers=2, heads=4, seed=0,
               prefix="transformer.", with_buffers=False, tie=True):
  """A GPT-2 checkpoint as Hugging Face lays it out: Conv1D weights [in, out], fused c_attn."""
  rng = np.random.default_rng(seed)
  r = lambda *shape, s=0.2: rng.normal(0, s, shape).astype(np.float32)
  t = {"wte.weight": r(vocab, d), "wpe.weight": r(n_positions, d),
       "ln_f.weight": 1 + r(d), "ln_f.bias": r(d)}
  for i in range(layers):
    p = f"h.{i}."
    t.update({p + "ln_1.weight": 1 + r(d), p + "ln_1.bias": r(d),
              p + "attn.c_attn.weight": r(d, 3 * d), p + "attn.c_attn.bias": r(3 * d),
              p + "attn.c_proj.weight": r(d, d), p + "attn.c_proj.bias": r(d),
              p + "ln_2.weight": 1 + r(d), p + "ln_2.bias": r(d),
              p + "mlp.c_fc.weight": r(d, 4 * d), p + "mlp.c_fc.bias": r(4 * d),
              p + "mlp.c_proj.weight": r(4 * d, d), p + "mlp.c_proj.bias": r(d)})
    if with_buffers:  # the causal-mask buffers of older checkpoints
      t[p + "attn.bias"] = np.tril(np.ones((1, 1, n_positions, n_positions), np.float32))
  t = {prefix + k: v for k, v in t.items()}
  if not tie:
    t["lm_head.weight"] = r(vocab, d)
  os.makedirs(directory, exist_ok=True)
  save_file(t, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
            "n_positions": n_positions, "n_ctx": n_positions, "n_embd": d, "n_layer": layers,
            "n_head": heads, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
            "attn_pdrop": 0.1, "scale_attn_weights": True, "tie_word_embeddings": tie}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in t.items()}, config


def numpy_gpt2(t, config, ids):
  """GPT-2's forward pass, written from the Hugging Face modules, in float64."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  eps, h = config["layer_norm_epsilon"], config["n_head"]

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * t[p + ".weight"] + t[p + ".bias"]

  def gelu_new(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  b, n = ids.shape
  x = t["wte.weight"][ids] + t["wpe.weight"][np.arange(n)]
  causal = np.tril(np.ones((n, n), bool))
  for i in range(config["n_layer"]):
    p = f"h.{i}."
    qkv = ln(x, p + "ln_1") @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
    q, k, v = (z.reshape(b, n, h, -1).transpose(0, 2, 1, 3) for z in np.split(qkv, 3, -1))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)
    x = x + y @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
    m = gelu_new(ln(x, p + "ln_2") @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
    x = x + m @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
  x = ln(x, "ln_f")
  head = t["lm_head.weight"] if "lm_head.weight" in t else t["wte.weight"]
  return x @ head.T


@pytest.mark.parametrize("layout", [
    dict(prefix="transformer."),  # GPT2LMHeadModel.save_pretrained
    dict(prefix="", with_buffers=True, tie=False),  # Hub-style names, mask buffers, own head
])
def test_logits_match_numpy_gpt2(tmp_path, layout):
  seed = 11  # fixed: a failure must reproduce
  tensors, config = write_gpt2(str(tmp_path), seed=seed, **layout)
  model = convert.from_hf_gpt2(str(tmp_path))
  ids = np.random.default_rng(seed).integers(0, config["vocab_size"], (3, 40))
  logits = np.asarray(model(ids))
  assert logits.shape == (3, 40, config["vocab_size"])
  want = numpy_gpt2(tensors, config, ids)
  assert want.std() > 1.0
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_export_import_round_trip_exact(tmp_path):
  seed = 12  # fixed: a failure must reproduce
  tensors, _ = write_gpt2(str(tmp_path / "a"), seed=seed)
  model = convert.from_hf_gpt2(str(tmp_path / "a"))
  convert.to_hf_gpt2(model, str(tmp_path / "b"))
  exported = load_file(str(tmp_path / "b" / "model.safetensors"))
  original = load_file(str(tmp_path / "a" / "model.safetensors"))
  assert exported.keys() == original.keys()
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  again = convert.from_hf_gpt2(str(tmp_path / "b"))
  ids = np.random.default_rng(seed).integers(0, 97, (2, 16))
  np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))
  with open(tmp_path / "b" / "config.json") as f:
    hf = json.load(f)
  assert (hf["n_embd"], hf["n_layer"], hf["n_head"], hf["vocab_size"]) == (32, 2, 4, 97)


def test_rejects_what_it_cannot_express(tmp_path):
  write_gpt2(str(tmp_path))
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**config, "activation_function": "relu"}, f)
  with pytest.raises(UsageError, match="activation_function"):
    convert.from_hf_gpt2(str(tmp_path))
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**config, "n_embd": 48}, f)
  with pytest.raises(UsageError, match="shape"):
    convert.from_hf_gpt2(str(tmp_path))
  with pytest.raises(UsageError, match="no config.json"):
    convert.from_hf_gpt2(str(tmp_path / "missing"))
  from lm.model import ModelConfig, Transformer
  from flax import nnx
  rope = Transformer(ModelConfig(vocab_size=50, num_layers=1, d_model=16, num_heads=2,
                                 max_seq_len=8), nnx.Rngs(0))
  with pytest.raises(UsageError, match="not GPT-2 shaped"):
    convert.to_hf_gpt2(rope, str(tmp_path / "out"))


def test_cli_converted_workdir_samples_evaluates_and_fine_tunes(tmp_path, make_config):
  """python -m lm.convert, then run.py --mode=sample, eval and init_from on the result."""
  from lm import evaluate, tokenizers, train
  text = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to "
          "suffer\nThe slings and arrows of outrageous fortune,\n") * 40
  tok = tokenizers.BPETokenizer.train([text], 300)
  hf_dir = tmp_path / "hf"
  write_gpt2(str(hf_dir), vocab=tok.vocab_size, n_positions=40)
  tokenizers.save(tok, str(hf_dir))
  data = tmp_path / "data.txt"
  data.write_text(text)
  workdir = str(tmp_path / "converted")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "lm.convert", f"--hf_dir={hf_dir}",
                      f"--workdir={workdir}"], capture_output=True, text=True, cwd=ROOT, env=env,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  r = subprocess.run([sys.executable, "-m", "lm.convert", f"--hf_dir={hf_dir}",
                      f"--workdir={workdir}"], capture_output=True, text=True, cwd=ROOT, env=env,
                     timeout=300)
  assert r.returncode == 2 and r.stderr.startswith("error: ") and "already" in r.stderr
  r = subprocess.run([sys.executable, "experiments/run.py", "--config=experiments/base.py",
                      f"--workdir={workdir}", "--mode=sample", "--prompt=To be", "--top_k=5",
                      "--temperature=0.7", "--max_new_tokens=8", "--num_samples=2"],
                     capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.count("--- sample ---\nTo be") == 2
  # Sampling in Python from the converted directory agrees with the HF weights' greedy choice.
  model = convert.from_hf_gpt2(str(hf_dir))
  prompt = tok.encode("To be, or")
  greedy = evaluate.sample_workdir(make_config(), workdir, prompt="To be, or", temperature=0.0,
                                   max_new_tokens=5, num_samples=1, top_k=0)[0]
  ids = list(prompt)
  for _ in range(5):
    ids.append(int(np.argmax(np.asarray(model(np.asarray([ids])))[0, -1])))
  assert greedy == "To be, or" + tok.decode(ids[len(prompt):])
  # Evaluation on a text file, and fine-tuning that starts at the converted weights' loss.
  config = make_config(**{"data.path": str(data), "data.seq_len": 16})
  result = evaluate.evaluate_workdir(config, workdir)
  config = make_config(**{"data.path": str(data), "data.seq_len": 16, "train.num_steps": 1,
                          "train.warmup_steps": 0,
                          "train.log_every": 1, "train.init_from": workdir,
                          "train.learning_rate": 1e-12})  # > 0 (validated), moves nothing
  out = train.train(config, str(tmp_path / "ft"))
  assert abs(out["val_loss"] - result["val_loss"]) < 1e-4 * max(1.0, result["val_loss"])

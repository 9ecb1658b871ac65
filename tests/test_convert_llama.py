"""Llama-family interop (llama, mistral, qwen2): checkpoints written here with random weights in
Hugging Face's exact names and layouts (nn.Linear [out, in], "model." prefix, sharded with an
index, bf16) load, match an independent numpy float64 Llama forward, round-trip exactly,
decode greedily with the KV cache as full forwards do, and bad input is one clear error."""

import json
import math
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lm import convert
from lm.errors import UsageError

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def write_llama(directory, kind="llama", *, vocab=61, d=32, layers=2, heads=4, kv_heads=2,
                ff=48, context=64, tie=False, dtype=np.float32, shards=1, seed=0, **extra):
  """A {kind}ForCausalLM checkpoint as save_pretrained writes it; returns (tensors, config)
  with the tensors as stored (float64 views of the stored values, names without "model.")."""
  rng = np.random.default_rng(seed)
  r = lambda *shape, s=0.2: rng.normal(0, s, shape)
  hd = d // heads
  t = {"model.embed_tokens.weight": r(vocab, d), "model.norm.weight": 1 + r(d)}
  for i in range(layers):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": 1 + r(d),
              p + "post_attention_layernorm.weight": 1 + r(d),
              p + "self_attn.q_proj.weight": r(heads * hd, d),
              p + "self_attn.k_proj.weight": r(kv_heads * hd, d),
              p + "self_attn.v_proj.weight": r(kv_heads * hd, d),
              p + "self_attn.o_proj.weight": r(d, heads * hd),
              p + "mlp.gate_proj.weight": r(ff, d), p + "mlp.up_proj.weight": r(ff, d),
              p + "mlp.down_proj.weight": r(d, ff)})
    if kind == "qwen2":  # q/k/v biases, none on o_proj
      t.update({p + "self_attn.q_proj.bias": r(heads * hd), p + "self_attn.k_proj.bias":
                r(kv_heads * hd), p + "self_attn.v_proj.bias": r(kv_heads * hd)})
  if not tie:
    t["lm_head.weight"] = r(vocab, d)
  t = {k: v.astype(dtype) for k, v in t.items()}
  os.makedirs(directory, exist_ok=True)
  if shards == 1:
    save_file(t, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  else:
    names, weight_map = sorted(t), {}
    for s in range(shards):
      shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      part = {n: t[n] for n in names[s::shards]}
      save_file(part, os.path.join(directory, shard), metadata={"format": "pt"})
      weight_map.update({n: shard for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  config = {"architectures": [f"{kind.capitalize()}ForCausalLM"], "model_type": kind,
            "vocab_size": vocab, "hidden_size": d, "intermediate_size": ff,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "hidden_act": "silu",
            "max_position_embeddings": context, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_scaling": None, "tie_word_embeddings": tie,
            "torch_dtype": "bfloat16" if dtype is ml_dtypes.bfloat16 else "float32", **extra}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  return {k.removeprefix("model."): v.astype(np.float64) for k, v in t.items()}, config


def inv_freq(config, hd):
  """HF's rotary inverse frequencies, with rope_scaling of type llama3 applied per band."""
  freq = 1.0 / config["rope_theta"] ** (np.arange(0, hd, 2) / hd)
  sc = config.get("rope_scaling")
  if not sc:
    return freq
  old, lo, hi, factor = (sc["original_max_position_embeddings"], sc["low_freq_factor"],
                         sc["high_freq_factor"], sc["factor"])
  out = []
  for f in freq:
    wavelen = 2 * math.pi / f
    if wavelen < old / hi:
      out.append(f)
    elif wavelen > old / lo:
      out.append(f / factor)
    else:
      smooth = (old / wavelen - lo) / (hi - lo)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.array(out)


def numpy_llama(t, config, ids):
  """LlamaForCausalLM's forward in float64: RMSNorm, rotate-half RoPE, GQA (query head i reads
  K/V head i // (heads / kv_heads)), SwiGLU, q/k/v biases when present; Mistral's sliding
  window (a query sees the keys less than sliding_window positions back, itself included)."""
  b, n = ids.shape
  h, kvh = config["num_attention_heads"], config["num_key_value_heads"]
  hd = config["hidden_size"] // h
  eps = config["rms_norm_eps"]
  rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
  angle = np.arange(n)[:, None] * inv_freq(config, hd)[None]  # [n, hd/2]
  cos, sin = np.cos(np.concatenate([angle] * 2, -1)), np.sin(np.concatenate([angle] * 2, -1))
  rotate_half = lambda x: np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
  causal = np.tril(np.ones((n, n), bool))
  window = config.get("sliding_window") if config["model_type"] == "mistral" else None
  if window:
    causal &= np.arange(n)[:, None] - np.arange(n)[None, :] < window
  x = t["embed_tokens.weight"][ids]
  for i in range(config["num_hidden_layers"]):
    p = f"layers.{i}."
    y = rms(x, t[p + "input_layernorm.weight"])

    def proj(name, heads):
      z = y @ t[p + f"self_attn.{name}_proj.weight"].T
      z = z + t.get(p + f"self_attn.{name}_proj.bias", 0.0)
      return z.reshape(b, n, heads, hd).transpose(0, 2, 1, 3)  # [b, heads, n, hd]

    q, k, v = proj("q", h), proj("k", kvh), proj("v", kvh)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, h // kvh, axis=1), np.repeat(v, h // kvh, axis=1)
    s = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + (a @ v).transpose(0, 2, 1, 3).reshape(b, n, -1) @ t[p + "self_attn.o_proj.weight"].T
    y = rms(x, t[p + "post_attention_layernorm.weight"])
    gate, up = y @ t[p + "mlp.gate_proj.weight"].T, y @ t[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
  x = rms(x, t["norm.weight"])
  return x @ t.get("lm_head.weight", t["embed_tokens.weight"]).T


CASES = {
    # GQA 4/2, untied head, llama3 rope scaling over all three bands, fp32, one file.
    "llama": dict(kind="llama", rope_scaling=LLAMA3),
    # q/k/v biases, tied head, bf16, sharded with an index, transformers-5 rope_parameters.
    "qwen2": dict(kind="qwen2", tie=True, dtype=ml_dtypes.bfloat16, shards=3,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                  use_sliding_window=False, sliding_window=8),
    # multi-query attention, sliding window longer than the context (no window).
    "mistral": dict(kind="mistral", kv_heads=1, sliding_window=4096),
    # a sliding window of 16 over a context of 64 (the test's 48 tokens slide).
    "mistral_window": dict(kind="mistral", sliding_window=16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_numpy_llama(tmp_path, case):
  """Fails on the old code (GPT-2 only). Checked once each: interleaved RoPE pairs, ignoring
  the llama3 scaling, or ignoring rope_parameters' theta make it fail (rel. err 0.5-0.8)."""
  seed = 21  # fixed: a failure must reproduce
  kw = dict(CASES[case])
  tensors, config = write_llama(str(tmp_path), seed=seed, **kw)
  if "rope_parameters" in config:  # the numpy forward reads the transformers-4 names
    config = {**config, "rope_theta": config["rope_parameters"]["rope_theta"]}
  model = convert.from_hf(str(tmp_path))
  ids = np.random.default_rng(seed).integers(0, config["vocab_size"], (2, 48))
  logits = np.asarray(model(ids))
  want = numpy_llama(tensors, config, ids)
  assert want.std() > 1.0
  assert np.linalg.norm(logits - want) / np.linalg.norm(want) <= 1e-5
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["llama", "qwen2", "mistral_window"])
def test_export_import_round_trip_exact(tmp_path, case):
  kw = dict(CASES[case], shards=1)
  tensors, config = write_llama(str(tmp_path / "a"), seed=22, **kw)
  model = convert.from_hf(str(tmp_path / "a"))
  # Inferred from the shape: llama, or qwen2 with q/k/v biases; mistral is named.
  convert.to_hf(model, str(tmp_path / "b"), model_type="mistral" if "mistral" in case else None)
  exported = load_file(str(tmp_path / "b" / "model.safetensors"))
  assert {k.removeprefix("model.") for k in exported} == set(tensors)
  for name, value in exported.items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, tensors[name.removeprefix("model.")], err_msg=name)
  with open(tmp_path / "b" / "config.json") as f:
    hf = json.load(f)
  assert hf["model_type"] == config["model_type"]
  assert hf["num_key_value_heads"] == config["num_key_value_heads"]
  window = config.get("sliding_window") if config["model_type"] == "mistral" else None
  assert hf.get("sliding_window") == window  # qwen2's is off (use_sliding_window False)
  again = convert.from_hf(str(tmp_path / "b"))
  assert again.cfg == model.cfg
  ids = np.random.default_rng(22).integers(0, config["vocab_size"], (2, 16))
  np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_greedy_decoding_with_cache_equals_full_forwards(tmp_path):
  from lm import sample
  from tests.test_generate import greedy_without_cache
  write_llama(str(tmp_path), seed=23, rope_scaling=LLAMA3)
  model = convert.from_hf(str(tmp_path))
  prompts = [[3, 14, 15, 9, 26], [5, 35]]  # left-padded to one batch: positions must restart
  got = sample.generate(model, prompts, max_new_tokens=12, temperature=0.0)
  for prompt, (seq,) in zip(prompts, got):
    np.testing.assert_array_equal(seq, greedy_without_cache(model, prompt, 12))


def test_sliding_window_shorter_than_context(tmp_path):
  """Mistral's window is model.attention_window over the whole context (its logits against
  the windowed numpy forward: test_logits_match_numpy_llama's mistral_window case, which fails
  with the window clipping the context as before); Qwen2's, on some layers only, clips it."""
  write_llama(str(tmp_path / "m"), kind="mistral", context=64, sliding_window=16)
  cfg = convert.from_hf(str(tmp_path / "m")).cfg
  assert (cfg.max_seq_len, cfg.attention_window) == (64, 16)
  write_llama(str(tmp_path / "q"), kind="qwen2", context=64, sliding_window=16,
              use_sliding_window=True, max_window_layers=1)
  cfg = convert.from_hf(str(tmp_path / "q")).cfg
  assert (cfg.max_seq_len, cfg.attention_window) == (16, 0)


def _edit_config(directory, **changes):
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({**config, **changes}, f)


def _cli_error(capsys, hf_dir, workdir):
  assert convert.main([f"--hf_dir={hf_dir}", f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert not os.path.exists(workdir)  # nothing written
  return err


def test_bad_input_is_one_clear_error(tmp_path, capsys):
  hf = str(tmp_path / "hf")
  write_llama(hf, shards=2)
  _edit_config(hf, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  assert "'yarn' is not supported" in _cli_error(capsys, hf, str(tmp_path / "w"))
  _edit_config(hf, rope_scaling=None, num_key_value_heads=4)  # k_proj is [16, 32]
  err = _cli_error(capsys, hf, str(tmp_path / "w"))
  assert "self_attn.k_proj.weight: shape (16, 32), expected (32, 32)" in err
  _edit_config(hf, num_key_value_heads=2)
  os.remove(os.path.join(hf, "model-00002-of-00002.safetensors"))
  err = _cli_error(capsys, hf, str(tmp_path / "w"))
  assert "names model-00002-of-00002.safetensors, which is missing" in err
  with pytest.raises(UsageError, match="partial_rotary_factor"):
    write_llama(hf, partial_rotary_factor=0.5)
    convert.from_hf(hf)
  with pytest.raises(UsageError, match="model_type='gemma'"):
    write_llama(hf, kind="gemma")
    convert.from_hf(hf)
  # A config.json that is not JSON, or whose sizes are strings (before: JSONDecodeError and
  # TypeError tracebacks, found by a new-user review).
  write_llama(hf)
  _edit_config(hf, hidden_size="32")
  assert "hidden_size='32' is not an integer" in _cli_error(capsys, hf, str(tmp_path / "w"))
  with open(os.path.join(hf, "config.json"), "w") as f:
    f.write("{bad")
  assert "config.json: not valid JSON" in _cli_error(capsys, hf, str(tmp_path / "w"))


@pytest.mark.slow
def test_converted_workdir_evaluates_samples_and_fine_tunes(tmp_path, make_config):
  """hf_to_workdir on a bf16 Llama (llama3 rope, rms eps 1e-5: numeric fields the base config
  does not share), then eval, greedy sampling, init_from and export in process. Checked: with
  runtime.load taking only the shape fields from the checkpoint, the greedy sample differs."""
  from lm import runtime, sample, tasks, tokenizers
  text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 30
  tok = tokenizers.BPETokenizer.train([text], 300)
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "converted")
  tensors, _ = write_llama(hf_dir, vocab=tok.vocab_size, dtype=ml_dtypes.bfloat16,
                           rope_scaling=LLAMA3)
  tokenizers.save(tok, hf_dir)
  data = tmp_path / "data.txt"
  data.write_text(text)
  convert.hf_to_workdir(hf_dir, workdir)
  model = convert.from_hf(hf_dir)
  prompt = tok.encode("Now is the")
  greedy = sample.sample_workdir(make_config(), workdir, prompt="Now is the", temperature=0.0,
                                 max_new_tokens=5, num_samples=1, top_k=0)[0]
  ids = list(prompt)
  for _ in range(5):
    ids.append(int(np.argmax(np.asarray(model(np.asarray([ids])))[0, -1])))
  assert greedy == "Now is the" + tok.decode(ids[len(prompt):])
  config = make_config(**{"data.path": str(data), "data.seq_len": 16})
  result = runtime.evaluate(config, workdir, tasks.get("lm"))
  config = make_config(**{"data.path": str(data), "data.seq_len": 16, "train.num_steps": 1,
                          "train.warmup_steps": 0, "train.log_every": 1, "train.init_from": workdir,
                          "train.learning_rate": 1e-12})  # > 0 (validated); moves nothing
  out = runtime.train(config, str(tmp_path / "ft"), tasks.get("lm"))
  assert abs(out["val_loss"] - result["val_loss"]) < 1e-4 * max(1.0, result["val_loss"])
  convert.workdir_to_hf(str(tmp_path / "ft"), str(tmp_path / "out"))
  exported = load_file(str(tmp_path / "out" / "model.safetensors"))
  for name, value in exported.items():  # lr 1e-12: the bf16 weights, in fp32
    np.testing.assert_allclose(value, tensors[name.removeprefix("model.")], rtol=1e-6,
                               atol=1e-9, err_msg=name)


def test_checkpoints_from_before_the_llama_fields_still_resume(make_config):
  """A checkpoint's config written before norm_type, qkv_bias and rope_scaling existed means
  LayerNorm, no q/k/v-only biases, no scaling (without lm.model.LEGACY_DEFAULTS: "has
  model.norm_type=None but the config says 'layernorm'")."""
  from lm import runtime
  config = make_config()
  saved = config.to_dict()
  for field in ("norm_type", "qkv_bias", "rope_scaling"):
    del saved["model"][field]
  runtime.check_resumable(saved, config)
  config.model.norm_type = "rmsnorm"
  with pytest.raises(UsageError, match="model.norm_type='layernorm' but the config says 'rms"):
    runtime.check_resumable(saved, config)

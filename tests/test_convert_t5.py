"""T5 interop: Hugging Face-format T5ForConditionalGeneration checkpoints written here (random
weights under the exact key names and [out, in] layouts of modeling_t5.py, v1.0 tied/ReLU and
v1.1 untied/gated-GELU, num_decoder_layers != num_layers, d_kv != d_model / num_heads) load
and match an independent numpy T5 forward with encoder padding, round-trip exactly, convert into
a run directory with a sentencepiece-unigram tokenizer.json; bad input is one clear error."""

import json
import math
import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lm import convert, tokenizers
from lm.errors import UsageError

VOCAB = 50
# Every row has a real token; row 1 and 2 end in padding (ids there are arbitrary).
LENGTHS = (15, 9, 4)

forward = nnx.jit(lambda model, ids, dec, mask: model(ids, dec, mask))


def write_t5(directory, version, *, d=24, d_kv=5, heads=3, ff=40, layers=2, dec_layers=3,
             buckets=10, max_distance=12, eps=None, seed=0, copies=True, change=None):
  """A T5ForConditionalGeneration directory (config.json, model.safetensors); returns (tensors,
  config). version "1.0": ReLU (DenseReluDense.wi), head tied to shared.weight (config without
  tie_word_embeddings: its default, True, as t5-small's); "1.1": gated-GELU (wi_0, wi_1),
  lm_head.weight. copies: also save encoder/decoder.embed_tokens (older save_pretrained).
  change(tensors, config) edits both before they are written."""
  rng = np.random.default_rng(seed)
  r = lambda *shape, s=0.2: rng.normal(0, s, shape).astype(np.float32)
  gated = version == "1.1"
  t = {"shared.weight": r(VOCAB, d, s=1.0)}
  if copies:
    t["encoder.embed_tokens.weight"] = t["decoder.embed_tokens.weight"] = t["shared.weight"]
  for side, n in (("encoder", layers), ("decoder", dec_layers)):
    t[f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = r(buckets, heads,
                                                                                s=1.0)
    for i in range(n):
      p = f"{side}.block.{i}.layer."
      attention = [("0.", "SelfAttention.")]
      if side == "decoder":
        attention.append(("1.", "EncDecAttention."))
      for layer, name in attention:
        t[p + layer + "layer_norm.weight"] = 1 + r(d)
        for w in "qkv":
          t[p + layer + name + w + ".weight"] = r(heads * d_kv, d)
        t[p + layer + name + "o.weight"] = r(d, heads * d_kv)
      ff_layer = p + ("2." if side == "decoder" else "1.")
      t[ff_layer + "layer_norm.weight"] = 1 + r(d)
      m = ff_layer + "DenseReluDense."
      if gated:
        t[m + "wi_0.weight"], t[m + "wi_1.weight"] = r(ff, d), r(ff, d)
      else:
        t[m + "wi.weight"] = r(ff, d)
      t[m + "wo.weight"] = r(d, ff)
    t[side + ".final_layer_norm.weight"] = 1 + r(d)
  config = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
            "vocab_size": VOCAB, "d_model": d, "d_kv": d_kv, "d_ff": ff, "num_layers": layers,
            "num_decoder_layers": dec_layers, "num_heads": heads,
            "relative_attention_num_buckets": buckets,
            "relative_attention_max_distance": max_distance, "dropout_rate": 0.1,
            "feed_forward_proj": "gated-gelu" if gated else "relu", "is_encoder_decoder": True,
            "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
            "n_positions": 512, "initializer_factor": 1.0}
  if eps is not None:
    config["layer_norm_epsilon"] = eps
  if gated:
    t["lm_head.weight"] = r(VOCAB, d)
    config["tie_word_embeddings"] = False
  if change:
    change(t, config)
  os.makedirs(directory, exist_ok=True)
  save_file(t, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  return t, config


def bucket(rel, bidirectional, num_buckets, max_distance):
  """T5's bucket of one relative position (key - query), from the paper's description (Raffel
  et al. 2020, 2.1; Mesh TensorFlow): half the buckets (per direction when bidirectional) are
  exact distances, the rest logarithmic up to max_distance, then the last bucket; a causal
  stack maps every future key (rel > 0) to distance 0."""
  offset = 0
  if bidirectional:
    num_buckets //= 2
    offset = num_buckets if rel > 0 else 0
    distance = abs(rel)
  else:
    distance = max(-rel, 0)
  exact = num_buckets // 2
  if distance < exact:
    return offset + distance
  steps = math.log(distance / exact) / math.log(max_distance / exact) * (num_buckets - exact)
  return offset + min(exact + int(steps), num_buckets - 1)


def numpy_t5(t, config, ids, mask, dec):
  """T5ForConditionalGeneration's logits [B, T, V], float64, written from modeling_t5.py's
  modules: RMSNorm without mean (T5LayerNorm), no 1/sqrt(d) on the scores, the relative bias of
  block 0 in every layer of a stack, the encoder mask on encoder keys (self- and
  cross-attention), a causal decoder, ReLU or gated gelu_new, the tied rescale."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  h, dkv = config["num_heads"], config["d_kv"]
  eps = config.get("layer_norm_epsilon", 1e-6)
  buckets, max_distance = (config["relative_attention_num_buckets"],
                           config["relative_attention_max_distance"])
  gated = config["feed_forward_proj"] == "gated-gelu"

  def norm(x, name):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * t[name + "layer_norm.weight"]

  lin = lambda x, name: x @ t[name + ".weight"].T
  heads = lambda x: x.reshape(*x.shape[:2], h, dkv).transpose(0, 2, 1, 3)

  def attention(x, kv, p, bias, visible):
    q, k, v = heads(lin(x, p + "q")), heads(lin(kv, p + "k")), heads(lin(kv, p + "v"))
    s = np.where(visible, q @ k.transpose(0, 1, 3, 2) + bias, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return lin((a @ v).transpose(0, 2, 1, 3).reshape(*x.shape[:2], h * dkv), p + "o")

  def position_bias(side, n, bidirectional):
    table = t[f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    b = np.array([[bucket(j - i, bidirectional, buckets, max_distance) for j in range(n)]
                  for i in range(n)])
    return table[b].transpose(2, 0, 1)[None]  # [1, H, n, n]

  def feed_forward(x, p):
    if gated:
      g = lin(x, p + "wi_0")
      gelu_new = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
      return lin(gelu_new * lin(x, p + "wi_1"), p + "wo")
    return lin(np.maximum(lin(x, p + "wi"), 0), p + "wo")

  real = (mask == 1)[:, None, None, :]  # encoder keys
  x = t["shared.weight"][ids]
  bias = position_bias("encoder", ids.shape[1], True)
  for i in range(config["num_layers"]):
    p = f"encoder.block.{i}.layer."
    y = norm(x, p + "0.")
    x = x + attention(y, y, p + "0.SelfAttention.", bias, real)
    x = x + feed_forward(norm(x, p + "1."), p + "1.DenseReluDense.")
  enc = norm(x, "encoder.final_")
  x = t["shared.weight"][dec]
  n = dec.shape[1]
  bias = position_bias("decoder", n, False)
  causal = np.tril(np.ones((n, n), bool))
  for i in range(config["num_decoder_layers"]):
    p = f"decoder.block.{i}.layer."
    y = norm(x, p + "0.")
    x = x + attention(y, y, p + "0.SelfAttention.", bias, causal)
    x = x + attention(norm(x, p + "1."), enc, p + "1.EncDecAttention.", 0.0, real)
    x = x + feed_forward(norm(x, p + "2."), p + "2.DenseReluDense.")
  x = norm(x, "decoder.final_")
  if config.get("tie_word_embeddings", True):
    return (x * config["d_model"] ** -0.5) @ t["shared.weight"].T
  return x @ t["lm_head.weight"].T


def inputs(seed, s=15, n=13):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, VOCAB, (3, s))
  mask = (np.arange(s) < np.array(LENGTHS)[:, None]).astype(np.int32)
  dec = rng.integers(2, VOCAB, (3, n))
  dec[:, 0] = 0  # decoder_start_token_id
  return ids, mask, dec


def test_relative_buckets_reach_the_far_bucket():
  """The inputs below (15 encoder, 13 decoder tokens) span the exact, the logarithmic and the
  capped (beyond max_distance) buckets both ways, so the logits test exercises all of them
  (bidirectionally, bucket 5 would be a later key at distance 0: none)."""
  bi = {bucket(r, True, 10, 12) for r in range(-14, 15)}
  causal = {bucket(r, False, 10, 12) for r in range(-12, 13)}
  assert bi == set(range(10)) - {5} and causal == set(range(10))


@pytest.mark.parametrize("version,eps", [("1.0", None), ("1.1", 0.05)])
def test_logits_match_numpy_t5(tmp_path, version, eps):
  """from_hf's model(input_ids, decoder_input_ids, attention_mask) equals the numpy T5.
  Checked to fail: with the tied rescale left out (model.logits), with the gated MLP's wi_0 and
  wi_1 swapped in _t5_params, and with layer_norm_epsilon ignored (eps 0.05 here)."""
  seed = 31
  tensors, config = write_t5(str(tmp_path), version, eps=eps, seed=seed)
  model = convert.from_hf(str(tmp_path))
  cfg = model.cfg
  assert (cfg.arch, cfg.head_dim, cfg.num_layers, cfg.decoder_layers) == ("encoder_decoder", 5,
                                                                          2, 3)
  assert cfg.tie_embeddings == (version == "1.0") and cfg.ln_eps == (eps or 1e-6)
  ids, mask, dec = inputs(seed)
  want = numpy_t5(tensors, config, ids, mask, dec)
  got = np.asarray(forward(model, ids, dec, mask))
  assert got.shape == (3, 13, VOCAB) and want.std() > 0.5
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The mask matters here: without it the padded rows differ (so the test can fail). All ones
  # rather than None: the same compiled function.
  unmasked = np.asarray(forward(model, ids, dec, np.ones_like(mask)))
  assert not np.allclose(unmasked[1:], want[1:], atol=1e-2)
  np.testing.assert_allclose(unmasked[0], want[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_export_import_round_trip_exact(tmp_path, version):
  """to_hf writes the tensors it read, bit for bit (the tied copies encoder/decoder.embed_tokens
  once, as shared.weight), a config.json that reads back to the same model, and the same
  logits after re-import."""
  seed = 32
  write_t5(str(tmp_path / "a"), version, seed=seed)
  model = convert.from_hf(str(tmp_path / "a"))
  convert.to_hf(model, str(tmp_path / "b"))
  original = load_file(str(tmp_path / "a" / "model.safetensors"))
  for copy in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    del original[copy]
  exported = load_file(str(tmp_path / "b" / "model.safetensors"))
  assert exported.keys() == original.keys()
  for name in original:
    assert exported[name].dtype == np.float32
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  with open(tmp_path / "a" / "config.json") as f:
    a = json.load(f)
  with open(tmp_path / "b" / "config.json") as f:
    b = json.load(f)
  for key in ("architectures", "model_type", "vocab_size", "d_model", "d_kv", "d_ff",
              "num_layers", "num_decoder_layers", "num_heads", "relative_attention_num_buckets",
              "relative_attention_max_distance", "feed_forward_proj", "decoder_start_token_id",
              "pad_token_id", "eos_token_id", "is_encoder_decoder", "dropout_rate"):
    assert a[key] == b[key], key
  assert b["tie_word_embeddings"] == (version == "1.0") and b["layer_norm_epsilon"] == 1e-6
  again = convert.from_hf(str(tmp_path / "b"))
  assert again.cfg == model.cfg
  ids, mask, dec = inputs(seed)
  np.testing.assert_array_equal(np.asarray(forward(again, ids, dec, mask)),
                                np.asarray(forward(model, ids, dec, mask)))


def test_bad_checkpoints_are_one_clear_error(tmp_path):
  write_t5(str(tmp_path / "ok"), "1.1")
  os.remove(tmp_path / "ok" / "config.json")
  with pytest.raises(UsageError, match="no config.json in"):
    convert.from_hf(str(tmp_path / "ok"))

  def wrong_shape(t, config):
    t["decoder.block.2.layer.1.EncDecAttention.k.weight"] = np.zeros((16, 24), np.float32)

  def missing(t, config):
    del t["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]

  def untied_copy(t, config):
    t["decoder.embed_tokens.weight"] = t["shared.weight"] + 1

  def surprise(t, config):
    t["encoder.block.0.layer.2.layer_norm.weight"] = np.ones(24, np.float32)

  for name, change, match in (
      ("type", lambda t, c: c.update(model_type="mt5"), "model_type='mt5': checkpoints of types"),
      ("proj", lambda t, c: c.update(feed_forward_proj="gated-silu"),
       "feed_forward_proj='gated-silu'"),
      ("d_kv", lambda t, c: c.update(d_kv="5"), "d_kv='5' is not an integer"),
      ("shape", wrong_shape, r"EncDecAttention.k.weight: shape \(16, 24\), expected \(15, 24\)"),
      ("missing", missing, "lacks 'decoder.block.0.layer.0.SelfAttention.relative_attention_bias"),
      ("copy", untied_copy, "decoder.embed_tokens.weight differs"),
      ("extra", surprise, "unexpected tensors.*layer.2.layer_norm")):
    write_t5(str(tmp_path / name), "1.1", change=change)
    with pytest.raises(UsageError, match=match):
      convert.from_hf(str(tmp_path / name))
  # Hugging Face's never-used cross-attention bias of old checkpoints is accepted.
  write_t5(str(tmp_path / "old"), "1.0", change=lambda t, c: t.update({
      "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
          np.zeros((10, 3), np.float32)}))
  t5 = convert.from_hf(str(tmp_path / "old"))
  # Exporting a T5 as another family, or a decoder as T5, is refused.
  with pytest.raises(UsageError, match="not llama shaped: arch='encoder_decoder'"):
    convert.to_hf(t5, str(tmp_path / "out"), model_type="llama")
  from lm.config import model_config
  from lm.model import Transformer
  gpt = nnx.eval_shape(lambda: Transformer(model_config(vocab_size=50, num_layers=1, d_model=16,
                                                       num_heads=2, max_seq_len=8), nnx.Rngs(0)))
  with pytest.raises(UsageError, match="not t5 shaped: arch='decoder'.*positions='rope'"):
    convert.to_hf(gpt, str(tmp_path / "out"), model_type="t5")
  assert not os.path.exists(tmp_path / "out")


def unigram_tokenizer(directory):
  """A small T5-like tokenizer.json: a sentencepiece Unigram model with <pad> </s> <unk> at ids
  0, 1, 2, the Metaspace pre-tokenizer and decoder ("▁" marks a word start), and T5's
  post-processor "$A </s>"; its vocabulary (45) is smaller than the model's (50), as T5's
  32100 tokens are padded to 32128 rows."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  words = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁a", "at", "▁"]
  chars = sorted(set("the cat sat on a mat, dog!".replace(" ", "")) | set("bdfgilmpruwxyz"))
  pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, -2.0) for w in words]
            + [(c, -5.0) for c in chars])
  pieces += [(f"<extra_id_{i}>", 0.0) for i in range(45 - len(pieces))]  # T5's sentinels
  tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  tok.add_special_tokens(["<pad>", "</s>", "<unk>"] + [p for p, _ in pieces if "extra" in p])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  return tok


def test_unigram_tokenizer_loads_and_round_trips(tmp_path):
  unigram_tokenizer(str(tmp_path))
  for tok in (convert.load_hf_tokenizer(str(tmp_path)), tokenizers.load(str(tmp_path))):
    assert tok.kind == "unigram" and tok.vocab_size == 45
    text = "the cat sat on a mat, dog!"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids[-1] == 1 and 2 not in ids  # "</s>" ends it, no <unk>
    assert ids[0] == tok.tok.token_to_id("▁the") and ids[1] == tok.tok.token_to_id("▁cat")
    assert tok.decode(ids) == text
    again = tokenizers.from_json(tok.to_json())  # as a checkpoint stores it
    assert again.kind == "unigram" and list(again.encode(text)) == list(ids)


def test_cli_converts_a_t5_into_a_run_directory_and_back(tmp_path, make_config, capsys):
  """python -m lm.convert (its main, in this process) on a v1.1 T5 with a unigram tokenizer.json
  of fewer tokens than the model's vocabulary: the run directory loads with lm.runtime.load as
  an encoder-decoder (task seq2seq, the checkpoint's dropout_rate), its logits are from_hf's
  over the tokenizer's ids, and --export writes the tensors back (cut to those ids). Failed
  before T5's relative bias ("embedding") had a weight-decay class in lm/train.py."""
  from lm import runtime
  hf = str(tmp_path / "hf")
  write_t5(hf, "1.1", seed=7, copies=False)
  unigram_tokenizer(hf)
  workdir = str(tmp_path / "run")
  assert convert.main([f"--hf_dir={hf}", f"--workdir={workdir}"]) == 0
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["train"]["task"] == "seq2seq" and saved["model"]["arch"] == "encoder_decoder"
  assert saved["model"]["dropout"] == 0.1 and saved["model"]["num_decoder_layers"] == 3
  run, state, tok, step = runtime.load(make_config(), workdir)
  assert step == 0 and tok.kind == "unigram" and run.model_cfg.vocab_size == 45
  ours = nnx.merge(run.graphdef, state)[0]
  ids, mask, dec = inputs(3)
  ids, dec = ids % 45, dec % 45
  full = np.asarray(forward(convert.from_hf(hf), ids, dec, mask))
  np.testing.assert_allclose(np.asarray(forward(ours, ids, dec, mask)), full[..., :45],
                             rtol=1e-6, atol=1e-6)
  out = str(tmp_path / "out")
  assert convert.main(["--export", f"--workdir={workdir}", f"--hf_dir={out}"]) == 0
  exported = load_file(os.path.join(out, "model.safetensors"))
  original = load_file(os.path.join(hf, "model.safetensors"))
  assert exported.keys() == original.keys()
  for name in exported:
    want = original[name][:45] if name in ("shared.weight", "lm_head.weight") else original[name]
    np.testing.assert_array_equal(exported[name], want, err_msg=name)
  assert tokenizers.load(out).kind == "unigram"
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["vocab_size"] == 45
  # A T5 without tokenizer.json (only spiece.model): one error line, exit 2, nothing written.
  capsys.readouterr()
  os.remove(os.path.join(hf, "tokenizer.json"))
  open(os.path.join(hf, "spiece.model"), "wb").close()
  assert convert.main([f"--hf_dir={hf}", f"--workdir={tmp_path / 'w2'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and "spiece.model" in err
  assert not os.path.exists(tmp_path / "w2")

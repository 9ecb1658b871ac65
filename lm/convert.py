"""Hugging Face checkpoints <-> our models, without torch: GPT-2, Llama, Mistral, Qwen2, BERT, T5.

Import (a directory with config.json and model.safetensors, or shards named by
model.safetensors.index.json, as `save_pretrained` writes them or as the Hub serves them; any
float dtype, bf16 included, read by our own safetensors parser):

  python -m lm.convert --hf_dir=DIR --workdir=OUT
      writes OUT/checkpoints/0 (Orbax, the same train state a run saves: parameters plus a
      fresh optimizer), OUT/config.json and OUT/tokenizer.json, so that
      `experiments/run.py --workdir=OUT --mode=sample|eval` and `config.train.init_from=OUT`
      start from it.
  lm.convert.from_hf(DIR) -> Transformer whose call on ids [B, T] gives logits [B, T, V]; for
      BERT an Encoder: model(input_ids, attention_mask=None, token_type_ids=None) gives MLM
      logits [B, T, V] (hidden states [B, T, d] without an MLM head), model.classify(same)
      [B, num_labels]; for T5 an EncoderDecoder: model(input_ids [B, S], decoder_input_ids
      [B, T], attention_mask [B, S] or None) gives logits [B, T, V].

Export: `python -m lm.convert --export --workdir=RUN --hf_dir=OUT` (or `to_hf(model, OUT)`)
writes config.json and model.safetensors (float32) with the family's names and layouts.

The families in our terms (config.json's model_type picks one):
- gpt2: learned positions, pre-LN LayerNorm (layer_norm_epsilon), GELU (tanh approximation),
  biases everywhere, multi-head attention, head tied to the token embedding (or `lm_head`).
  Conv1D weights are [in, out] as our `x @ w`; c_attn is q | k | v.
- llama, mistral, qwen2: rotary positions (rotate-half over the head dimension, as ours: no
  q/k permutation is needed; rope_theta and rope_scaling type llama3), pre-norm RMSNorm
  (rms_norm_eps), SwiGLU (gate_proj under silu times up_proj), grouped-query attention
  (num_key_value_heads), no biases but Qwen2's on q/k/v (our qkv_bias), head tied or not
  (tie_word_embeddings). nn.Linear weights are [out, in]: transposed here.
  Mistral's sliding window is our model.attention_window (when shorter than
  max_position_embeddings; exported back as sliding_window). Qwen2's (use_sliding_window)
  slides only the layers from max_window_layers on, which ours cannot express: when shorter
  than the context, the context is clipped to it (a warning), where full causal attention is
  the same function.
- bert (BertModel, BertForMaskedLM, BertForSequenceClassification; the heads present are
  read from the tensors): our Encoder with learned positions, token types, post-LN
  LayerNorm (layer_norm_eps), GELU erf ("gelu") or tanh ("gelu_new"), biases everywhere;
  cls.predictions.* is the MLM head (decoder tied to the word embeddings), bert.pooler the
  pooler, classifier the classification head. nn.Linear weights are [out, in]: transposed.
  BertForPreTraining's next-sentence head (cls.seq_relationship) is not kept (a warning).
- t5 (T5ForConditionalGeneration: t5-small and the v1.0 family, v1.1 and flan-t5): our
  EncoderDecoder; RMSNorm pre-norm (layer_norm_epsilon), no biases, unscaled scores, a relative
  position bias in block 0 of each stack (relative_attention_num_buckets / _max_distance), head
  width d_kv, num_decoder_layers, feed_forward_proj "relu" (DenseReluDense.wi, wo) or
  "gated-gelu" (tanh GELU of wi_0 times wi_1: our w_gate, w_in), the head tied to shared.weight
  with the d_model^-0.5 rescale (tie_word_embeddings, v1.0) or lm_head (v1.1).
  encoder/decoder.embed_tokens are copies of shared.weight: accepted when equal, not written.
  nn.Linear weights are [out, in]: transposed. Its sentencepiece tokenizer.json (a Unigram
  model) loads through the `tokenizers` library.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from lm import layers, tokenizers
from lm.errors import UsageError
from lm.model import LLAMA3_KEYS, ModelConfig, Transformer, build, parse_rope_scaling

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
LLAMA_TYPES = ("llama", "mistral", "qwen2")
TYPES = ("gpt2",) + LLAMA_TYPES + ("bert", "t5")
_BERT_GELUS = {"gelu": "gelu_erf", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
# T5's feed_forward_proj -> our mlp ("gated-gelu" is tanh GELU: transformers maps it to gelu_new)
_T5_MLPS = {"relu": "relu", **{"gated-" + g: "gated_gelu" for g in ("gelu",) + _TANH_GELUS}}


# --- config ----------------------------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise UsageError(f"no config.json in {hf_dir}")
  try:
    with open(path, encoding="utf-8") as f:
      hf = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise UsageError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(hf, dict):
    raise UsageError(f"{path}: expected a JSON object, got {type(hf).__name__}")
  for key, value in hf.items():  # sizes and counts must be integers ("32" is not 32)
    if key.endswith(("_size", "_layers", "_heads", "_positions", "n_embd", "n_layer", "n_head",
                     "n_ctx", "n_inner", "d_model", "d_kv", "d_ff", "_buckets", "_distance")) \
        and not (value is None or type(value) is int):
      raise UsageError(f"{path}: {key}={value!r} is not an integer")
  return hf


def model_type_of(hf: dict) -> str:
  kind = hf.get("model_type", "gpt2")
  if kind not in TYPES:
    raise UsageError(f"model_type={kind!r}: checkpoints of types {', '.join(TYPES)} convert")
  return kind


def model_config_from_hf(hf: dict, tensor_names=(), **overrides) -> ModelConfig:
  """Our ModelConfig for a Hugging Face config.json (rejects what we cannot express).
  tensor_names: the checkpoint's, which tell a BERT's heads. overrides set fields that change
  no shape (attention_impl, dtype)."""
  kind = model_type_of(hf)
  try:
    fields = (_gpt2_fields(hf) if kind == "gpt2" else _bert_fields(hf, tensor_names)
              if kind == "bert" else _t5_fields(hf) if kind == "t5" else _llama_fields(hf))
  except KeyError as e:  # a size the family cannot do without
    raise UsageError(f"config.json of model_type {kind!r} lacks {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:  # e.g. rope_theta "x"
    raise UsageError(f"config.json: {e}") from None
  fields.update(overrides)
  from lm import validate
  from lm.config import model_config
  try:
    # each value's type and range as for a run's config (layer_norm_eps -1 gave NaN, "x" a
    # TypeError traceback), then the fields against each other
    validate.check_model_fields(fields, "config.json: ")
    return model_config(**fields)  # fields the checkpoint leaves open: the defaults
  except ValueError as e:
    raise UsageError(str(e)) from None


def _gpt2_fields(hf: dict) -> dict:
  act = hf.get("activation_function", "gelu_new")
  if act not in _TANH_GELUS:
    raise UsageError(f"activation_function={act!r}: the model implements GELU with the tanh "
                     f"approximation only ({', '.join(_TANH_GELUS)})")
  for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                  ("scale_attn_weights", True)):
    if hf.get(key, ok) != ok:
      raise UsageError(f"{key}={hf[key]!r} is not supported (GPT-2 uses {ok})")
  d = hf["n_embd"]
  n_inner = hf.get("n_inner")
  return dict(vocab_size=hf["vocab_size"], max_seq_len=hf.get("n_positions", hf.get("n_ctx")),
              num_layers=hf["n_layer"], num_heads=hf["n_head"], num_kv_heads=0, d_model=d,
              d_ff=0 if n_inner in (None, 4 * d) else n_inner, positions="learned",
              norm="pre", norm_type="layernorm", mlp="gelu", use_bias=True,
              tie_embeddings=hf.get("tie_word_embeddings", True),
              ln_eps=hf.get("layer_norm_epsilon", 1e-5))


def _rope_from_hf(hf: dict) -> tuple[float, str]:
  """(rope_theta, our rope_scaling spec) from transformers 4's rope_theta + rope_scaling or
  transformers 5's rope_parameters."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, ""
  if kind != "llama3":
    raise UsageError(f"rope_scaling type {kind!r} is not supported (default and llama3 are)")
  missing = [k for k in LLAMA3_KEYS if k not in params]
  if missing:
    raise UsageError(f"rope_scaling of type llama3 lacks {', '.join(missing)}")
  return theta, "llama3:" + ",".join(f"{k}={float(params[k])!r}" for k in LLAMA3_KEYS)


def _llama_fields(hf: dict) -> dict:
  kind = hf["model_type"]
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  kv = hf.get("num_key_value_heads") or h
  checks = (("hidden_act", "silu"), ("head_dim", d // h), ("partial_rotary_factor", 1.0),
            ("attention_bias", False), ("mlp_bias", False))
  for key, ok in checks:
    if hf.get(key) not in (None, ok):
      raise UsageError(f"{key}={hf[key]!r} is not supported ({kind} here needs {ok!r})")
  theta, scaling = _rope_from_hf(hf)
  context = hf.get("max_position_embeddings", 2048)
  window = hf.get("sliding_window") if kind == "mistral" or hf.get("use_sliding_window") else None
  if not window or window >= context:  # a window as long as the context slides over nothing
    window = 0
  elif kind != "mistral":  # some layers slide and some do not
    logging.warning("%s: sliding_window=%d < max_position_embeddings=%d on some layers only: "
                    "not implemented; the context is clipped to %d", kind, window, context,
                    window)
    context, window = window, 0
  return dict(vocab_size=hf["vocab_size"], max_seq_len=context,
              num_layers=hf["num_hidden_layers"], num_heads=h, num_kv_heads=0 if kv == h else kv,
              d_model=d, d_ff=hf["intermediate_size"], positions="rope", norm="pre",
              norm_type="rmsnorm", mlp="swiglu", use_bias=False, qkv_bias=kind == "qwen2",
              tie_embeddings=hf.get("tie_word_embeddings", False),
              ln_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
              attention_window=window)


def _bert_fields(hf: dict, names) -> dict:
  act = hf.get("hidden_act", "gelu")
  if act not in _BERT_GELUS:
    raise UsageError(f"hidden_act={act!r}: BERT converts with {', '.join(_BERT_GELUS)}")
  for key, ok in (("position_embedding_type", "absolute"), ("is_decoder", False),
                  ("add_cross_attention", False)):
    if hf.get(key, ok) != ok:
      raise UsageError(f"{key}={hf[key]!r} is not supported (BERT here needs {ok!r})")
  names = {n[len("bert."):] if n.startswith("bert.") else n for n in names}
  num_classes = 0
  if "classifier.weight" in names:
    num_classes = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
  return dict(arch="encoder", vocab_size=hf["vocab_size"],
              max_seq_len=hf.get("max_position_embeddings", 512),
              num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
              num_kv_heads=0, d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
              positions="learned", norm="post", norm_type="layernorm", mlp=_BERT_GELUS[act],
              use_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
              ln_eps=hf.get("layer_norm_eps", 1e-12), type_vocab_size=hf.get("type_vocab_size", 2),
              mlm_head=any(n.startswith("cls.predictions.") for n in names),
              pooler="pooler.dense.weight" in names, num_classes=num_classes)


def _t5_fields(hf: dict) -> dict:
  proj = hf.get("feed_forward_proj", "relu")
  if proj not in _T5_MLPS:
    raise UsageError(f"feed_forward_proj={proj!r}: T5 converts with {', '.join(_T5_MLPS)}")
  for key in ("d_model", "num_layers", "num_heads", "vocab_size"):
    if key not in hf:
      raise UsageError(f"config.json lacks {key} (a T5 config names it)")
  from lm.config import t5_model
  import ml_collections
  fields = t5_model(ml_collections.ConfigDict(), num_layers=hf["num_layers"],
                    num_heads=hf["num_heads"], d_model=hf["d_model"],
                    d_ff=hf.get("d_ff", 2048)).to_dict()  # T5's conventions
  start = hf.get("decoder_start_token_id")
  fields.update(
      vocab_size=hf["vocab_size"], num_kv_heads=0, d_kv=hf.get("d_kv", 64),
      num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
      relative_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_max_distance=hf.get("relative_attention_max_distance", 128),
      mlp=_T5_MLPS[proj], tie_embeddings=hf.get("tie_word_embeddings", True),
      ln_eps=hf.get("layer_norm_epsilon", 1e-6), dropout=hf.get("dropout_rate", 0.1),
      # No position embeddings: n_positions (512) is the length it was trained at.
      max_seq_len=hf.get("n_positions") or 512,
      decoder_start_id=(hf.get("pad_token_id") or 0) if start is None else start)
  return fields


def _t5_config(cfg: ModelConfig) -> dict:
  """config.json of T5ForConditionalGeneration (v1.0 with mlp relu, v1.1 with gated_gelu)."""
  return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
          "is_encoder_decoder": True, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
          "d_kv": cfg.head_dim, "d_ff": cfg.ff_dim, "num_layers": cfg.num_layers,
          "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.num_heads,
          "relative_attention_num_buckets": cfg.relative_buckets,
          "relative_attention_max_distance": cfg.relative_max_distance,
          "feed_forward_proj": "relu" if cfg.mlp == "relu" else "gated-gelu",
          "tie_word_embeddings": cfg.tie_embeddings, "layer_norm_epsilon": cfg.ln_eps,
          "dropout_rate": cfg.dropout, "n_positions": cfg.max_seq_len,
          "decoder_start_token_id": cfg.decoder_start_id, "pad_token_id": 0, "eos_token_id": 1,
          "initializer_factor": 1.0, "use_cache": True}


def _bert_config(cfg: ModelConfig) -> dict:
  """config.json of an encoder: BertForSequenceClassification with a classifier, else
  BertForMaskedLM with an MLM head, else BertModel."""
  arch = ("BertForSequenceClassification" if cfg.num_classes else
          "BertForMaskedLM" if cfg.mlm_head else "BertModel")
  hf = {"architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.ff_dim,
        "hidden_act": "gelu" if cfg.mlp == "gelu_erf" else "gelu_new",
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.ln_eps, "position_embedding_type": "absolute",
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "pad_token_id": 0}
  if cfg.num_classes:
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
  return hf


def hf_config_from_model(cfg: ModelConfig, model_type: str | None = None) -> dict:
  """config.json for `cfg` as model_type (None: bert for an encoder, t5 for an encoder-decoder,
  gpt2 for learned positions, qwen2 with q/k/v biases, else llama); a UsageError when the model
  is not of that shape. T5's pad_token_id 0 and eos_token_id 1 are written as T5's tokenizer
  numbers them (the model does not know its tokenizer's ids)."""
  if model_type is None:
    model_type = ("bert" if cfg.arch == "encoder" else "t5" if cfg.arch == "encoder_decoder" else
                  "gpt2" if cfg.positions == "learned" else
                  "qwen2" if cfg.qkv_bias and not cfg.use_bias else "llama")
  if model_type == "gpt2":
    want = dict(arch="decoder", positions="learned", norm="pre", norm_type="layernorm",
                mlp="gelu", use_bias=True)
  elif model_type in LLAMA_TYPES:
    want = dict(arch="decoder", positions="rope", norm="pre", norm_type="rmsnorm", mlp="swiglu",
                use_bias=False, qkv_bias=model_type == "qwen2")
  elif model_type == "bert":
    want = dict(arch="encoder", positions="learned", norm="post", norm_type="layernorm",
                use_bias=True)
  elif model_type == "t5":
    want = dict(arch="encoder_decoder", positions="relative", norm="pre", norm_type="rmsnorm",
                use_bias=False, qkv_bias=False)
  else:
    raise UsageError(f"model_type={model_type!r}: export writes {', '.join(TYPES)}")
  problems = [f"{k}={getattr(cfg, k)!r} ({model_type}: {v!r})" for k, v in want.items()
              if getattr(cfg, k) != v]
  if model_type in ("gpt2", "bert", "t5") and cfg.kv_heads != cfg.num_heads:
    problems.append(f"num_kv_heads={cfg.num_kv_heads} ({model_type} has multi-head attention)")
  if model_type == "bert" and cfg.mlp not in ("gelu", "gelu_erf"):
    problems.append(f"mlp={cfg.mlp!r} (bert: 'gelu_erf' or 'gelu')")
  if model_type == "bert" and not cfg.type_vocab_size:
    problems.append("type_vocab_size=0 (bert has token-type embeddings)")
  if model_type == "t5" and cfg.mlp not in ("relu", "gated_gelu"):
    problems.append(f"mlp={cfg.mlp!r} (t5: 'relu' or 'gated_gelu')")
  if problems:
    shape = "GPT-2" if model_type == "gpt2" else model_type
    raise UsageError(f"the model is not {shape} shaped: " + ", ".join(problems))
  if model_type == "bert":
    return _bert_config(cfg)
  if model_type == "t5":
    return _t5_config(cfg)
  if model_type == "gpt2":
    return _gpt2_config(cfg)
  return _llama_config(cfg, model_type)


def _gpt2_config(cfg: ModelConfig) -> dict:
  return {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
      "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
      "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
      "n_inner": None if cfg.ff_dim == 4 * cfg.d_model else cfg.ff_dim,
      "activation_function": "gelu_new", "layer_norm_epsilon": cfg.ln_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "scale_attn_weights": True,
      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
      "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,
  }


def _llama_config(cfg: ModelConfig, model_type: str) -> dict:
  scaling = parse_rope_scaling(cfg.rope_scaling)
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM"}[model_type]
  hf = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.ln_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if scaling is None else {"rope_type": "llama3", **scaling},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0}
  if model_type == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  elif model_type == "mistral":
    hf.update(sliding_window=cfg.attention_window if cfg.attention_window > 0 else None)
  else:
    hf.update(sliding_window=None, use_sliding_window=False)
  return hf


# --- safetensors -----------------------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float64, np.float32, np.float16,
                                             ml_dtypes.bfloat16))


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  """The tensors of one .safetensors file as read-only numpy arrays mapped from the file.

  Parsed here (8-byte little-endian header length, JSON header, raw little-endian data)
  because the safetensors library's numpy API refuses bf16; bf16 comes back as
  ml_dtypes.bfloat16. A malformed file or an unknown dtype is a UsageError.
  """
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n)) if 8 + n <= size else None
  except (struct.error, ValueError):
    header = None
  if not isinstance(header, dict):
    raise UsageError(f"{path}: not a safetensors file")
  data = np.memmap(path, np.uint8, "r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _ST_DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise UsageError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}, not one of "
                       f"{', '.join(_ST_DTYPES)}")
    shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
    if end - begin != np.dtype(dtype).itemsize * int(np.prod(shape)) or end > len(data):
      raise UsageError(f"{path}: tensor {name} overruns the file or mismatches its shape")
    tensors[name] = data[begin:end].view(dtype).reshape(shape)
  return tensors


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors, or of the shards model.safetensors.index.json names."""
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    return read_safetensors_file(single)
  if not os.path.isfile(index):
    raise UsageError(f"no model.safetensors in {hf_dir} (only safetensors weights are read)")
  with open(index, encoding="utf-8") as f:
    weight_map = json.load(f)["weight_map"]
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    path = os.path.join(hf_dir, shard)
    if not os.path.isfile(path):
      raise UsageError(f"{index} names {shard}, which is missing")
    tensors.update(read_safetensors_file(path))
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise UsageError(f"{index} places {missing[0]} in {weight_map[missing[0]]}, which lacks it")
  return tensors


# --- weights ---------------------------------------------------------------------------------

class _Checkpoint:
  """Tensors by name without the wrapper prefix ("transformer." / "model."), each taken once
  with its shape checked against config.json; `check_all_used` refuses leftovers."""

  def __init__(self, tensors: dict, prefix: str, ignored: tuple[str, ...]):
    self.t = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()
              if not k.endswith(ignored)}
    self.used = set()

  def get(self, name: str, shape) -> np.ndarray:
    if name not in self.t:
      raise UsageError(f"the checkpoint lacks {name!r}")
    if self.t[name].dtype not in _FLOAT_DTYPES:  # integer bits cast to float: garbage weights
      raise UsageError(f"{name}: dtype {self.t[name].dtype}, expected a float tensor")
    x = np.asarray(self.t[name], np.float32)
    if x.shape != tuple(shape):
      raise UsageError(f"{name}: shape {x.shape}, expected {tuple(shape)} from config.json")
    if not np.isfinite(x).all():  # would make every output NaN (or a float16 overflow did)
      raise UsageError(f"{name}: holds non-finite values (NaN or inf)")
    self.used.add(name)
    return x

  def linear(self, name: str, n_out: int, n_in: int) -> np.ndarray:
    """An nn.Linear weight ([out, in]) as our [in, out]."""
    return self.get(name, (n_out, n_in)).T

  def copy_of(self, name: str, x: np.ndarray) -> None:
    """Accepts tensor `name` if present and equal to x (a tied copy saved twice)."""
    if name in self.t:
      if not np.array_equal(self.get(name, x.shape), x):
        raise UsageError(f"{name} differs from the tensor it is tied to")

  def head(self, cfg: ModelConfig, params: dict) -> None:
    v, d = cfg.vocab_size, cfg.d_model
    if not cfg.tie_embeddings:
      params["head"] = self.get("lm_head.weight", (v, d)).T
    elif "lm_head.weight" in self.t:
      self.used.add("lm_head.weight")  # a tied copy of the embedding

  def check_all_used(self) -> None:
    extra = sorted(set(self.t) - self.used)
    if extra:
      raise UsageError(f"unexpected tensors in the checkpoint: {', '.join(extra[:5])}"
                       + (" ..." if len(extra) > 5 else ""))


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """HF tensors -> our parameters as a pure dict (the layout of nnx.State.to_pure_dict), float32.
  The family follows from cfg (an encoder: BERT; an encoder-decoder: T5; learned positions:
  GPT-2; else Llama)."""
  if cfg.arch == "encoder":
    return _bert_params(tensors, cfg)
  if cfg.arch == "encoder_decoder":
    return _t5_params(tensors, cfg)
  if cfg.positions == "learned":
    return _gpt2_params(tensors, cfg)
  return _llama_params(tensors, cfg)


def _gpt2_params(tensors, cfg: ModelConfig) -> dict:
  c = _Checkpoint(tensors, "transformer.", (".attn.bias", ".attn.masked_bias"))  # mask buffers
  get = c.get
  d, h, hd, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.ff_dim, cfg.vocab_size
  params = {"embed": get("wte.weight", (v, d)),
            "pos_embed": get("wpe.weight", (cfg.max_seq_len, d)),
            "ln_f": {"scale": get("ln_f.weight", (d,)), "bias": get("ln_f.bias", (d,))},
            "blocks": {}}
  for i in range(cfg.num_layers):
    p = f"h.{i}."
    w = get(p + "attn.c_attn.weight", (d, 3 * d))  # Conv1D: x @ w, columns q | k | v
    b = get(p + "attn.c_attn.bias", (3 * d,))
    wq, wk, wv = (x.reshape(d, h, hd) for x in np.split(w, 3, axis=1))
    bq, bk, bv = (x.reshape(h, hd) for x in np.split(b, 3))
    params["blocks"][i] = {
        "ln1": {"scale": get(p + "ln_1.weight", (d,)), "bias": get(p + "ln_1.bias", (d,))},
        "ln2": {"scale": get(p + "ln_2.weight", (d,)), "bias": get(p + "ln_2.bias", (d,))},
        "attn": {"wq": wq, "wk": wk, "wv": wv, "bq": bq, "bk": bk, "bv": bv,
                 "wo": get(p + "attn.c_proj.weight", (d, d)),
                 "bo": get(p + "attn.c_proj.bias", (d,))},
        "mlp": {"w_in": get(p + "mlp.c_fc.weight", (d, f)), "b_in": get(p + "mlp.c_fc.bias", (f,)),
                "w_out": get(p + "mlp.c_proj.weight", (f, d)),
                "b_out": get(p + "mlp.c_proj.bias", (d,))},
    }
  c.head(cfg, params)
  c.check_all_used()
  return params


def _llama_params(tensors, cfg: ModelConfig) -> dict:
  c = _Checkpoint(tensors, "model.", (".rotary_emb.inv_freq",))  # an old, recomputed buffer
  d, h, kv, hd, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim
  linear = c.linear
  params = {"embed": c.get("embed_tokens.weight", (cfg.vocab_size, d)),
            "ln_f": {"scale": c.get("norm.weight", (d,))}, "blocks": {}}
  for i in range(cfg.num_layers):
    a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
    attn = {"wq": linear(a + "q_proj.weight", h * hd, d).reshape(d, h, hd),
            "wk": linear(a + "k_proj.weight", kv * hd, d).reshape(d, kv, hd),
            "wv": linear(a + "v_proj.weight", kv * hd, d).reshape(d, kv, hd),
            "wo": linear(a + "o_proj.weight", d, h * hd)}
    if cfg.qkv_bias:
      for ours, theirs, heads in (("bq", "q", h), ("bk", "k", kv), ("bv", "v", kv)):
        attn[ours] = c.get(a + f"{theirs}_proj.bias", (heads * hd,)).reshape(heads, hd)
    params["blocks"][i] = {
        "ln1": {"scale": c.get(f"layers.{i}.input_layernorm.weight", (d,))},
        "ln2": {"scale": c.get(f"layers.{i}.post_attention_layernorm.weight", (d,))},
        "attn": attn,
        "mlp": {"w_gate": linear(m + "gate_proj.weight", f, d),  # silu(x @ w_gate) * (x @ w_in)
                "w_in": linear(m + "up_proj.weight", f, d),
                "w_out": linear(m + "down_proj.weight", d, f)},
    }
  c.head(cfg, params)
  c.check_all_used()
  return params


def _bert_params(tensors, cfg: ModelConfig) -> dict:
  nsp = [k for k in tensors if k.startswith("cls.seq_relationship.")]
  if nsp:
    logging.warning("BERT: the next-sentence head (%s) is not kept", ", ".join(nsp))
  c = _Checkpoint({k: v for k, v in tensors.items() if k not in nsp}, "bert.",
                  ("embeddings.position_ids",))  # a buffer of 0..max_len-1
  d, h, hd, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.ff_dim, cfg.vocab_size
  linear = c.linear
  ln = lambda p: {"scale": c.get(p + ".weight", (d,)), "bias": c.get(p + ".bias", (d,))}
  e = "embeddings."
  params = {"embed": c.get(e + "word_embeddings.weight", (v, d)),
            "pos_embed": c.get(e + "position_embeddings.weight", (cfg.max_seq_len, d)),
            "type_embed": c.get(e + "token_type_embeddings.weight", (cfg.type_vocab_size, d)),
            "emb_ln": ln(e + "LayerNorm"), "blocks": {}}
  for i in range(cfg.num_layers):
    p = f"encoder.layer.{i}."
    attn = {"wo": linear(p + "attention.output.dense.weight", d, d),
            "bo": c.get(p + "attention.output.dense.bias", (d,))}
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
      attn["w" + ours] = linear(p + f"attention.self.{theirs}.weight", d, d).reshape(d, h, hd)
      attn["b" + ours] = c.get(p + f"attention.self.{theirs}.bias", (d,)).reshape(h, hd)
    params["blocks"][i] = {  # post-LN: ln1 after attention, ln2 after the MLP
        "attn": attn, "ln1": ln(p + "attention.output.LayerNorm"), "ln2": ln(p + "output.LayerNorm"),
        "mlp": {"w_in": linear(p + "intermediate.dense.weight", f, d),
                "b_in": c.get(p + "intermediate.dense.bias", (f,)),
                "w_out": linear(p + "output.dense.weight", d, f),
                "b_out": c.get(p + "output.dense.bias", (d,))}}
  if cfg.mlm_head:
    t = "cls.predictions."
    params.update(mlm_w=linear(t + "transform.dense.weight", d, d),
                  mlm_b=c.get(t + "transform.dense.bias", (d,)),
                  mlm_ln=ln(t + "transform.LayerNorm"), mlm_bias=c.get(t + "bias", (v,)))
    if t + "decoder.bias" in c.t:  # newer transformers save the tied bias twice
      c.get(t + "decoder.bias", (v,))
    if not cfg.tie_embeddings:
      params["head"] = c.get(t + "decoder.weight", (v, d)).T
    elif t + "decoder.weight" in c.t:
      c.used.add(t + "decoder.weight")  # a tied copy of the word embeddings
  if cfg.pooler or cfg.num_classes:
    params["pool_w"] = linear("pooler.dense.weight", d, d)
    params["pool_b"] = c.get("pooler.dense.bias", (d,))
  if cfg.num_classes:
    params["cls_head"] = linear("classifier.weight", cfg.num_classes, d)
    params["cls_bias"] = c.get("classifier.bias", (cfg.num_classes,))
  c.check_all_used()
  return params


def _nn_linear(w: np.ndarray) -> np.ndarray:
  """Our dense weight [in, *out] as nn.Linear's [out, in]."""
  return w.reshape(w.shape[0], -1).T


# Hugging Face keeps this never-used tensor in some old T5 checkpoints (its
# _keys_to_ignore_on_load_unexpected): only self-attention has a relative position bias.
_T5_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def _t5_params(tensors, cfg: ModelConfig) -> dict:
  c = _Checkpoint(tensors, "", _T5_IGNORED)
  d, h, hd, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.ff_dim
  rms = lambda name: {"scale": c.get(name + ".weight", (d,))}

  def attention(p):
    return {"wq": c.linear(p + "q.weight", h * hd, d).reshape(d, h, hd),
            "wk": c.linear(p + "k.weight", h * hd, d).reshape(d, h, hd),
            "wv": c.linear(p + "v.weight", h * hd, d).reshape(d, h, hd),
            "wo": c.linear(p + "o.weight", d, h * hd)}

  def stack(side, num_layers):
    decoder = side == "decoder"
    blocks = {}
    for i in range(num_layers):
      p = f"{side}.block.{i}.layer."
      ff = p + ("2." if decoder else "1.")  # the decoder's layer.1 is its cross-attention
      m = ff + "DenseReluDense."
      mlp = ({"w_gate": c.linear(m + "wi_0.weight", f, d),  # gelu(x @ w_gate) * (x @ w_in)
              "w_in": c.linear(m + "wi_1.weight", f, d)} if cfg.mlp == "gated_gelu"
             else {"w_in": c.linear(m + "wi.weight", f, d)})
      mlp["w_out"] = c.linear(m + "wo.weight", d, f)
      blocks[i] = {"ln1": rms(p + "0.layer_norm"), "attn": attention(p + "0.SelfAttention."),
                   "ln2": rms(ff + "layer_norm"), "mlp": mlp}
      if decoder:
        blocks[i].update(ln_cross=rms(p + "1.layer_norm"),
                         cross_attn=attention(p + "1.EncDecAttention."))
    bias = f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    return {"rel_bias": {"embedding": c.get(bias, (cfg.relative_buckets, h))}, "blocks": blocks,
            "ln_f": rms(side + ".final_layer_norm")}

  params = {"embed": c.get("shared.weight", (cfg.vocab_size, d)),
            "encoder": stack("encoder", cfg.num_layers),
            "decoder": stack("decoder", cfg.decoder_layers)}
  for side in ("encoder", "decoder"):
    c.copy_of(side + ".embed_tokens.weight", params["embed"])
  c.head(cfg, params)
  c.check_all_used()
  return params


def _t5_tensors(p: dict, cfg: ModelConfig) -> dict:
  """Names as T5ForConditionalGeneration.save_pretrained writes them: the embeddings once, as
  shared.weight (encoder/decoder.embed_tokens are tied to it)."""
  linear = _nn_linear
  out = {"shared.weight": p["embed"]}
  for side, n in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
    s = p[side]
    out[f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
        s["rel_bias"]["embedding"]
    out[side + ".final_layer_norm.weight"] = s["ln_f"]["scale"]
    for i in range(n):
      blk, pre = s["blocks"][i], f"{side}.block.{i}.layer."
      attn = [("0.", "SelfAttention.", "ln1", "attn")]
      if side == "decoder":
        attn.append(("1.", "EncDecAttention.", "ln_cross", "cross_attn"))
      for layer, name, ln, ours in attn:
        out[pre + layer + "layer_norm.weight"] = blk[ln]["scale"]
        for w in ("q", "k", "v", "o"):
          out[pre + layer + name + w + ".weight"] = linear(blk[ours]["w" + w])
      ff = pre + ("2." if side == "decoder" else "1.")
      m = blk["mlp"]
      out[ff + "layer_norm.weight"] = blk["ln2"]["scale"]
      out[ff + "DenseReluDense.wo.weight"] = linear(m["w_out"])
      if cfg.mlp == "gated_gelu":
        out[ff + "DenseReluDense.wi_0.weight"] = linear(m["w_gate"])
        out[ff + "DenseReluDense.wi_1.weight"] = linear(m["w_in"])
      else:
        out[ff + "DenseReluDense.wi.weight"] = linear(m["w_in"])
  return out


def _bert_tensors(p: dict, cfg: ModelConfig) -> dict:
  """Names as BertModel (no prefix) or Bert*For* ("bert." before the encoder) save them."""
  pre = "bert." if cfg.mlm_head or cfg.num_classes else ""
  linear = _nn_linear
  ln = lambda name, x: {name + ".weight": x["scale"], name + ".bias": x["bias"]}
  e = pre + "embeddings."
  out = {e + "word_embeddings.weight": p["embed"], e + "position_embeddings.weight": p["pos_embed"],
         e + "token_type_embeddings.weight": p["type_embed"], **ln(e + "LayerNorm", p["emb_ln"])}
  for i in range(cfg.num_layers):
    blk, q = p["blocks"][i], f"{pre}encoder.layer.{i}."
    a, m = blk["attn"], blk["mlp"]
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
      out[q + f"attention.self.{theirs}.weight"] = linear(a["w" + ours])
      out[q + f"attention.self.{theirs}.bias"] = a["b" + ours].reshape(-1)
    out.update({q + "attention.output.dense.weight": a["wo"].T,
                q + "attention.output.dense.bias": a["bo"],
                **ln(q + "attention.output.LayerNorm", blk["ln1"]),
                q + "intermediate.dense.weight": m["w_in"].T, q + "intermediate.dense.bias": m["b_in"],
                q + "output.dense.weight": m["w_out"].T, q + "output.dense.bias": m["b_out"],
                **ln(q + "output.LayerNorm", blk["ln2"])})
  if cfg.mlm_head:
    t = "cls.predictions."
    out.update({t + "transform.dense.weight": p["mlm_w"].T, t + "transform.dense.bias": p["mlm_b"],
                **ln(t + "transform.LayerNorm", p["mlm_ln"]), t + "bias": p["mlm_bias"]})
    if not cfg.tie_embeddings:
      out[t + "decoder.weight"] = p["head"].T
  if cfg.pooler or cfg.num_classes:
    out.update({pre + "pooler.dense.weight": p["pool_w"].T, pre + "pooler.dense.bias": p["pool_b"]})
  if cfg.num_classes:
    out.update({"classifier.weight": p["cls_head"].T, "classifier.bias": p["cls_bias"]})
  return out


def hf_tensors_from_params(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Inverse of params_from_hf, with the names `*ForCausalLM.save_pretrained` writes (BERT:
  `BertModel`/`BertFor*`, T5: `T5ForConditionalGeneration`); the layers may be stacked
  (model.scan_layers) or per layer."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), layers.unstack_layers(params))
  if cfg.arch == "encoder":
    return {k: np.ascontiguousarray(v) for k, v in _bert_tensors(p, cfg).items()}
  family = (_t5_tensors if cfg.arch == "encoder_decoder" else
            _gpt2_tensors if cfg.positions == "learned" else _llama_tensors)
  out = family(p, cfg)
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["head"].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _gpt2_tensors(p: dict, cfg: ModelConfig) -> dict:
  d = cfg.d_model
  out = {"transformer.wte.weight": p["embed"], "transformer.wpe.weight": p["pos_embed"],
         "transformer.ln_f.weight": p["ln_f"]["scale"], "transformer.ln_f.bias": p["ln_f"]["bias"]}
  for i in range(cfg.num_layers):
    blk, pre = p["blocks"][i], f"transformer.h.{i}."
    a, m = blk["attn"], blk["mlp"]
    out.update({
        pre + "ln_1.weight": blk["ln1"]["scale"], pre + "ln_1.bias": blk["ln1"]["bias"],
        pre + "ln_2.weight": blk["ln2"]["scale"], pre + "ln_2.bias": blk["ln2"]["bias"],
        pre + "attn.c_attn.weight": np.concatenate(
            [a["wq"].reshape(d, -1), a["wk"].reshape(d, -1), a["wv"].reshape(d, -1)], axis=1),
        pre + "attn.c_attn.bias": np.concatenate(
            [a["bq"].reshape(-1), a["bk"].reshape(-1), a["bv"].reshape(-1)]),
        pre + "attn.c_proj.weight": a["wo"], pre + "attn.c_proj.bias": a["bo"],
        pre + "mlp.c_fc.weight": m["w_in"], pre + "mlp.c_fc.bias": m["b_in"],
        pre + "mlp.c_proj.weight": m["w_out"], pre + "mlp.c_proj.bias": m["b_out"],
    })
  return out


def _llama_tensors(p: dict, cfg: ModelConfig) -> dict:
  d = cfg.d_model
  out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["ln_f"]["scale"]}
  for i in range(cfg.num_layers):
    blk, pre = p["blocks"][i], f"model.layers.{i}."
    a, m = blk["attn"], blk["mlp"]
    out.update({
        pre + "input_layernorm.weight": blk["ln1"]["scale"],
        pre + "post_attention_layernorm.weight": blk["ln2"]["scale"],
        pre + "self_attn.q_proj.weight": a["wq"].reshape(d, -1).T,
        pre + "self_attn.k_proj.weight": a["wk"].reshape(d, -1).T,
        pre + "self_attn.v_proj.weight": a["wv"].reshape(d, -1).T,
        pre + "self_attn.o_proj.weight": a["wo"].T,
        pre + "mlp.gate_proj.weight": m["w_gate"].T, pre + "mlp.up_proj.weight": m["w_in"].T,
        pre + "mlp.down_proj.weight": m["w_out"].T,
    })
    if cfg.qkv_bias:
      for ours, theirs in (("bq", "q"), ("bk", "k"), ("bv", "v")):
        out[pre + f"self_attn.{theirs}_proj.bias"] = a[ours].reshape(-1)
  return out


def model_from_params(cfg: ModelConfig, params: dict) -> Transformer:
  """The model of cfg.arch (Transformer, Encoder) holding `params` (a pure dict, layers stacked
  or per layer: converted to cfg.scan_layers's layout), allocating nothing else."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))
  params = layers.stack_layers(params) if cfg.scan_layers else layers.unstack_layers(params)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def from_hf(hf_dir: str, **overrides) -> Transformer:
  """Our model (float32 parameters) with the weights of a Hugging Face directory (config.json
  and safetensors) of model_type gpt2, llama, mistral, qwen2, bert or t5. overrides set
  ModelConfig fields that change no shape (attention_impl, dtype). Bad input raises
  UsageError."""
  hf = read_hf_config(hf_dir)
  model_type_of(hf)  # an unsupported type is refused before the weights are read
  tensors = read_safetensors(hf_dir)
  cfg = model_config_from_hf(hf, tensors, **overrides)
  return model_from_params(cfg, params_from_hf(tensors, cfg))


def to_hf(model: Transformer, out_dir: str, tokenizer=None, model_type: str | None = None):
  """Writes config.json and model.safetensors (float32) as model_type (None: inferred, see
  hf_config_from_model); tokenizer.json too when `tokenizer` is a `tokenizers` one (BPE,
  word-piece, unigram)."""
  from safetensors.numpy import save_file
  cfg = model.cfg
  hf = hf_config_from_model(cfg, model_type)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if cfg.arch != "encoder":  # a decoder's classifier has no place in GPT-2/Llama files
    params.pop("cls_head", None), params.pop("cls_bias", None)
  os.makedirs(out_dir, exist_ok=True)
  save_file(hf_tensors_from_params(params, cfg), os.path.join(out_dir, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None and tokenizer.kind in ("bpe", "wordpiece", "unigram"):
    tokenizers.save(tokenizer, out_dir)


def from_hf_gpt2(hf_dir: str, **overrides) -> Transformer:
  """from_hf for a GPT-2 directory (kept for existing callers)."""
  if model_type_of(read_hf_config(hf_dir)) != "gpt2":
    raise UsageError(f"{hf_dir} is not a GPT-2 checkpoint")
  return from_hf(hf_dir, **overrides)


def to_hf_gpt2(model: Transformer, out_dir: str, tokenizer=None) -> None:
  to_hf(model, out_dir, tokenizer, model_type="gpt2")


# --- tokenizers ------------------------------------------------------------------------------

def load_hf_tokenizer(hf_dir: str):
  """tokenizer.json (the `tokenizers` library), else vocab.json + merges.txt (GPT-2's byte-level
  BPE), else vocab.txt (BERT's word pieces); None when the directory has none of them."""
  if os.path.isfile(os.path.join(hf_dir, tokenizers.FILENAME)):
    return tokenizers.load(hf_dir)
  if os.path.isfile(os.path.join(hf_dir, "vocab.txt")):
    return _bert_vocab_tokenizer(hf_dir)
  vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
  if os.path.isfile(vocab) and os.path.isfile(merges):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tokenizers.BPETokenizer(tok)
  return None


def _bert_vocab_tokenizer(hf_dir: str):
  """BERT's tokenizer from vocab.txt (and do_lower_case of tokenizer_config.json, default
  True), with the [CLS] $A [SEP] post-processor."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  lower = True
  config = os.path.join(hf_dir, "tokenizer_config.json")
  if os.path.isfile(config):
    with open(config, encoding="utf-8") as f:
      lower = bool(json.load(f).get("do_lower_case", True))
  tok = Tokenizer(models.WordPiece.from_file(os.path.join(hf_dir, "vocab.txt"), unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=lower)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  if cls_id is not None and sep_id is not None:
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
  return tokenizers.WordPieceTokenizer(tok)


# --- workdirs --------------------------------------------------------------------------------

def run_config(cfg: ModelConfig, base_config=None):
  """An experiment config (lm.config.base_config() unless given) whose model section is
  `cfg` in every field a checkpoint fixes."""
  from lm.config import base_config as defaults
  from lm.model import checkpoint_fields
  config = copy.deepcopy(base_config if base_config is not None else defaults())
  with config.unlocked():
    for name in checkpoint_fields():
      config.model[name] = getattr(cfg, name)
    config.model.attention_window = cfg.attention_window  # 0: trained elsewhere, full context
    config.model.dropout = cfg.dropout  # the checkpoint's (T5's dropout_rate; else the default)
    config.data.seq_len = min(config.data.seq_len, cfg.max_seq_len)
  return config


def trim_vocab(params: dict, n: int) -> dict:
  """params (a pure dict) with the vocabulary cut to its first n ids: the rows of the token
  embedding, the columns of an untied head, the MLM head's bias."""
  cut = {"embed": lambda x: x[:n], "head": lambda x: x[:, :n], "mlm_bias": lambda x: x[:n]}
  return {k: cut[k](v) if k in cut else v for k, v in params.items()}


def hf_to_workdir(hf_dir: str, workdir: str, tokenizer=None, base_config=None) -> str:
  """Converts a Hugging Face directory into a run directory at step 0; returns it. Everything
  is read and checked before anything is written. A model vocabulary larger than the
  tokenizer's (T5 pads 32100 tokens to 32128) is cut to the tokenizer's (trim_vocab)."""
  from lm import checkpoint as ckpt_lib
  from lm import train as train_lib
  hf = read_hf_config(hf_dir)
  model_type_of(hf)
  tensors = read_safetensors(hf_dir)
  cfg = model_config_from_hf(hf, tensors)
  params = params_from_hf(tensors, cfg)
  tokenizer = tokenizer or load_hf_tokenizer(hf_dir)
  if tokenizer is None:
    if cfg.vocab_size != 256:
      spiece = os.path.isfile(os.path.join(hf_dir, "spiece.model"))
      files = "vocab.txt" if cfg.arch == "encoder" else "vocab.json + merges.txt"
      raise UsageError(f"{hf_dir} has no tokenizer.json (nor {files})" +
                       (" (its spiece.model, sentencepiece's own format, is not read)"
                        if spiece else ""))
    tokenizer = tokenizers.ByteTokenizer()
  if tokenizer.vocab_size > cfg.vocab_size:
    raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                     f"vocab_size is {cfg.vocab_size}")
  if tokenizer.vocab_size < cfg.vocab_size:  # rows no token reaches (T5: 32100 of 32128)
    logging.warning("the model's vocab_size %d exceeds the tokenizer's %d tokens: the embedding "
                    "rows (and head columns) of ids %d.. are dropped", cfg.vocab_size,
                    tokenizer.vocab_size, tokenizer.vocab_size)
    params = trim_vocab(params, tokenizer.vocab_size)
  from lm import workdir as workdir_lib
  workdir_lib.check(workdir, "train")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UsageError(f"{workdir} already holds checkpoints: convert into a new directory")
  config = run_config(cfg, base_config)
  with config.unlocked():
    config.data.tokenizer = os.path.abspath(os.path.join(workdir, tokenizers.FILENAME))
    config.train.init_from = ""
    if cfg.arch == "encoder":  # what --mode=eval of the converted run evaluates
      config.train.task = "classify" if cfg.num_classes else "mlm"
    elif cfg.arch == "encoder_decoder":
      config.train.task = "seq2seq"
  run = train_lib.make_run(config, tokenizer.vocab_size)
  model = model_from_params(run.model_cfg, params)
  optimizer = nnx.Optimizer(model, run.tx, wrt=nnx.Param)
  state = jax.device_put(nnx.state((model, optimizer)), run.shardings)
  workdir_lib.commit(workdir, config, tokenizer, None, 0)  # all read and built: now write
  ckpt = ckpt_lib.Checkpointer(ckpt_dir)
  ckpt.save(0, state, {"config": config.to_dict(), "tokenizer": tokenizer.to_json(),
                       "seed": config.seed, "step": 0, "converted_from": os.path.abspath(hf_dir),
                       "hf_model_type": model_type_of(hf)})
  ckpt.close()
  return workdir


def workdir_to_hf(workdir: str, out_dir: str, model_type: str | None = None) -> str:
  """Exports the latest checkpoint of a run directory as model_type (None: the type it was
  converted from, else inferred from its shape); returns out_dir."""
  from lm import checkpoint as ckpt_lib
  from lm import runtime
  import ml_collections
  ckpt, meta = ckpt_lib.read_meta(workdir)
  ckpt.close()
  model_type = model_type or meta.get("hf_model_type")
  config = ml_collections.ConfigDict(meta["config"])
  run, state, tokenizer, _ = runtime.load(config, workdir)
  to_hf(nnx.merge(run.graphdef, state)[0], out_dir, tokenizer, model_type)
  return out_dir


def main(argv=None) -> int:
  from lm import cli
  parser = cli.ArgumentParser(prog="python -m lm.convert", description=__doc__.split("\n")[0])
  parser.add_argument("--hf_dir", required=True, help="Hugging Face model directory")
  parser.add_argument("--workdir", required=True, help="our run directory")
  parser.add_argument("--export", action="store_true",
                      help="write the workdir's latest checkpoint to --hf_dir instead")
  parser.add_argument("--model_type", choices=TYPES,
                      help="--export: the type to write (default: the one converted from, "
                      "else inferred from the model's shape)")
  args = parser.parse_args(argv)
  cli.quiet_library_logs()
  try:
    if args.export:
      workdir_to_hf(args.workdir, args.hf_dir, args.model_type)
      print(f"wrote {args.hf_dir}/config.json and model.safetensors", flush=True)
    else:
      hf_to_workdir(args.hf_dir, args.workdir)
      print(f"wrote {args.workdir}: checkpoints/0, config.json, tokenizer.json", flush=True)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  except OSError as e:  # read-only or full disk, ...
    print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}",
          file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

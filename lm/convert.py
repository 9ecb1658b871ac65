"""GPT-2 interop: Hugging Face GPT-2 checkpoints <-> our Transformer, without torch.

Import (a directory with config.json and model.safetensors, as `save_pretrained` writes it or
as the Hub serves it; read with the safetensors library's numpy API):

  python -m lm.convert --hf_dir=DIR --workdir=OUT
      writes OUT/checkpoints/0 (Orbax, the same train state a run saves: parameters plus a
      fresh optimizer), OUT/config.json and OUT/tokenizer.json, so that
      `experiments/run.py --workdir=OUT --mode=sample|eval` and `config.train.init_from=OUT`
      start from it.
  lm.convert.from_hf_gpt2(DIR) -> Transformer whose call on ids [B, T] gives logits [B, T, V].

Export: `python -m lm.convert --export --workdir=RUN --hf_dir=OUT` (or `to_hf_gpt2(model,
OUT)`) writes config.json and model.safetensors with GPT-2's names and layouts
(transformer.h.N.attn.c_attn.weight [d, 3d] in Conv1D (in, out) order, ...).

GPT-2 in our terms: learned positions, pre-LN, GELU (tanh approximation), LayerNorm eps from
the config (1e-5), biases everywhere, multi-head attention with scale 1/sqrt(head_dim), and
the output head tied to the token embedding (or `lm_head.weight` when untied).
"""

from __future__ import annotations

import copy
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import tokenizers
from lm.errors import UsageError
from lm.model import ModelConfig, Transformer

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # old causal-mask buffers


# --- config ----------------------------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise UsageError(f"no config.json in {hf_dir}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """Our ModelConfig for a Hugging Face GPT-2 config.json (rejects what we cannot express)."""
  if hf.get("model_type", "gpt2") != "gpt2":
    raise UsageError(f"model_type={hf.get('model_type')!r}: only GPT-2 checkpoints convert")
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
  fields = dict(vocab_size=hf["vocab_size"], max_seq_len=hf.get("n_positions", hf.get("n_ctx")),
                num_layers=hf["n_layer"], num_heads=hf["n_head"], num_kv_heads=0, d_model=d,
                d_ff=0 if n_inner in (None, 4 * d) else n_inner, positions="learned",
                norm="pre", mlp="gelu", use_bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True),
                ln_eps=hf.get("layer_norm_epsilon", 1e-5))
  fields.update(overrides)
  from lm.config import model_config
  try:
    return model_config(**fields)
  except ValueError as e:
    raise UsageError(str(e)) from None


def hf_config_from_model(cfg: ModelConfig) -> dict:
  problems = [f"{name}={getattr(cfg, name)!r} (GPT-2: {want!r})" for name, want in
              (("positions", "learned"), ("norm", "pre"), ("mlp", "gelu"), ("use_bias", True))
              if getattr(cfg, name) != want]
  if cfg.kv_heads != cfg.num_heads:
    problems.append(f"num_kv_heads={cfg.num_kv_heads} (GPT-2 has multi-head attention)")
  if problems:
    raise UsageError("the model is not GPT-2 shaped: " + ", ".join(problems))
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


# --- weights ---------------------------------------------------------------------------------

def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors (or the shards its index names), as numpy arrays."""
  from safetensors.numpy import load_file
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      files = [os.path.join(hf_dir, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    raise UsageError(f"no model.safetensors in {hf_dir} (only safetensors weights are read)")
  tensors = {}
  for path in files:
    try:
      tensors.update(load_file(path))
    except Exception as e:  # a corrupt file or a dtype numpy lacks (bf16)
      raise UsageError(f"{path}: cannot read with safetensors.numpy ({e})") from None
  return tensors


def _strip(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, value in tensors.items():
    if name.endswith(_IGNORED_SUFFIXES):
      continue
    out[name[len("transformer."):] if name.startswith("transformer.") else name] = value
  return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """GPT-2 tensors -> our parameters as a pure dict (the layout of nnx.State.to_pure_dict)."""
  t = _strip(tensors)
  used = set()

  def get(name, shape):
    if name not in t:
      raise UsageError(f"the checkpoint lacks {name!r}")
    x = np.asarray(t[name], np.float32)
    if x.shape != tuple(shape):
      raise UsageError(f"{name}: shape {x.shape}, expected {tuple(shape)} from config.json")
    used.add(name)
    return x

  d, h, hd, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.ff_dim, cfg.vocab_size
  params = {"embed": get("wte.weight", (v, d)), "pos_embed": get("wpe.weight", (cfg.max_seq_len, d)),
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
  if not cfg.tie_embeddings:
    params["head"] = get("lm_head.weight", (v, d)).T
  elif "lm_head.weight" in t:
    used.add("lm_head.weight")  # a tied copy of wte
  extra = sorted(set(t) - used)
  if extra:
    raise UsageError(f"unexpected tensors in the checkpoint: {', '.join(extra[:5])}"
                     + (" ..." if len(extra) > 5 else ""))
  return params


def hf_tensors_from_params(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Inverse of params_from_hf, with the names `GPT2LMHeadModel.save_pretrained` writes."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
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
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["head"].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def model_from_params(cfg: ModelConfig, params: dict) -> Transformer:
  """A Transformer holding `params` (a pure dict), allocating nothing else."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def from_hf_gpt2(hf_dir: str, **overrides) -> Transformer:
  """Our model with the weights of a Hugging Face GPT-2 directory (config.json +
  model.safetensors). overrides set ModelConfig fields that do not change shapes (e.g.
  attention_impl, dtype)."""
  cfg = model_config_from_hf(read_hf_config(hf_dir), **overrides)
  return model_from_params(cfg, params_from_hf(read_safetensors(hf_dir), cfg))


def to_hf_gpt2(model: Transformer, out_dir: str, tokenizer=None) -> None:
  """Writes config.json and model.safetensors (float32) in GPT-2's format; tokenizer.json too
  when `tokenizer` is a BPE one."""
  from safetensors.numpy import save_file
  cfg = model.cfg
  hf = hf_config_from_model(cfg)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params.pop("cls_head", None), params.pop("cls_bias", None)
  os.makedirs(out_dir, exist_ok=True)
  save_file(hf_tensors_from_params(params, cfg), os.path.join(out_dir, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None and tokenizer.kind == "bpe":
    tokenizers.save(tokenizer, out_dir)


# --- tokenizers ------------------------------------------------------------------------------

def load_hf_tokenizer(hf_dir: str):
  """tokenizer.json (the `tokenizers` library), else vocab.json + merges.txt (GPT-2's byte-level
  BPE); None when the directory has neither."""
  if os.path.isfile(os.path.join(hf_dir, tokenizers.FILENAME)):
    return tokenizers.load(hf_dir)
  vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
  if os.path.isfile(vocab) and os.path.isfile(merges):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tokenizers.BPETokenizer(tok)
  return None


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
    config.data.seq_len = min(config.data.seq_len, cfg.max_seq_len)
  return config


def hf_to_workdir(hf_dir: str, workdir: str, tokenizer=None, base_config=None) -> str:
  """Converts a Hugging Face GPT-2 directory into a run directory at step 0; returns it."""
  from lm import checkpoint as ckpt_lib
  from lm import train as train_lib
  hf = read_hf_config(hf_dir)
  cfg = model_config_from_hf(hf)
  tokenizer = tokenizer or load_hf_tokenizer(hf_dir)
  if tokenizer is None:
    if cfg.vocab_size != 256:
      raise UsageError(f"{hf_dir} has no tokenizer.json (nor vocab.json + merges.txt)")
    tokenizer = tokenizers.ByteTokenizer()
  if tokenizer.vocab_size != cfg.vocab_size:
    raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                     f"vocab_size is {cfg.vocab_size}")
  from lm import workdir as workdir_lib
  workdir_lib.check(workdir, "train")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UsageError(f"{workdir} already holds checkpoints: convert into a new directory")
  config = run_config(cfg, base_config)
  with config.unlocked():
    config.data.tokenizer = os.path.abspath(os.path.join(workdir, tokenizers.FILENAME))
    config.train.init_from = ""
  run = train_lib.make_run(config, tokenizer.vocab_size)
  model = model_from_params(run.model_cfg, params_from_hf(read_safetensors(hf_dir), cfg))
  optimizer = nnx.Optimizer(model, run.tx, wrt=nnx.Param)
  state = jax.device_put(nnx.state((model, optimizer)), run.shardings)
  workdir_lib.commit(workdir, config, tokenizer, None, 0)  # all read and built: now write
  ckpt = ckpt_lib.Checkpointer(ckpt_dir)
  ckpt.save(0, state, {"config": config.to_dict(), "tokenizer": tokenizer.to_json(),
                       "seed": config.seed, "step": 0, "converted_from": os.path.abspath(hf_dir)})
  ckpt.close()
  return workdir


def workdir_to_hf(workdir: str, out_dir: str) -> str:
  """Exports the latest checkpoint of a run directory in GPT-2's format; returns out_dir."""
  from lm import checkpoint as ckpt_lib
  from lm import runtime
  import ml_collections
  ckpt, meta = ckpt_lib.read_meta(workdir)
  ckpt.close()
  config = ml_collections.ConfigDict(meta["config"])
  run, state, tokenizer, _ = runtime.load(config, workdir)
  to_hf_gpt2(nnx.merge(run.graphdef, state)[0], out_dir, tokenizer)
  return out_dir


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m lm.convert", description=__doc__.split("\n")[0])
  parser.add_argument("--hf_dir", required=True, help="Hugging Face GPT-2 directory")
  parser.add_argument("--workdir", required=True, help="our run directory")
  parser.add_argument("--export", action="store_true",
                      help="write the workdir's latest checkpoint to --hf_dir instead")
  args = parser.parse_args(argv)
  try:
    if args.export:
      workdir_to_hf(args.workdir, args.hf_dir)
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

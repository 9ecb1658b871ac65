"""Every config field's type and valid range, checked in one place before a run touches disk.

`check_config(config, mode)` raises UsageError naming the first bad field, its value and what
is allowed ("train.batch_size=0: expected an integer >= 1"). experiments/run.py calls it
before anything else (train, eval and sample, every task); lm/runtime.py calls it too, for
library use. Checks that need a checkpoint or the data (a resumed run's shape, the
vocabulary, batch sizes over the devices) follow in the jobs themselves, still before the
workdir is written (lm/workdir.py).

A field is (path, type, test, what is allowed). Optional sections and fields (
classify.*, sample.stop_token) are checked when present.
"""

from __future__ import annotations

import math
import os

from lm.errors import UsageError
from lm.tasks import NAMES

TASKS = tuple(NAMES)  # the objectives of lm/tasks/
ATTENTION_IMPLS = ("xla", "cudnn", "triton", "triton_softmax", "auto")  # = attention.IMPLS
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "tensor")
REMAT_POLICIES = ("auto", "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable", "everything_saveable")  # = lm.layers.REMAT_POLICIES


def _at_least(lo):
  return (lambda v: v >= lo), f">= {lo}"


F32_MAX = 3.4028234663852886e38  # larger floats become inf in the float32 computation


def _finite(v) -> bool:
  return math.isfinite(v) and abs(v) <= F32_MAX


def _positive():
  return (lambda v: _finite(v) and v > 0), "> 0 (finite in float32)"


def _in(lo, hi, lo_open=False, hi_open=True):
  def test(v):
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  return test, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _one_of(*allowed):
  return (lambda v: v in allowed), f"one of {', '.join(allowed)}"


def _tokenizer(v):
  if v in ("char", "byte", "bpe", "wordpiece"):
    return True
  path = v if v.endswith(".json") else os.path.join(v, "tokenizer.json")
  return os.path.isfile(path)


_ANY = (lambda v: True), "any"
POS, NONNEG = _at_least(1), _at_least(0)

# (path, type, (test, allowed)); int accepts no bool, float accepts int.
FIELDS = (
    ("seed", int, ((lambda v: 0 <= v < 2**31), "in [0, 2**31)")),
    ("model.arch", str, _one_of("decoder", "encoder", "encoder_decoder")),
    ("model.num_layers", int, POS),
    ("model.num_heads", int, POS),
    ("model.num_kv_heads", int, NONNEG),
    ("model.d_model", int, POS),
    ("model.d_ff", int, NONNEG),
    ("model.dropout", float, _in(0, 1)),
    ("model.attention_impl", str, _one_of(*ATTENTION_IMPLS)),
    ("model.positions", str, _one_of("rope", "learned", "relative")),
    ("model.norm", str, _one_of("pre", "post")),
    ("model.norm_type", str, _one_of("layernorm", "rmsnorm")),
    ("model.mlp", str, _one_of("gelu", "gelu_erf", "swiglu", "relu", "gated_gelu")),
    ("model.use_bias", bool, _ANY),
    ("model.qkv_bias", bool, _ANY),
    ("model.tie_embeddings", bool, _ANY),
    ("model.max_seq_len", int, POS),
    ("model.ln_eps", float, _positive()),
    ("model.rope_theta", float, _positive()),
    ("model.rope_scaling", str, _ANY),  # its form: ModelConfig (lm.model.parse_rope_scaling)
    ("model.dtype", str, _one_of(*DTYPES)),
    ("model.num_classes", int, NONNEG),
    ("model.attention_window", int, ((lambda v: v >= -1), ">= -1 (-1: the trained window, "
                                                          "0: full)")),
    ("model.type_vocab_size", int, NONNEG),
    ("model.mlm_head", bool, _ANY),
    ("model.pooler", bool, _ANY),
    ("model.scan_layers", bool, _ANY),
    ("model.remat", str, _one_of(*REMAT_POLICIES)),
    ("model.d_kv", int, NONNEG),
    ("model.num_decoder_layers", int, NONNEG),
    ("model.relative_buckets", int, NONNEG),
    ("model.relative_max_distance", int, NONNEG),
    ("model.decoder_start_id", int, NONNEG),
    ("model.relative_bias_init", float, ((lambda v: _finite(v) and v >= 0), ">= 0 (finite)")),
    ("data.path", str, _ANY),
    ("data.tokenizer", str, (_tokenizer, "one of char, byte, bpe, wordpiece or the path of a "
                                         "tokenizer.json (or of its directory)")),
    ("data.vocab_size", int, _at_least(2)),
    ("data.seq_len", int, POS),
    ("data.val_fraction", float, _in(0, 1, lo_open=True)),
    ("data.text_field", str, ((lambda v: v != ""), "a non-empty field name")),
    ("data.token_dtype", str, _one_of("uint16", "uint32")),
    ("train.task", str, _one_of(*TASKS)),
    ("train.num_steps", int, POS),
    ("train.batch_size", int, POS),
    ("train.grad_accum", int, POS),
    ("train.learning_rate", float, _positive()),
    ("train.min_lr_ratio", float, _in(0, 1, hi_open=False)),
    ("train.warmup_steps", int, NONNEG),
    ("train.weight_decay", float, ((lambda v: _finite(v) and v >= 0), ">= 0 (finite)")),
    ("train.beta1", float, _in(0, 1)),
    ("train.beta2", float, _in(0, 1)),
    ("train.adam_eps", float, _positive()),
    ("train.grad_clip", float, _positive()),
    ("train.log_every", int, POS),
    ("train.eval_every", int, POS),
    ("train.eval_batches", int, POS),
    ("train.eval_batch_size", int, POS),
    ("train.checkpoint_every", int, POS),
    ("train.keep_checkpoints", int, POS),
    ("train.init_from", str, _ANY),
    ("train.relative_bias_lr", float, _positive()),
    ("mesh.data", int, ((lambda v: v == -1 or v >= 1), "-1 (the remaining devices) or >= 1")),
    ("mesh.fsdp", int, ((lambda v: v == -1 or v >= 1), "-1 (the remaining devices) or >= 1")),
    ("mesh.tensor", int, ((lambda v: v == -1 or v >= 1), "-1 (the remaining devices) or >= 1")),
    ("sample.num_samples", int, NONNEG),
    ("sample.max_new_tokens", int, POS),
    ("sample.temperature", float, ((lambda v: _finite(v) and v >= 0),
                                   ">= 0 (0 is greedy), finite in float32")),
    ("sample.top_k", int, ((lambda v: v >= 0), ">= 0 (0 keeps every token)")),
    ("sample.top_p", float, _in(0, 1, lo_open=True, hi_open=False)),
    ("sample.prompt", str, _ANY),
    ("sample.seed", int, NONNEG),
    ("sample.stop_token", int, ((lambda v: v >= -1), ">= -1 (-1: none)")),
    ("sample.num_beams", int, ((lambda v: v >= 1), ">= 1 (1: sampling, no beam search)")),
    ("sample.length_penalty", float, ((lambda v: abs(v) <= 1e3), "in [-1000, 1000]")),
    ("sample.early_stopping", bool, _ANY),
    ("classify.min_chars", int, NONNEG),
    ("classify.balanced", bool, _ANY),
    ("classify.genres", str, _ANY),
    ("mlm.mask_prob", float, _in(0, 1, lo_open=True)),
    ("mlm.whole_word", bool, _ANY),
    ("seq2seq.input_field", str, ((lambda v: v != ""), "a non-empty field name")),
    ("seq2seq.target_field", str, ((lambda v: v != ""), "a non-empty field name")),
    ("seq2seq.max_target_len", int, _at_least(2)),
    ("seq2seq.eval_generate", int, NONNEG),
    ("seq2seq.length_buckets", int, POS),
    ("seq2seq.max_chars", int, _at_least(2)),
    ("span_corruption.noise_density", float, _in(0, 1, lo_open=True)),
    ("span_corruption.mean_span", float, ((lambda v: _finite(v) and v >= 1), ">= 1")),
)
REQUIRED_SECTIONS = ("model", "data", "train", "mesh", "sample")
OPTIONAL = {"sample.stop_token", "sample.num_beams", "sample.length_penalty",
            "sample.early_stopping", "classify.min_chars", "classify.balanced",
            "classify.genres", "mlm.mask_prob", "mlm.whole_word",
            "model.norm_type", "model.qkv_bias", "model.rope_scaling",  # absent before issue 16
            "model.attention_window",  # absent before issue 18
            "model.arch", "model.type_vocab_size", "model.mlm_head", "model.pooler",  # issue 14
            "model.scan_layers", "model.remat",  # absent before issue 17
            "model.d_kv", "model.num_decoder_layers", "model.relative_buckets",  # issue 15
            "model.relative_max_distance", "model.decoder_start_id",
            "model.relative_bias_init", "train.relative_bias_lr",
            "seq2seq.input_field", "seq2seq.target_field", "seq2seq.max_target_len",
            "seq2seq.eval_generate", "seq2seq.length_buckets", "seq2seq.max_chars",
            "span_corruption.noise_density",
            "span_corruption.mean_span"}
# The model families each task trains (model.arch).
TASK_ARCHS = {"lm": ("decoder",), "mlm": ("encoder",), "classify": ("decoder", "encoder"),
              "seq2seq": ("encoder_decoder",), "span_corruption": ("encoder_decoder",)}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _lookup(config, path):
  node = config
  for part in path.split("."):
    if node is None or not hasattr(node, "get") or part not in node:
      return False, None
    node = node[part]
  return True, node


def _check_field(path, value, kind, test, allowed):
  if kind is float:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif kind is int:
    ok_type = isinstance(value, int) and not isinstance(value, bool)
  else:
    ok_type = isinstance(value, kind)
  if not ok_type:
    raise UsageError(f"{path}={value!r}: expected {_TYPE_NAMES[kind]}"
                     + ("" if allowed == "any" else f" {allowed}"))
  if not test(value):
    what = allowed if allowed.startswith("one of") else f"{_TYPE_NAMES[kind]} {allowed}"
    raise UsageError(f"{path}={value!r}: expected {what}")


def _check_rules(rules):
  try:
    pairs = [tuple(r) for r in rules]
    ok = all(len(p) == 2 and isinstance(p[0], str) for p in pairs)
    for _, target in pairs if ok else ():
      targets = (target,) if isinstance(target, str) or target is None else tuple(target)
      ok = ok and all(t is None or t in MESH_AXES for t in targets)
  except TypeError:
    ok = False
  if not ok:
    raise UsageError(f"mesh.rules={rules!r}: expected (logical axis, mesh axis or tuple of "
                     f"them) pairs over the mesh axes {', '.join(MESH_AXES)}")


# The tasks whose models generate text (--mode=sample): a decoder's and an encoder-decoder's.
GENERATING_TASKS = ("lm", "seq2seq", "span_corruption")


def check_model_fields(fields: dict, prefix: str = "") -> None:
  """UsageError (its message after `prefix`) for the first of `fields` (model field name ->
  value, e.g. read from a Hugging Face config.json) whose type or range model.<name> forbids."""
  for path, kind, (test, allowed) in FIELDS:
    section, _, name = path.partition(".")
    if section == "model" and name in fields:
      try:
        _check_field(path, fields[name], kind, test, allowed)
      except UsageError as e:
        raise UsageError(f"{prefix}{e}") from None


def check_config(config, mode: str = "train") -> None:
  """Raises UsageError for the first ill-typed, out-of-range or inconsistent field.

  mode: "train", "eval" or "sample". The model's shape fields are checked against each other
  only for a fresh training run: eval, sample, resume and init_from take them from a
  checkpoint (checked when it is read, by ModelConfig).
  """
  for section in REQUIRED_SECTIONS:
    if section not in config:
      raise UsageError(f"the config has no {section!r} section (start from experiments/base.py)")
  for path, kind, (test, allowed) in FIELDS:
    present, value = _lookup(config, path)
    if not present:
      if path in OPTIONAL:
        continue
      raise UsageError(f"the config has no field {path} (start from experiments/base.py)")
    _check_field(path, value, kind, test, allowed)
  _check_rules(config.mesh.rules)
  tc, model = config.train, config.model
  if tc.warmup_steps > tc.num_steps:
    raise UsageError(f"train.warmup_steps={tc.warmup_steps}: expected <= train.num_steps="
                     f"{tc.num_steps}")
  if tc.batch_size % tc.grad_accum:
    raise UsageError(f"train.batch_size={tc.batch_size}: expected a multiple of "
                     f"train.grad_accum={tc.grad_accum} (the micro-batches are equal)")
  beams = config.sample.get("num_beams", 1)
  if beams > 1 and config.sample.num_samples > beams:
    raise UsageError(f"sample.num_samples={config.sample.num_samples}: expected <= "
                     f"sample.num_beams={beams} (beam search returns its best beams)")
  if mode == "sample" and config.sample.num_samples < 1:
    raise UsageError(f"sample.num_samples={config.sample.num_samples}: expected an integer >= 1 "
                     f"(--num_samples) to sample")
  if mode == "sample" and tc.task not in GENERATING_TASKS:
    raise UsageError(f"train.task={tc.task!r}: --mode=sample needs a language model (task "
                     f"{' or '.join(GENERATING_TASKS)}); a {tc.task} model has no text to "
                     f"generate")
  arch = model.get("arch", "decoder")
  if arch not in TASK_ARCHS[tc.task]:
    want = " or ".join(repr(a) for a in TASK_ARCHS[tc.task])
    hint = {"mlm": " (experiments/bert_mlm.py is an encoder config)",
            "seq2seq": " (experiments/t5_restore.py is an encoder-decoder config)",
            "span_corruption": " (experiments/t5_span.py is an encoder-decoder config)"}
    raise UsageError(f"train.task={tc.task!r} needs model.arch={want}, the config says "
                     f"{arch!r}" + hint.get(tc.task, ""))
  if tc.task == "mlm" and not model.get("mlm_head", False):
    raise UsageError("train.task='mlm' needs model.mlm_head=True (the masked-LM head)")
  if mode == "train" and not tc.init_from:
    model_config(config, vocab_size=1)


def model_config(config, vocab_size: int):
  """The ModelConfig of `config` (its model fields against each other: divisibility, head_dim,
  the context data.seq_len needs); UsageError if they disagree."""
  from lm.model import ModelConfig
  try:
    cfg = ModelConfig.from_config(config.model, vocab_size, auto_window=config.data.seq_len)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if config.data.seq_len > cfg.max_seq_len and bounded_by_max_seq_len(config.model):
    raise UsageError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
                     f"{cfg.max_seq_len}")
  return cfg


def bounded_by_max_seq_len(model) -> bool:
  """Whether sequences of the config.model section `model` must fit in model.max_seq_len:
  learned positions end there, and so does full attention's trained context; rotary positions
  under an explicit window (attention_window > 0) run at any length."""
  return model.positions == "learned" or model.get("attention_window", -1) <= 0

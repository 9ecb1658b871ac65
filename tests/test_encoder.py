"""The BERT-style encoder (lm.model.Encoder): bidirectional, blind to padding, the same with
the Triton kernels as with XLA, heads present as configured, and bad configs refused.
Its numerics against an independent numpy BERT: tests/test_convert_bert.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import model_config
from lm.errors import UsageError
from lm.model import Encoder, build
from tests.conftest import assert_trains_like_one_device


def bert(**kw):
  base = dict(arch="encoder", vocab_size=50, max_seq_len=32, num_layers=2, num_heads=4,
              d_model=32, d_ff=64, positions="learned", norm="post", mlp="gelu_erf",
              use_bias=True, type_vocab_size=2, mlm_head=True, num_classes=3,
              attention_impl="xla", ln_eps=1e-12)
  return model_config(**{**base, **kw})


def test_changing_a_later_token_changes_earlier_outputs():
  """The encoder's counterpart of the causality test (fails with causal attention: checked by
  building the blocks with causal=True)."""
  model = build(bert(), nnx.Rngs(0))
  assert isinstance(model, Encoder)
  tokens = np.random.default_rng(1).integers(0, 50, (2, 12))
  base = np.asarray(model(jnp.asarray(tokens)))
  assert base.shape == (2, 12, 50)
  changed = tokens.copy()
  changed[:, -1] = (changed[:, -1] + 1) % 50
  out = np.asarray(model(jnp.asarray(changed)))
  for t in range(11):  # every earlier position sees the last token
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-4, t


@pytest.mark.parametrize("variant", [dict(), dict(norm="pre", positions="rope", mlp="swiglu",
                                                  use_bias=False, tie_embeddings=False)])
def test_pad_tokens_change_no_real_position(variant):
  """Rows right-padded to different lengths: pad ids (any) change no real position's MLM
  logits, the pooled [CLS] or the class logits, and a row's real part equals the same tokens
  run alone without padding (fails when the mask is dropped: checked)."""
  model = build(bert(**variant), nnx.Rngs(0))
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, 50, (3, 16))
  lengths = np.array([16, 9, 4])
  mask = (np.arange(16) < lengths[:, None]).astype(np.int32)
  types = (np.arange(16) >= 3).astype(np.int32) * mask  # segment B from position 3
  other = np.where(mask == 1, tokens, rng.integers(0, 50, tokens.shape))
  assert (other != tokens).any()
  a = np.asarray(model(jnp.asarray(tokens), mask, types))
  b = np.asarray(model(jnp.asarray(other), mask, types))
  real = mask.astype(bool)
  np.testing.assert_allclose(a[real], b[real], atol=1e-5)
  np.testing.assert_allclose(model.classify(tokens, mask, types), model.classify(other, mask, types),
                             atol=1e-5)
  for i, n in enumerate(lengths):
    alone = np.asarray(model(jnp.asarray(tokens[i:i + 1, :n]), None, types[i:i + 1, :n]))
    np.testing.assert_allclose(a[i, :n], alone[0], atol=1e-4)
  # token types matter (segment B differs from A)
  c = np.asarray(model(jnp.asarray(tokens), mask, np.zeros_like(types)))
  assert np.abs(c[0, 5] - a[0, 5]).max() > 1e-4


@pytest.mark.parametrize("impl", ["triton", "triton_softmax"])
def test_triton_attention_in_the_encoder_matches_xla(impl):
  """MLM loss and every gradient of a tiny encoder with padding: the Triton kernels (CPU
  interpreter) against the XLA path."""
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, 50, (2, 12)))
  mask = jnp.asarray((np.arange(12) < np.array([[12], [7]])).astype(np.int32))

  def loss_and_grads(attention_impl):
    model = build(bert(num_layers=1, num_heads=2, d_model=32, attention_impl=attention_impl),
                  nnx.Rngs(0))

    def loss_fn(m):
      logits = m(tokens, mask)
      return (jnp.log(jnp.sum(jnp.exp(logits), -1)) * mask).sum() + m.classify(tokens, mask).sum()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    return float(loss), nnx.to_flat_state(grads)

  want_loss, want = loss_and_grads("xla")
  got_loss, got = loss_and_grads(impl)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  assert len(got) == len(want) > 10
  for (path, g), (_, w) in zip(got, want):
    np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(w.get_value()), rtol=1e-4,
                               atol=1e-5, err_msg=str(path))


def test_heads_follow_the_config_and_missing_ones_are_refused():
  plain = build(bert(mlm_head=False, num_classes=0), nnx.Rngs(0))
  tokens = np.zeros((1, 5), np.int32)
  assert plain(tokens).shape == (1, 5, 32)  # hidden states without an MLM head
  with pytest.raises(UsageError, match="no classification head"):
    plain.classify(tokens)
  with pytest.raises(UsageError, match="no pooler"):
    plain.pooled(tokens)
  assert build(bert(mlm_head=False, num_classes=0, pooler=True), nnx.Rngs(0)).pooled(
      tokens).shape == (1, 32)
  with pytest.raises(ValueError, match="model.arch='bidirectional' is not one of"):
    bert(arch="bidirectional")
  with pytest.raises(ValueError, match="model.mlm_head=True is for model.arch='encoder'"):
    bert(arch="decoder", type_vocab_size=0, num_classes=0)


EIGHT_DEVICE_WORKER = r'''
import json, sys, types
import jax, numpy as np
from flax import nnx
from experiments import base
from lm import sharding, tasks, tokenizers, train
from lm.config import bert_model
from lm.tasks import mlm

c = base.get_config()
bert_model(c.model, num_layers=2, num_heads=8, d_model=64, d_ff=128, max_seq_len=32)
c.model.attention_impl, c.model.num_classes = "xla", 0
c.data.seq_len, c.train.batch_size, c.train.num_steps, c.train.warmup_steps = 32, 8, 3, 1
c.train.learning_rate, c.train.adam_eps, c.train.task = 1e-2, 1e-3, "mlm"  # as sharding_worker
tok = tokenizers.CharTokenizer.train("abcdefghijklmnopqrstuvwxyz", tokenizers.CHAR_SPECIALS)
masker = mlm.Masker(tok, 0.15, False)
rng = np.random.default_rng(0)
batches = []
for step in range(3):
  windows = rng.integers(256, 256 + 26, (8, 30))
  windows[1, 20:] = -1  # a padded row
  tokens, mask = mlm.wrap(windows, masker.ids, 32)
  b = masker(tokens, np.random.default_rng(step), mlm.max_predictions(32, 0.15))
  b["attention_mask"] = mask
  batches.append({k: v[None] for k, v in b.items()})
out = {}
for shape in ((1, 1, 1), (2, 2, 2), (1, 1, 8), (8, 1, 1)):
  devices = jax.devices()[:1] if shape == (1, 1, 1) else None
  mesh = sharding.make_mesh(types.SimpleNamespace(data=shape[0], fsdp=shape[1], tensor=shape[2]),
                            devices)
  run = train.make_run(c, tok.vocab_size, mesh=mesh)
  with jax.set_mesh(mesh):
    state = train.init_state(run, 0)
    step_fn = train.make_train_step(run, tasks.get("mlm").loss)
    losses = []
    for i, b in enumerate(batches):
      state, metrics = step_fn(state, train.put_batch(run, b, micro=True), i)
      losses.append(float(metrics["train_loss"]))
  params = {"/".join(map(str, p)): np.asarray(v.get_value()).tolist()
            for p, v in nnx.to_flat_state(state[0])}
  out[str(shape)] = {"losses": losses, "params": params}
json.dump(out, open(sys.argv[1], "w"))
'''


@pytest.mark.slow
def test_encoder_trains_under_8_devices_like_on_one(tmp_path):
  """MLM steps of an encoder (padding included) on 8 fake CPU devices under data, FSDP,
  tensor and mixed meshes: the same losses and parameters as on one device."""
  assert_trains_like_one_device(EIGHT_DEVICE_WORKER, tmp_path)


def test_checkpoints_from_before_the_encoder_fields_still_resume(make_config):
  """A checkpoint config without arch, type_vocab_size, mlm_head, pooler is a decoder's
  (lm.layers.LEGACY_DEFAULTS); without them: "has model.arch=None but the config says ...")."""
  from lm import runtime
  config = make_config()
  saved = config.to_dict()
  for field in ("arch", "type_vocab_size", "mlm_head", "pooler"):
    del saved["model"][field]
  runtime.check_resumable(saved, config)
  config.model.arch = "encoder"
  with pytest.raises(UsageError, match="model.arch='decoder' but the config says 'encoder'"):
    runtime.check_resumable(saved, config)

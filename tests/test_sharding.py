"""Sharding: meshes, rules, golden partition specs, and 8-device training equal to 1 device.

The 8-device checks run tests/sharding_worker.py in two subprocesses (XLA_FLAGS must be set
before jax starts; this process keeps its one CPU device), one for the xla attention plus
checkpoints and shardings, one for the Triton kernel on its CPU interpreter, side by side.
"""

import json
import math
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from lm import sharding, train
from lm.errors import UsageError
from tests.conftest import FAKE_DEVICE_ENV, ROOT

MESHES = ("(8, 1, 1)", "(1, 8, 1)", "(1, 1, 8)", "(2, 2, 2)")

# Golden partition specs: parameter (layer index dropped) -> its spec under each rule set of
# lm.sharding.RULE_SETS, in the order of RULE_COLUMNS (the default rules first), on a mesh
# where every mesh axis divides every dimension. Stacked layers (model.scan_layers) have the
# same spec after a leading None: no rule maps their "layers" axis to a mesh axis. Together the MODELS below have every
# optional parameter (biases, swiglu, untied head, learned positions, GQA, classifier head).
RULE_COLUMNS = ("fsdp_tp", "fsdp", "tp", "dp")
GOLDEN = {
    "embed": (("tensor", "fsdp"), (None, "fsdp"), ("tensor", None), (None, None)),
    "pos_embed": ((None, "fsdp"), (None, "fsdp"), (None, None), (None, None)),
    "head": (("fsdp", "tensor"), ("fsdp", None), (None, "tensor"), (None, None)),
    "cls_head": (("fsdp", None), ("fsdp", None), (None, None), (None, None)),
    "cls_bias": ((None,), (None,), (None,), (None,)),
    "ln_f/scale": ((None,), (None,), (None,), (None,)),
    "ln_f/bias": ((None,), (None,), (None,), (None,)),
    "blocks/ln1/scale": ((None,), (None,), (None,), (None,)),
    "blocks/ln1/bias": ((None,), (None,), (None,), (None,)),
    "blocks/ln2/scale": ((None,), (None,), (None,), (None,)),
    "blocks/ln2/bias": ((None,), (None,), (None,), (None,)),
    "blocks/attn/wq": (("fsdp", "tensor", None), ("fsdp", None, None), (None, "tensor", None),
                       (None, None, None)),
    "blocks/attn/wk": (("fsdp", "tensor", None), ("fsdp", None, None), (None, "tensor", None),
                       (None, None, None)),
    "blocks/attn/wv": (("fsdp", "tensor", None), ("fsdp", None, None), (None, "tensor", None),
                       (None, None, None)),
    "blocks/attn/wo": (("tensor", "fsdp"), (None, "fsdp"), ("tensor", None), (None, None)),
    "blocks/attn/bq": (("tensor", None), (None, None), ("tensor", None), (None, None)),
    "blocks/attn/bk": (("tensor", None), (None, None), ("tensor", None), (None, None)),
    "blocks/attn/bv": (("tensor", None), (None, None), ("tensor", None), (None, None)),
    "blocks/attn/bo": (("fsdp",), ("fsdp",), (None,), (None,)),
    "blocks/mlp/w_in": (("fsdp", "tensor"), ("fsdp", None), (None, "tensor"), (None, None)),
    "blocks/mlp/w_gate": (("fsdp", "tensor"), ("fsdp", None), (None, "tensor"), (None, None)),
    "blocks/mlp/w_out": (("tensor", "fsdp"), (None, "fsdp"), ("tensor", None), (None, None)),
    "blocks/mlp/b_in": (("tensor",), (None,), ("tensor",), (None,)),
    "blocks/mlp/b_out": (("fsdp",), ("fsdp",), (None,), (None,)),
    # the encoder's (lm.model.Encoder)
    "type_embed": ((None, "fsdp"), (None, "fsdp"), (None, None), (None, None)),
    "emb_ln/scale": ((None,), (None,), (None,), (None,)),
    "emb_ln/bias": ((None,), (None,), (None,), (None,)),
    "mlm_w": (("fsdp", None), ("fsdp", None), (None, None), (None, None)),
    "mlm_b": ((None,), (None,), (None,), (None,)),
    "mlm_ln/scale": ((None,), (None,), (None,), (None,)),
    "mlm_ln/bias": ((None,), (None,), (None,), (None,)),
    "mlm_bias": (("tensor",), (None,), ("tensor",), (None,)),
    "pool_w": (("fsdp", None), ("fsdp", None), (None, None), (None, None)),
    "pool_b": ((None,), (None,), (None,), (None,)),
}

# The model variants we have; each a few layers of d_model 64, 8 heads, d_ff 128, vocab 64.
MODELS = {
    "gpt2_like": dict(use_bias=True, mlp="gelu", tie_embeddings=False, positions="learned"),
    "llama_like": dict(use_bias=False, mlp="swiglu", tie_embeddings=True, positions="rope"),
    "gqa": dict(num_kv_heads=4, use_bias=True, mlp="swiglu"),
    "classifier": dict(num_classes=6, mlp="gelu"),
    "bert_like": dict(arch="encoder", positions="learned", norm="post", mlp="gelu_erf",
                      use_bias=True, type_vocab_size=2, mlm_head=True, num_classes=6),
}


def golden_key(path: str):
  """'0/blocks/1/attn/wq' or '1/opt_state/1/0/mu/blocks/1/attn/wq' -> 'blocks/attn/wq';
  None for optimizer entries that are not moments (step, count)."""
  parts = path.split("/")
  if parts[0] == "1":
    moment = [i for i, p in enumerate(parts) if p in ("mu", "nu")]
    if not moment:
      return None
    parts = parts[moment[0]:]
  return "/".join(p for p in parts[1:] if not p.isdigit())


def golden_spec(key, which, path=""):
  """The golden spec of `key`; with a leading None for the path of a stacked layer."""
  parts = path.split("/")
  stacked = "blocks" in parts and not parts[parts.index("blocks") + 1].isdigit()
  return P(*((None,) * stacked + GOLDEN[key][RULE_COLUMNS.index(which)]))


def _config(**model):
  from experiments import base
  c = base.get_config()
  c.model.update(num_layers=2, d_model=64, num_heads=8, d_ff=128, **model)
  return c


# ---------------------------------------------------------------- in this process (1 device)


def test_mesh_sizes_must_match_the_devices():
  ns = types.SimpleNamespace
  assert dict(sharding.make_mesh(ns(data=-1, fsdp=1, tensor=1)).shape) == {
      "data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(UsageError, match="but there are 1 devices"):
    sharding.make_mesh(ns(data=2, fsdp=1, tensor=1))
  with pytest.raises(UsageError, match="at most one"):
    sharding.make_mesh(ns(data=-1, fsdp=-1, tensor=1))
  with pytest.raises(UsageError, match="do not fit"):
    sharding.make_mesh(ns(data=-1, fsdp=2, tensor=1))


def test_a_mesh_axis_is_used_once_per_array():
  rules = (("embed", "fsdp"), ("batch", ("data", "fsdp")), ("heads", "tensor"))
  assert sharding.logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("embed", "batch"), rules) == P("fsdp", "data")
  assert sharding.logical_to_spec(("embed", "heads", "x"), rules) == P("fsdp", "tensor", None)


def test_the_golden_table_covers_every_rule_set_default_first():
  from experiments import base
  assert set(RULE_COLUMNS) == set(sharding.RULE_SETS)
  assert sharding.RULE_SETS[RULE_COLUMNS[0]] == sharding.DEFAULT_RULES == base.get_config().mesh.rules


@pytest.mark.parametrize("which", RULE_COLUMNS)
def test_golden_partition_specs(which):
  """Every parameter and both Adam moments of every model variant shard exactly as the golden
  table says, under every rule set. Checked to fail: removing ("mlp", "tensor") from
  DEFAULT_RULES fails the default (fsdp_tp) column on w_in, w_gate, w_out, b_in. Both layer
  layouts: stacked layers are never split along their layer axis (checked to fail by a rule
  ("layers", "fsdp"))."""
  mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  for scan in (True, False):
    seen = set()
    for name, model in MODELS.items():
      run = train.make_run(_config(scan_layers=scan, **model), 64)
      state = run.abstract_state()
      for path, spec in sharding.partition_specs(state, sharding.RULE_SETS[which], mesh).items():
        key = golden_key(path)
        if key is None:
          assert spec == P(), path  # step counters: replicated
          continue
        seen.add(key)
        assert spec == golden_spec(key, which, path), (name, path)
    assert seen == set(GOLDEN)


# Rule set -> (mesh of 8 devices, how many devices split each weight matrix, the same for the
# matrices without a tensor-parallel dimension: pos_embed and cls_head).
MEMORY = {"fsdp_tp": ((1, 2, 4), 8, 2), "fsdp": ((1, 8, 1), 8, 8), "tp": ((2, 1, 4), 4, 1),
          "dp": ((8, 1, 1), 1, 1)}


@pytest.mark.parametrize("which", RULE_COLUMNS)
def test_sharding_divides_each_matrix_per_device(which):
  """Per-device size of every weight matrix (and its Adam moments) from the shardings a run
  hands to jit, on 8 devices (an AbstractMesh: nothing is allocated): 1/8 under FSDP and
  FSDP+TP, 1/4 under TP over 4 devices, all of it under DP. Silent replication (a sharding
  rule lost, a dimension that the mesh does not divide) shows as a larger share. Checked to
  fail: removing ("mlp", "tensor") from DEFAULT_RULES fails the fsdp_tp case (the MLP
  matrices hold 1/2 per device, not 1/8)."""
  shape, ways, ways_no_tp = MEMORY[which]
  mesh = AbstractMesh(shape, sharding.MESH_AXES)
  checked = 0
  for model in MODELS.values():
    c = _config(scan_layers=False, **model)
    c.mesh.rules = sharding.RULE_SETS[which]
    run = train.make_run(c, 64, mesh=mesh)
    for path, a in nnx.to_flat_state(run.abstract_state()):
      key = golden_key("/".join(map(str, path)))
      leaf = key and key.split("/")[-1]
      if not (leaf in ("embed", "pos_embed", "head", "cls_head") or str(leaf).startswith("w")):
        continue  # biases, LayerNorms, step counters
      per_device = math.prod(a.sharding.shard_shape(a.shape))
      expected = ways_no_tp if key in ("pos_embed", "cls_head") else ways
      assert per_device * expected == a.size, (path, a.sharding.spec)
      checked += 1
  assert checked > 3 * 40


def test_undivisible_dimensions_stay_whole():
  """A 65-character vocabulary over tensor=2 is replicated instead of failing in jit."""
  c = _config()
  run = train.make_run(c, 65)
  state = run.abstract_state()
  specs = sharding.partition_specs(state, sharding.DEFAULT_RULES,
                                   AbstractMesh((1, 2, 2), sharding.MESH_AXES))
  assert specs["0/embed"] == P(None, "fsdp")
  assert specs["0/blocks/attn/wq"] == P(None, "fsdp", "tensor", None)  # stacked layers


def test_without_a_mesh_the_kernel_is_called_directly():
  calls = []

  def kernel(q, k, v, *, segment_ids=None, causal=True):
    calls.append((q.shape, k.shape))
    return q

  q, k = np.ones((2, 4, 4, 8), np.float32), np.ones((2, 4, 2, 8), np.float32)
  sharding.shard_heads(kernel, q, k, k)
  assert calls == [((2, 4, 4, 8), (2, 4, 2, 8))]
  assert sharding.constrain(q, ("batch", None, None, None)) is q


# ---------------------------------------------------------------- 8 fake devices, subprocesses


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
  """Both workers at once (two cores): {"xla": result, "triton": result}."""
  out = tmp_path_factory.mktemp("sharding")
  env = {**os.environ, "PYTHONPATH": ROOT, **FAKE_DEVICE_ENV}
  procs = {part: subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "sharding_worker.py"), part,
       str(out / f"{part}.json")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for part in ("xla", "triton")}
  results = {}
  for part, p in procs.items():
    log, _ = p.communicate(timeout=900)
    if p.returncode != 0 and "Termination timeout for `all reduce" in log:
      # XLA's CPU in-process all-reduce sometimes never gathers its 8 participants when the
      # two workers and another pytest worker share 2 cores (2026-11-30: 2 of 3 full suite
      # runs; never alone): a CHECK abort, not a wrong result. Likely cause and mitigation:
      # conftest.FAKE_DEVICE_ENV; kept until that is proven. Run that worker again, alone.
      again = subprocess.run(p.args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=900)
      p, log = again, again.stdout
    assert p.returncode == 0, f"{part} worker failed:\n{log[-4000:]}"
    results[part] = json.loads((out / f"{part}.json").read_text())
  return results


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("mesh", MESHES)
def test_eight_devices_train_like_one(eight, impl, mesh):
  """Same losses and parameters as one device after several AdamW steps (lr 1e-2)."""
  case = eight[impl]["cases"][f"{impl}/{mesh}"]
  np.testing.assert_allclose(case["loss"], case["loss_ref"], rtol=2e-6, atol=0)
  assert len(case["loss"]) >= 2
  assert case["max_param_abs_err"] < 1e-5, case
  # The parameters moved by up to ~lr * steps; their difference is < 1e-3 of each update.
  assert case["max_update_rel_err"] < 1e-3, case


@pytest.mark.parametrize("which", ["fsdp", "tp"])
def test_arrays_are_sharded_as_the_golden_table(eight, which):
  shards = eight["xla"][f"shards_{which}"]
  checked = 0
  for path, info in shards.items():
    key = golden_key(path)
    if key in GOLDEN:
      assert info["spec"] == str(golden_spec(key, which, path)), path
      checked += 1
  assert checked == 3 * (1 + 2 + 10)  # params, mu, nu: embed, ln_f (2), stacked blocks (10)


def test_fsdp_holds_an_eighth_per_device(eight):
  """ZeRO-3: each device holds ~1/8 of the parameter and optimizer bytes; DP holds all."""
  def ratio(which):
    shards = eight["xla"][f"shards_{which}"]
    return (sum(v["max_device_nbytes"] for v in shards.values()) /
            sum(v["nbytes"] for v in shards.values()))
  # Tiny model: the replicated LayerNorm vectors are 1% of it, hence slightly above 1/8.
  assert 0.125 <= ratio("fsdp") < 0.14
  assert ratio("dp") == 1.0
  big = eight["xla"]["gpt2_small_fsdp8"]
  assert abs(big["per_device_bytes"] / big["total_bytes"] - 1 / 8) < 0.002


@pytest.mark.parametrize("tag,devices", [("8to1", [1]), ("1to8", [8])])
def test_checkpoints_restore_under_another_mesh(eight, tag, devices):
  ck = eight["xla"][f"ckpt_{tag}"]
  assert ck["same_keys"] and ck["specs_match_dst"]
  assert ck["devices"] == devices and ck["src_devices"] != devices
  assert ck["max_abs_diff"] == 0.0


def test_mesh_fill_and_shard_map_blocks(eight):
  r = eight["xla"]
  assert r["mesh_fill"] == {"data": 4, "fsdp": 2, "tensor": 1}
  # Mesh (2, 2, 2): batch 4 over data*fsdp, 4 query / 2 kv heads over tensor.
  assert r["shard_map_local"] == {"q": [1, 8, 2, 16], "k": [1, 8, 1, 16],
                                  "seg": [[1, 8], [1, 8]]}
  assert r["shard_map_out"] == {"spec": "P(('data', 'fsdp'), None, 'tensor')", "ok": True}
  assert "divisible by the tensor mesh size 2" in r["kv_heads_error"]

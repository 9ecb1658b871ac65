"""`run.py --mode=sample --prompt=...` on an encoder-decoder workdir: the prompt is the
encoder's input (encoded, then the tokenizer's EOS, as T5 appends </s>), the printed text is
the decoded target alone, ending at EOS; greedy, sampled and beam search; bad beam settings
are one error line.

The workdir holds a T5 (v1.1, one layer per stack) at step 0, saved the way a run saves one,
whose head has two columns swapped so that greedy decoding emits EOS after a few tokens.
"""

import os

import numpy as np
import pytest
from flax import nnx

from lm import checkpoint as ckpt_lib
from lm import sample, tokenizers
from lm import train as train_lib
from lm import workdir as workdir_lib
from lm.config import t5_model
from tests.conftest import run_main, tiny_config
from tests.test_t5 import greedy_by_full_forward

PROMPT = "to be or not"
NEW = 12  # max_new_tokens


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
  """(workdir, model, tokenizer, encoder input ids with EOS, EOS id)."""
  config = tiny_config()
  t5_model(config.model, num_layers=1, num_heads=2, d_model=16, d_ff=32)
  config.model.attention_impl = "xla"
  tok = tokenizers.CharTokenizer.train("to be, or not to be: that is the question",
                                       specials=("<pad>", "</s>"))
  eos = sample.eos_of(tok)
  assert eos == tok.special_ids["</s>"]
  ids = list(tok.encode(PROMPT)) + [eos]
  run = train_lib.make_run(config, tok.vocab_size)
  model, optimizer = nnx.merge(run.graphdef, train_lib.init_state(run, config.seed))
  # Swap the head's columns of EOS and of the first new token greedy emits at step k >= 2:
  # the steps before k keep their argmax, step k now gives EOS.
  greedy = greedy_by_full_forward(model, ids, NEW)
  k = next(k for k in range(2, NEW) if greedy[k] not in greedy[:k] + [eos])
  cols = np.array([eos, greedy[k]])
  model.head[...] = model.head[...].at[:, cols].set(model.head[...][:, cols[::-1]])
  workdir = str(tmp_path_factory.mktemp("t5"))
  workdir_lib.commit(workdir, config, tok, None, 0)
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ck:
    ck.save(0, nnx.state((model, optimizer)), {"config": config.to_dict(),
                                              "tokenizer": tok.to_json(), "seed": config.seed,
                                              "step": 0})
  return workdir, model, tok, ids, eos


def samples(capfd, workdir, *flags):
  """The texts `run.py --mode=sample` prints (exit code 0 asserted)."""
  code = run_main("--config=experiments/base.py", f"--workdir={workdir}", "--mode=sample",
                  f"--prompt={PROMPT}", f"--max_new_tokens={NEW}", *flags)
  out, err = capfd.readouterr()
  assert code == 0, err
  assert out.startswith("--- sample ---\n")
  return [text.rstrip("\n") for text in out.split("--- sample ---\n")[1:]]


def test_greedy_prints_the_decoded_target_up_to_eos(t5_run, capfd):
  """The printed text is the tokenizer's decoding of greedy decoding by full forward passes
  over the prompt + EOS, cut before its first EOS (which comes before max_new_tokens).
  Verified to fail without the EOS appended to the prompt, and with no stop at EOS."""
  workdir, model, tok, ids, eos = t5_run
  want = greedy_by_full_forward(model, ids, NEW)
  assert eos in want[:-1]
  want = tok.decode(want[:want.index(eos)])
  assert samples(capfd, workdir, "--temperature=0", "--num_samples=1") == [want]


@pytest.mark.parametrize("flags, kwargs", [
    (["--temperature=1.0", "--top_k=0", "--num_samples=3", "--seed=5"],
     dict(temperature=1.0, top_k=0, num_return_sequences=3, seed=5)),
    (["--num_beams=3", "--num_samples=2"],
     dict(num_beams=3, num_return_sequences=2, length_penalty=1.0)),
])
def test_sampling_and_beam_search_print_what_generate_returns(t5_run, capfd, flags, kwargs):
  workdir, model, tok, ids, eos = t5_run
  want = sample.generate(model, [ids], max_new_tokens=NEW, stop_token=eos, **kwargs)[0]
  texts = samples(capfd, workdir, *flags)
  assert texts == [tok.decode(s) for s in want]
  assert len(set(texts)) > 1  # distinct samples / beams: the flags were applied


def test_more_samples_than_beams_is_one_error_line(t5_run, capfd):
  code = run_main("--config=experiments/base.py", f"--workdir={t5_run[0]}", "--mode=sample",
                  "--num_beams=2", "--num_samples=3")
  err = capfd.readouterr().err.strip().splitlines()
  assert code != 0
  assert err[-1] == ("error: sample.num_samples=3: expected <= sample.num_beams=2 (beam search "
                     "returns its best beams)")
  assert not any("Traceback" in line for line in err)


def test_converted_t5_with_its_own_eos_appending_tokenizer(tmp_path, capfd):
  """A converted T5 (lm.convert) whose unigram tokenizer.json appends </s> itself: the encoder
  input ends in one </s>, not two, and the printed text is the decoding of greedy by full
  forward passes over it. Failed with </s> appended whatever the tokenizer did."""
  from lm import convert, runtime
  from tests.test_convert_t5 import unigram_tokenizer, write_t5
  hf, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
  write_t5(hf, "1.1", seed=7)
  unigram_tokenizer(hf)
  convert.hf_to_workdir(hf, workdir)
  run, state, tok, _ = runtime.load(tiny_config(), workdir)
  model, eos = nnx.merge(run.graphdef, state)[0], sample.eos_of(tok)
  prompt = "a dog sat on the mat"  # greedy's first token differs with a second </s>
  ids = list(tok.encode(prompt))
  assert eos == 1 and ids[-1] == eos and ids.count(eos) == 1
  want = greedy_by_full_forward(model, ids, 6)
  want = tok.decode(want[:want.index(eos)] if eos in want else want)
  code = run_main("--config=experiments/base.py", f"--workdir={workdir}", "--mode=sample",
                  f"--prompt={prompt}", "--max_new_tokens=6", "--temperature=0",
                  "--num_samples=1")
  out, err = capfd.readouterr()
  assert code == 0, err
  assert out == f"--- sample ---\n{want}\n"

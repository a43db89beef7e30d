"""Generates tests/fixtures/bert_tiny/: a tiny Hugging Face BERT and its reference outputs.

The fixture lets tests/test_bert_convert.py check `bert_convert` and `text.BertEncoder`
against the Hugging Face implementation itself (`transformers.BertModel`, eager attention,
eval mode) without torch in the project environment. It holds:

* ``config.json`` and ``model.safetensors``: what ``BertModel.save_pretrained`` writes for
  a seeded random model with vocab 99, hidden 32, 2 layers, 4 heads, intermediate 37,
  64 positions, 2 token types (about 20k float32 values, ~80 KB). A real checkpoint
  directory (e.g. a clinical BERT) has the same layout, only bigger.
* ``reference.npz``: fixed inputs with padding and what the model computed for them:
  ``ids`` [2, 7] int32 (row 0 has 7 real tokens, row 1 has 4 then 3 pads of id 0),
  ``mask`` [2, 7] bool (True at real tokens), ``token_types`` [2, 7] int32 (segment 1 on
  the last real tokens of each row), and for those inputs ``last_hidden_state``
  [2, 7, 32], ``pooler_output`` [2, 32] and ``attentions`` [2, 4, 7, 7] (the last layer's
  attention probabilities); the same three with the ``notypes_`` prefix for
  token_type_ids omitted (all segment 0). Outputs at pad positions are stored as computed
  but are not meaningful; the test compares real positions only.

Weights: ``torch.manual_seed(0)``, then every parameter is redrawn (BertModel's own
initialisation leaves the biases at 0 and the LayerNorm scales at 1, which would hide a
bias or scale mapped to the wrong place): matrices and embeddings normal(0, 0.2), biases
normal(0, 0.1), LayerNorm weights 1 + normal(0, 0.1). With std 0.2 the attention
probabilities are far from uniform, so a head split in the wrong order shows.

Regenerate (needs torch and transformers, kept out of the project environment)::

  python -m venv /tmp/bertenv
  /tmp/bertenv/bin/pip install torch transformers safetensors numpy   # CPU torch is enough
  # (or, in a dev environment of its own: pip install -e ".[bert_fixture]")
  /tmp/bertenv/bin/python tests/make_bert_fixture.py
  # check the committed files instead of writing them:
  /tmp/bertenv/bin/python tests/make_bert_fixture.py --verify

Made with torch 2.13.0+cpu and transformers 5.24.0.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_DIR = os.path.join(HERE, "fixtures", "bert_tiny")
SEED = 0
CONFIG = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
              hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
              attention_probs_dropout_prob=0.1, pad_token_id=0)
# Row 0: 7 real tokens; row 1: 4 real tokens then 3 pads (id 0).
IDS = np.array([[2, 17, 45, 98, 3, 60, 3],
                [2, 81, 5, 3, 0, 0, 0]], np.int32)
MASK = IDS != 0
TOKEN_TYPES = np.array([[0, 0, 0, 0, 0, 1, 1],
                        [0, 0, 1, 1, 0, 0, 0]], np.int32)


def build_model() -> transformers.BertModel:
  """The seeded tiny BertModel, in eval mode, with every parameter redrawn."""
  torch.manual_seed(SEED)
  config = transformers.BertConfig(**CONFIG)
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = transformers.BertModel(config, add_pooling_layer=True)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model.eval()


def reference_outputs(model: transformers.BertModel) -> dict[str, np.ndarray]:
  """The fixed inputs and the model's outputs for them (see the module docstring)."""
  out = {"ids": IDS, "mask": MASK, "token_types": TOKEN_TYPES}
  ids = torch.from_numpy(IDS.astype(np.int64))
  mask = torch.from_numpy(MASK.astype(np.int64))
  with torch.no_grad():
    for prefix, types in (("", torch.from_numpy(TOKEN_TYPES.astype(np.int64))),
                          ("notypes_", None)):
      result = model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                     output_attentions=True)
      out[prefix + "last_hidden_state"] = result.last_hidden_state.numpy()
      out[prefix + "pooler_output"] = result.pooler_output.numpy()
      out[prefix + "attentions"] = result.attentions[-1].numpy()
  return out


def write(directory: str) -> None:
  """Writes config.json, model.safetensors and reference.npz into `directory`."""
  model = build_model()
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)  # transformers >= 5 always writes safetensors
    for name in ("config.json", "model.safetensors"):
      shutil.copyfile(os.path.join(tmp, name), os.path.join(directory, name))
  np.savez(os.path.join(directory, "reference.npz"), **reference_outputs(model))


def verify(directory: str) -> None:
  """Regenerates into a temporary folder and compares with the files in `directory`."""
  with tempfile.TemporaryDirectory() as tmp:
    write(tmp)
    new, old = (load_file(os.path.join(d, "model.safetensors")) for d in (tmp, directory))
    assert sorted(new) == sorted(old), (sorted(new), sorted(old))
    for k in new:
      np.testing.assert_array_equal(new[k], old[k], err_msg=k)
    with np.load(os.path.join(tmp, "reference.npz")) as a, \
        np.load(os.path.join(directory, "reference.npz")) as b:
      assert sorted(a.files) == sorted(b.files), (a.files, b.files)
      for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)
  print(f"{directory} is reproduced")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=FIXTURE_DIR)
  parser.add_argument("--verify", action="store_true",
                      help="do not write: check that the files in --out are reproduced")
  args = parser.parse_args()
  if args.verify:
    verify(args.out)
    return
  write(args.out)
  sizes = {n: os.path.getsize(os.path.join(args.out, n))
           for n in ("config.json", "model.safetensors", "reference.npz")}
  print(f"wrote {args.out}: " + ", ".join(f"{n} {s} bytes" for n, s in sizes.items()))
  with np.load(os.path.join(args.out, "reference.npz")) as ref:
    att = ref["attentions"]
    print(f"last-layer attention max per row: min {att.max(-1).min():.3f}, "
          f"median {np.median(att.max(-1)):.3f}")


if __name__ == "__main__":
  main()

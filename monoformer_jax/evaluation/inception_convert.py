"""PyTorch FID-Inception state dict -> Flax variables for `inception.FIDInceptionV3`.

The source is the state dict of pytorch-fid's `fid_inception_v3()` (the file
`pt_inception-2015-12-05-*.pth`), as a dict name -> numpy array. Names map one to one:
  `<path>.conv.weight`     (O, I, kh, kw) -> params[<path>]['conv']['kernel']  (kh, kw, I, O)
  `<path>.bn.weight/bias`                 -> params[<path>]['bn']['scale'/'bias']
  `<path>.bn.running_mean/var`            -> batch_stats[<path>]['bn']['mean'/'var']
  `fc.weight` (classes, 2048)             -> params['fc']['kernel'] (2048, classes); `fc.bias`
`num_batches_tracked` counters are training bookkeeping and are ignored. Every expected weight must be
present with the expected shape, and nothing else may be: a partial or foreign checkpoint fails loudly
instead of silently producing wrong FIDs.
"""

from typing import Mapping

import jax
import numpy as np

from monoformer_jax.convert import torch_checkpoint
from monoformer_jax.evaluation import inception

_BN_NAMES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_IGNORED_SUFFIXES = (".num_batches_tracked",)


class ConversionError(ValueError):
  """The state dict does not fit the FID Inception architecture."""


def _torch_name(collection: str, path: tuple[str, ...]) -> tuple[str, str]:
  """Flax variable path -> (torch key, kind); kind says how the array is transformed."""
  *modules, leaf = path
  prefix = ".".join(modules)
  if modules[-1] == "fc":
    return f"{prefix}.{'weight' if leaf == 'kernel' else 'bias'}", ("dense" if leaf == "kernel" else "copy")
  if modules[-1] == "conv" and leaf == "kernel":
    return f"{prefix}.weight", "conv"
  if modules[-1] == "bn":
    for torch_leaf, (coll, flax_leaf) in _BN_NAMES.items():
      if (coll, flax_leaf) == (collection, leaf):
        return f"{prefix}.{torch_leaf}", "copy"
  raise AssertionError(f"unmapped Flax variable {collection}/{'/'.join(path)}")


def _to_flax(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
  if kind == "dense":
    return np.transpose(array)  # (out, in) -> (in, out)
  return array


def _expected_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "conv":
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if kind == "dense":
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: inception.FIDInceptionV3 | None = None) -> dict:
  """Returns {'params': ..., 'batch_stats': ...} (float32 numpy leaves) for `model.apply`.

  Raises ConversionError listing every missing key, unexpected key and shape mismatch.
  """
  model = model or inception.FIDInceptionV3()
  abstract = inception.abstract_variables(model)
  used, missing, mismatched = set(), [], []
  converted = {}
  for collection, tree in abstract.items():
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = []
    for key_path, leaf in flat:
      path = tuple(k.key for k in key_path)
      name, kind = _torch_name(collection, path)
      if name not in state_dict:
        missing.append(name)
        leaves.append(None)
        continue
      used.add(name)
      array = np.asarray(state_dict[name])
      want = _expected_shape(leaf.shape, kind)
      if tuple(array.shape) != want:
        mismatched.append(f"{name}: checkpoint {tuple(array.shape)}, model expects {want}")
        leaves.append(None)
        continue
      leaves.append(np.ascontiguousarray(_to_flax(array, kind), dtype=np.float32))
    converted[collection] = (jax.tree_util.tree_structure(tree), leaves)
  unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected or mismatched:
    problems = []
    if missing:
      problems.append(f"{len(missing)} missing key(s): {', '.join(sorted(missing)[:20])}")
    if unexpected:
      problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:20])}")
    if mismatched:
      problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:20])}")
    raise ConversionError("state dict is not a pytorch-fid FID Inception-v3 checkpoint: " + " | ".join(problems))
  return {c: jax.tree_util.tree_unflatten(treedef, leaves) for c, (treedef, leaves) in converted.items()}


def load_fid_inception(path: str, model: inception.FIDInceptionV3 | None = None) -> dict:
  """Reads a pt_inception `.pth` file (no torch needed, nothing in it run) and converts it.

  A file that is no checkpoint, or a hostile one, is refused by `torch_checkpoint` (ValueError naming
  the file); a checkpoint of something else raises ConversionError, prefixed with the file too.
  """
  state = torch_checkpoint.load_state_dict(path)
  try:
    return convert_state_dict(state, model)
  except ConversionError as e:
    raise ConversionError(f"{path}: {e}") from e

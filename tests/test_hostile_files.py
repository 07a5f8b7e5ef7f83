"""Hostile input files: every reader refuses them with one clear error, runs nothing, allocates little.

The corpus is written here, opcode by opcode (no torch, and nothing is ever loaded with the standard
unpickler): pickles that would run `os.system` / `exec` / `eval` (through REDUCE, nested getattr,
protocol-0 GLOBAL and protocol-4 STACK_GLOBAL, memo PUT/GET, INST, OBJ, BUILD), pickles that make the
C unpickler allocate without bound (a memo index of 2**28, a 10**12-byte BINBYTES8), torch zips with
members named '../x' or declaring 10**12-byte storages, the same payloads in the legacy format, and
malformed safetensors. Each payload that ran would create the canary file; it must never appear.
"""

import io
import json
import os
import pickle
import pickletools
import re
import shlex
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from monoformer_jax.convert import checkpoints
from monoformer_jax.data import sources, tfds_latents, tokenizer
from monoformer_jax.evaluation import inception_convert
from monoformer_jax.vae import convert as vae_convert
from monoformer_jax.vision import convert as clip_convert
from monoformer_jax.convert.torch_checkpoint import (
    UnsafeCheckpointError,
    load_state_dict,
    load_torch_checkpoint,
    load_torch_state_dict,
)

CANARY = "CANARY"  # the file any executed payload creates, in the test's tmp_path
_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001

# ------------------------------------------------------------------------------------------------
# Pickles assembled from opcodes (pickle's own opcode constants).


def _s(text: str) -> bytes:
  data = text.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(n: int) -> bytes:
  if 0 <= n < 2**31:
    return pickle.BININT + struct.pack("<i", n)
  data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
  return pickle.LONG1 + bytes([len(data)]) + data


def _tuple(*items: bytes) -> bytes:
  return pickle.MARK + b"".join(items) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:  # protocols 0-3
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _stack_global(module: str, name: str) -> bytes:  # protocol 4
  return _s(module) + _s(name) + pickle.STACK_GLOBAL


def _call(func: bytes, *args: bytes) -> bytes:
  return func + _tuple(*args) + pickle.REDUCE


def _proto(body: bytes, protocol: int = 2) -> bytes:
  return pickle.PROTO + bytes([protocol]) + body + pickle.STOP


def _dict(items: dict) -> bytes:
  return pickle.EMPTY_DICT + pickle.MARK + b"".join(_s(k) + v for k, v in items.items()) + pickle.SETITEMS


def _tensor(key: str, numel: int, size: tuple, stride: tuple) -> bytes:
  """torch._utils._rebuild_tensor_v2 of a FloatStorage record, as torch.save writes a tensor."""
  record = _tuple(_s("storage"), _global("torch", "FloatStorage"), _s(key), _s("cpu"), _int(numel))
  return _call(
      _global("torch._utils", "_rebuild_tensor_v2"),
      record + pickle.BINPERSID,
      _int(0),
      _tuple(*map(_int, size)),
      _tuple(*map(_int, stride)),
      pickle.NEWFALSE,
      _call(_global("collections", "OrderedDict")),
  )


def _payloads(canary: str) -> dict[str, tuple[bytes, str]]:
  """name -> (one pickle, what the error must say). Those that ran would create `canary`."""
  touch = f"touch {shlex.quote(canary)}"
  code, expr = f"open({canary!r}, 'w').close()", f"open({canary!r}, 'w')"
  p0_str = pickle.UNICODE + touch.encode("raw_unicode_escape") + b"\n"
  return {
      "reduce_os_system": (_proto(_call(_global("os", "system"), _s(touch))), r"global 'os\.system'"),
      "reduce_posix_system": (_proto(_call(_global("posix", "system"), _s(touch))), r"global 'posix\.system'"),
      "builtins_exec": (_proto(_call(_global("builtins", "exec"), _s(code))), r"global 'builtins\.exec'"),
      "builtins_eval": (_proto(_call(_global("builtins", "eval"), _s(expr))), r"global 'builtins\.eval'"),
      # getattr(__import__('builtins'), 'exec')(code): REDUCE inside REDUCE.
      "nested_getattr_exec": (
          _proto(
              _call(
                  _call(
                      _global("builtins", "getattr"),
                      _call(_global("builtins", "__import__"), _s("builtins")),
                      _s("exec"),
                  ),
                  _s(code),
              )
          ),
          r"global 'builtins\.getattr'",
      ),
      # The same through STACK_GLOBAL (names from the stack: only find_class sees them).
      "stack_global_os_system": (_proto(_call(_stack_global("os", "system"), _s(touch)), 4), r"global 'os\.system'"),
      "stack_global_nested_getattr": (
          _proto(
              _call(
                  _call(
                      _stack_global("builtins", "getattr"),
                      _call(_stack_global("builtins", "__import__"), _s("os")),
                      _s("system"),
                  ),
                  _s(touch),
              ),
              4,
          ),
          r"global 'builtins\.getattr'",
      ),
      # Memo tricks: the global stored, popped, fetched back before the call.
      "memo_put_get_protocol0": (
          _global("os", "system") + b"p0\n" + pickle.POP + b"g0\n" + pickle.MARK + p0_str + pickle.TUPLE + b"R.",
          r"global 'os\.system'",
      ),
      "memo_memoize_binget_protocol4": (
          _proto(
              _stack_global("os", "system")
              + pickle.MEMOIZE
              + pickle.POP
              + pickle.BINGET
              + b"\0"
              + _tuple(_s(touch))
              + pickle.REDUCE,
              4,
          ),
          r"global 'os\.system'",
      ),
      "inst_os_system": (
          pickle.MARK + p0_str + pickle.INST + b"os\nsystem\n" + pickle.STOP,
          "refusing pickle opcode INST",
      ),
      "obj_os_system": (
          _proto(pickle.MARK + _stack_global("os", "system") + _s(touch) + pickle.OBJ, 4),
          "refusing pickle opcode OBJ",
      ),
      # BUILD on what the allow list hands out: would set attributes of the reader's own objects.
      "build_on_allowed_global": (
          _proto(_global("collections", "OrderedDict") + _dict({"__setstate__": _int(1)}) + pickle.BUILD),
          r"refusing to set state on collections\.OrderedDict",
      ),
      "build_slots_on_rebuild_function": (
          _proto(
              _global("torch._utils", "_rebuild_tensor_v2")
              + _tuple(pickle.NONE, _dict({"__defaults__": _tuple(_int(1))}))
              + pickle.BUILD
          ),
          r"refusing to set state on torch\._utils\._rebuild_tensor_v2",
      ),
      "build_on_storage_type": (
          _proto(_global("torch", "FloatStorage") + _dict({"dtype": _s("object")}) + pickle.BUILD),
          r"refusing to set state on torch\.FloatStorage",
      ),
      "build_on_tensor": (
          _proto(_dict({"w": _tensor("0", 4, (4,), (1,)) + _dict({"x": _int(1)}) + pickle.BUILD})),
          "refusing to set state on a tensor",
      ),
      # Allocation bombs: 12 bytes that make the C unpickler zero 2 GB / allocate 10**12 bytes.
      "memo_index_bomb": (_proto(pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2**28)), "memo index 268435456"),
      "binbytes8_bomb": (_proto(pickle.BINBYTES8 + struct.pack("<Q", 10**12) + b"x", 4), "corrupt"),
      "frame_bomb": (
          pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", 10**12) + pickle.NONE + pickle.STOP,
          "corrupt",
      ),
      "deep_nesting": (_proto(pickle.EMPTY_LIST * 5000 + pickle.APPEND * 4999), "nested more than 100 deep"),
      "list_containing_itself": (
          _proto(pickle.EMPTY_LIST + pickle.BINPUT + b"\0" + pickle.BINGET + b"\0" + pickle.APPEND),
          "contains itself",
      ),
      "persistent_id_not_a_storage": (_proto(_s("x") + pickle.BINPERSID), "unexpected persistent record"),
  }


# Refused as corrupt (ValueError) rather than unsafe (UnsafeCheckpointError, a ValueError too).
_NOT_UNSAFE = ("binbytes8_bomb", "frame_bomb", "deep_nesting", "list_containing_itself")

# ------------------------------------------------------------------------------------------------
# Files: torch.save's zip layout, its legacy layout, safetensors.


def _torch_zip(data_pkl: bytes, storages: dict | None = None, extra: tuple = ()) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as archive:
    archive.writestr("archive/data.pkl", data_pkl)
    archive.writestr("archive/byteorder", "little")
    for key, data in (storages or {}).items():
      archive.writestr(f"archive/data/{key}", data)
    for name, data in extra:
      archive.writestr(name, data)
  return buf.getvalue()


def _legacy(object_pickle: bytes, keys: tuple = (), storages: bytes = b"", magic: bytes | None = None) -> bytes:
  """Legacy torch.save: magic, protocol and sys_info pickles, the object, the storage keys, storages."""
  header = (magic or _proto(_int(_MAGIC))) + _proto(_int(_LEGACY_PROTOCOL)) + _proto(pickle.EMPTY_DICT)
  return header + object_pickle + _proto(pickle.EMPTY_LIST + b"".join(_s(k) + pickle.APPEND for k in keys)) + storages


def _patch_central_size(archive: bytes, member: str, size: int) -> bytes:
  """The member's sizes in the zip's central directory (what zipfile trusts) set to `size`."""
  name = member.encode()
  at = archive.index(b"PK\x01\x02")  # central directory entries: sizes at +20, name at +46
  while archive[at + 46 : at + 46 + len(name)] != name:
    at = archive.index(b"PK\x01\x02", at + 1)
  return archive[: at + 20] + struct.pack("<II", size, size) + archive[at + 28 :]


def _safetensors(header, data: bytes = b"", length: int | None = None) -> bytes:
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _corpus(canary: str) -> dict[str, tuple[str, bytes, type, str]]:
  """name -> (file name, bytes, the exception, what its message must say)."""
  cases = {}
  for name, (payload, match) in _payloads(canary).items():
    error = ValueError if name in _NOT_UNSAFE else UnsafeCheckpointError
    cases[f"zip_{name}"] = (f"{name}.bin", _torch_zip(payload), error, match)
    cases[f"legacy_{name}"] = (f"{name}_legacy.pth", _legacy(payload), error, match)
  bad_call = _payloads(canary)["reduce_os_system"][0]
  cases["legacy_payload_in_magic_pickle"] = (
      "magic.pth",
      _legacy(_proto(pickle.EMPTY_DICT), magic=bad_call),
      UnsafeCheckpointError,
      r"global 'os\.system'",
  )
  four = np.arange(4, dtype=np.float32).tobytes()
  huge = _proto(_dict({"w": _tensor("0", 10**12, (10**12,), (1,))}))
  cases["zip_storage_of_1e12_elements"] = (
      "huge_storage.bin",
      _torch_zip(huge, {"0": four}),
      ValueError,
      r"storage '0' holds 16 bytes, the pickle expects 4000000000000",
  )
  cases["legacy_storage_of_1e12_elements"] = (
      "huge_storage.pth",
      _legacy(huge, ("0",), struct.pack("<q", 10**12) + four),
      ValueError,
      r"truncated; storage '0' runs past the end",
  )
  good = _proto(_dict({"w": _tensor("0", 4, (2, 2), (2, 1))}))
  cases["zip_member_size_lies"] = (
      "size_lie.bin",
      _patch_central_size(_torch_zip(good, {"0": four}), "archive/data/0", 2**31),
      ValueError,
      r"member 'archive/data/0' declares 2147483648 bytes",
  )
  expanded = _proto(_dict({"w": _tensor("0", 4, (10**6, 10**6), (0, 0))}))
  cases["zip_tensor_larger_than_storage"] = (
      "expanded.bin",
      _torch_zip(expanded, {"0": four}),
      ValueError,
      "has 1000000000000 elements, more than its storage",
  )
  for label, member in (("dotdot", "../x"), ("nested_dotdot", "archive/../../x"), ("absolute", "/x")):
    cases[f"zip_member_{label}"] = (
        f"traversal_{label}.bin",
        _torch_zip(good, {"0": four}, extra=((member, f"echo > {canary}"),)),
        ValueError,
        f"unsafe member name {re.escape(repr(member))}",
    )
  f32 = lambda offsets: {"dtype": "F32", "shape": [2], "data_offsets": offsets}
  for name, data, match in (
      ("header_length_2gb", _safetensors({"a": f32([0, 8])}, bytes(8), 2**31), "header length 2147483648 is more"),
      ("offsets_out_of_range", _safetensors({"a": f32([0, 10**12])}, bytes(8)), "unreadable safetensors"),
      ("offsets_overlap", _safetensors({"a": f32([0, 8]), "b": f32([4, 12])}, bytes(12)), "invalid offset"),
      ("header_not_json", _safetensors(b"\xff\xfe{not json", bytes(8)), "unreadable safetensors"),
      ("dtype_unknown", _safetensors({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "F31"),
      ("shorter_than_its_length", b"\x01\x02", "too short for a safetensors file"),
  ):
    cases[f"safetensors_{name}"] = (f"{name}.safetensors", data, ValueError, match)
  return cases


def _canary_and_corpus(tmp_path):
  canary = tmp_path / CANARY
  return canary, _corpus(str(canary))


_CASES = sorted(_corpus(CANARY))


def _read(path):
  return load_state_dict(path) if path.endswith(".safetensors") else load_torch_checkpoint(path)


@pytest.mark.parametrize("case", _CASES)
def test_each_hostile_checkpoint_is_refused(tmp_path, case):
  canary, corpus = _canary_and_corpus(tmp_path)
  name, data, error, match = corpus[case]
  path = tmp_path / "files" / name
  path.parent.mkdir()
  path.write_bytes(data)
  with pytest.raises(error, match=match) as info:
    _read(str(path))
  assert str(info.value).startswith(str(path)), f"the message must name the file: {info.value}"
  assert isinstance(info.value, ValueError)  # UnsafeCheckpointError too: one family for callers
  assert not canary.exists()
  assert sorted(os.listdir(tmp_path)) == ["files"] and os.listdir(path.parent) == [name]  # nothing extracted
  assert not os.path.exists(tmp_path.parent / "x")


def test_corpus_pickles_are_well_formed():
  """The payloads are valid pickles (pickletools reads them without running anything), so what
  refuses them is the reader's checks, not a malformed byte; and the zips hold the names crafted."""
  for name, (payload, _) in _payloads(CANARY).items():
    if name != "binbytes8_bomb":  # a length past the end is that one's point
      pickletools.dis(payload, out=io.StringIO())
  corpus = _corpus(CANARY)
  names = zipfile.ZipFile(io.BytesIO(corpus["zip_member_dotdot"][1])).namelist()
  assert "../x" in names
  assert "/x" in zipfile.ZipFile(io.BytesIO(corpus["zip_member_absolute"][1])).namelist()


def test_hand_built_checkpoints_still_load(tmp_path):
  """The same assembly with nothing hostile loads, in both layouts: the refusals are specific. And
  it loads after the BUILD payloads were tried: BUILD on the reader's own shared objects (the
  FloatStorage stand-in, the rebuild function) would change how every later file in the process loads."""
  payloads = _payloads(str(tmp_path / CANARY))
  for name in ("build_on_storage_type", "build_slots_on_rebuild_function", "build_on_allowed_global"):
    (tmp_path / f"{name}.bin").write_bytes(_torch_zip(payloads[name][0]))
    with pytest.raises(UnsafeCheckpointError, match="refusing to set state"):
      load_torch_checkpoint(tmp_path / f"{name}.bin")
  four = np.arange(4, dtype=np.float32)
  good = _proto(_dict({"w": _tensor("0", 4, (2, 2), (1, 2)), "step": _int(3)}))
  (tmp_path / "good.bin").write_bytes(_torch_zip(good, {"0": four.tobytes()}))
  (tmp_path / "good.pth").write_bytes(_legacy(good, ("0",), struct.pack("<q", 4) + four.tobytes()))
  for name in ("good.bin", "good.pth"):
    got = load_torch_state_dict(tmp_path / name)
    np.testing.assert_array_equal(got["w"], four.reshape(2, 2).T)


def test_memo_sharing_stays_linear(tmp_path):
  """A list of two copies of a list of two copies ... (60 levels: 2**60 paths through 61 objects,
  sharing one tensor) loads in linear time, each object converted once."""
  body = _tensor("0", 4, (4,), (1,)) + pickle.BINPUT + b"\0"
  for level in range(1, 61):
    body += pickle.MARK + pickle.BINGET + bytes([level - 1]) + pickle.BINGET + bytes([level - 1]) + pickle.LIST
    body += pickle.BINPUT + bytes([level])
  path = tmp_path / "laughs.bin"
  path.write_bytes(_torch_zip(_proto(body), {"0": np.ones(4, np.float32).tobytes()}))
  start = time.monotonic()
  got = load_torch_checkpoint(path)
  assert time.monotonic() - start < 5
  leaf = got
  for _ in range(60):
    assert leaf[0] is leaf[1]
    leaf = leaf[0]
  np.testing.assert_array_equal(leaf, np.ones(4, np.float32))


def test_whole_corpus_in_one_process_keeps_memory_bounded(tmp_path):
  """Every file read in a fresh process: all refused, no canary, peak RSS well under 1 GB (the memo
  bomb alone would zero 2 GB, the BINBYTES8 one ask for 10**12 bytes)."""
  canary, corpus = _canary_and_corpus(tmp_path)
  folder = tmp_path / "files"
  folder.mkdir()
  for name, data, _, _ in corpus.values():
    (folder / name).write_bytes(data)
  script = textwrap.dedent(f"""
      import json, os
      from monoformer_jax.convert.torch_checkpoint import load_state_dict, load_torch_checkpoint
      def peak_kb():  # this process's own high-water mark: ru_maxrss starts at the parent's
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
      before = peak_kb()
      outcome = {{}}
      for name in sorted(os.listdir({str(folder)!r})):
        path = os.path.join({str(folder)!r}, name)
        try:
          (load_state_dict if name.endswith(".safetensors") else load_torch_checkpoint)(path)
          outcome[name] = "loaded"
        except ValueError as e:
          outcome[name] = type(e).__name__
      peak = peak_kb()
      print(json.dumps({{"outcome": outcome, "before_kb": before, "peak_kb": peak}}))
  """)
  result = subprocess.run(
      [sys.executable, "-c", script],
      capture_output=True,
      text=True,
      cwd=os.path.dirname(os.path.dirname(__file__)),
      timeout=120,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(report["outcome"]) == {name for name, _, _, _ in corpus.values()}
  assert "loaded" not in report["outcome"].values(), report["outcome"]
  assert report["peak_kb"] < 1024 * 1024, report
  assert report["peak_kb"] - report["before_kb"] < 256 * 1024, report
  assert not canary.exists()


# ------------------------------------------------------------------------------------------------
# The readers built on top: folders, the VAE, the Inception weights, tokenizers, JSONL, latents.


def _os_system_zip(canary) -> bytes:
  return _torch_zip(_payloads(str(canary))["reduce_os_system"][0])


def test_checkpoint_folders_and_indices(tmp_path):
  canary = tmp_path / CANARY
  folder = tmp_path / "llama"
  folder.mkdir()
  (folder / "config.json").write_text("{}")
  (folder / "pytorch_model.bin").write_bytes(_os_system_zip(canary))
  for read in (load_state_dict, checkpoints.read_state_dict):
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin: refusing to load global 'os\.system'"):
      read(str(folder))
  # An index naming a shard outside its folder (a read-side path traversal) is refused unread.
  (tmp_path / "elsewhere.bin").write_bytes(_os_system_zip(canary))
  index = tmp_path / "sharded" / "pytorch_model.bin.index.json"
  index.parent.mkdir()
  for shard in ("../elsewhere.bin", str(tmp_path / "elsewhere.bin")):
    index.write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(ValueError, match=f"shard name {re.escape(repr(shard))} points outside"):
      load_state_dict(str(index.parent))
  index.write_bytes(b"\xff\xfe garbage")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin\.index\.json: not a sharded-checkpoint index"):
    load_state_dict(str(index))
  assert not canary.exists()


@pytest.mark.parametrize("reader", ["official", "llama", "clip"])
def test_checkpoint_config_json_that_is_not_an_object(tmp_path, reader):
  """config.json of random bytes, a JSON list, or JSON nested 100k deep: one ValueError naming it."""
  read = {
      "official": checkpoints.load_official_checkpoint,
      "llama": checkpoints.load_llama_checkpoint,
      "clip": clip_convert.load_clip_config,
  }[reader]
  folder = tmp_path / "ckpt"
  folder.mkdir()
  for content in (np.random.default_rng(0).bytes(200), b"[1, 2]", b"[" * 100_000 + b"]" * 100_000):
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"config\.json: (not valid JSON|expected a JSON object)"):
      read(str(folder))


def test_diffusers_vae_folder(tmp_path):
  canary = tmp_path / CANARY
  folder = tmp_path / "vae"
  folder.mkdir()
  config = {"_class_name": "AutoencoderKL", "block_out_channels": [8], "norm_num_groups": 4, "latent_channels": 4}
  (folder / "config.json").write_text(json.dumps(config))
  (folder / "diffusion_pytorch_model.bin").write_bytes(_os_system_zip(canary))
  with pytest.raises(
      UnsafeCheckpointError, match=r"diffusion_pytorch_model\.bin: refusing to load global 'os\.system'"
  ):
    vae_convert.load_diffusers_vae(str(folder))
  os.remove(folder / "diffusion_pytorch_model.bin")
  (folder / "diffusion_pytorch_model.safetensors").write_bytes(_safetensors({}, length=2**31))
  with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: safetensors header length"):
    vae_convert.load_diffusers_vae(str(folder))
  rng = np.random.default_rng(0)
  for content, match in (
      (rng.bytes(256), "config.json: not valid JSON"),
      (b"[1, 2]", "config.json: a JSON list, not an object"),
      (b"[" * 100_000, "config.json: not valid JSON"),
      (json.dumps({**config, "block_out_channels": 8}).encode(), "block_out_channels=8: expected a list"),
      (json.dumps({**config, "layers_per_block": 10**9}).encode(), "layers_per_block=1000000000: expected an integer"),
      (json.dumps({**config, "down_block_types": 3}).encode(), "config.json: a field of the wrong JSON type"),
  ):
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=match):
      vae_convert.load_diffusers_vae(str(folder))
  assert not canary.exists()


def test_fid_inception_weights(tmp_path):
  canary = tmp_path / CANARY
  path = tmp_path / "pt_inception-2015-12-05.pth"
  path.write_bytes(_legacy(_payloads(str(canary))["reduce_os_system"][0]))
  with pytest.raises(UnsafeCheckpointError, match=r"pt_inception-2015-12-05\.pth: refusing to load global"):
    inception_convert.load_fid_inception(str(path))
  # A well-formed checkpoint of something else: the conversion error names the file too.
  four = np.zeros(4, np.float32).tobytes()
  path.write_bytes(_legacy(_proto(_dict({"w": _tensor("0", 4, (4,), (1,))})), ("0",), struct.pack("<q", 4) + four))
  with pytest.raises(inception_convert.ConversionError, match=r"pt_inception-2015-12-05\.pth: state dict is not"):
    inception_convert.load_fid_inception(str(path))
  assert not canary.exists()


def test_sentencepiece_model_files(tmp_path):
  rng = np.random.default_rng(0)
  for name, content in (("random", rng.bytes(4096)), ("empty", b""), ("text", b"hello world\n" * 10)):
    path = tmp_path / f"{name}.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}\.model: not a SentencePiece model"):
      tokenizer.load_sentencepiece(str(path))


def test_jsonl_garbage(tmp_path):
  path = tmp_path / "chat.jsonl"
  path.write_bytes(np.random.default_rng(0).bytes(3000))
  source = sources.ChatJsonlSource(str(path))
  with pytest.raises(sources.BadRecordError, match=r"chat\.jsonl:\d+: "):
    source[0]  # pylint: disable=pointless-statement
  path.write_bytes(b"[" * 100_000 + b"\n")
  with pytest.raises(sources.BadRecordError, match=r"chat\.jsonl:1: malformed JSON"):
    sources.ChatJsonlSource(str(path))[0]  # pylint: disable=expression-not-assigned


def test_latents_shards_truncated_or_garbage(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
      "mean": rng.standard_normal((6, 2, 2, 1)).astype(np.float32),
      "logvar": rng.standard_normal((6, 2, 2, 1)).astype(np.float32),
      "label": rng.integers(0, 5, 6),
  }
  written = tfds_latents.write_latents(str(tmp_path / "good"), {"train": arrays})
  (shard,) = [n for n in os.listdir(written) if ".array_record" in n]
  data = (tmp_path / written / shard).read_bytes()
  flipped = bytearray(data)
  flipped[150] ^= 0xFF  # inside the records' chunk: the file opens, reading the record fails
  for name, content, match in (
      ("truncated", data[: len(data) // 2], "truncated or corrupt ArrayRecord shard: it holds 0 records"),
      ("short", data[:100], "truncated or corrupt ArrayRecord shard"),
      ("garbage", rng.bytes(len(data)), "truncated or corrupt ArrayRecord shard"),
      ("flipped", bytes(flipped), "unreadable ArrayRecord data"),
  ):
    copy = tmp_path / name
    shutil.copytree(tmp_path / "good", copy)
    target = os.path.join(written.replace(str(tmp_path / "good"), str(copy)), shard)
    with open(target, "wb") as f:
      f.write(content)
    source = tfds_latents.latent_source(str(copy), "train")
    with pytest.raises(tfds_latents.CorruptShardError, match=re.escape(target) + ": " + match):
      source[0]  # pylint: disable=pointless-statement
  info = os.path.join(written.replace(str(tmp_path / "good"), str(tmp_path / "truncated")), "dataset_info.json")
  with open(info, "wb") as f:
    f.write(b"\xff{ garbage")
  with pytest.raises(ValueError, match=r"truncated/monoformer_latents: cannot open split 'train'"):
    tfds_latents.latent_source(str(tmp_path / "truncated"), "train")

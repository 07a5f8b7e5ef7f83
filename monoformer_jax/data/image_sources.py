"""Image sources: a class-per-folder tree (ImageNet layout) and image-text JSONL (JourneyDB-style).

Images are decoded lazily with Pillow, converted to RGB (or L for channels=1) and, when
`image_size` is set, resized and centre-cropped the way ADM / DiT / MonoFormer do
(`center_crop_arr`: box-downsample by 2 while the short side is >= 2x the target, bicubic-resize
the short side to the target, crop the centre). Records hold uint8 HWC arrays.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from monoformer_jax import paths as paths_lib
from monoformer_jax.data.sources import BadRecordError, JsonLinesSource, Source

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def center_crop_arr(image, image_size: int):
  """ADM's centre crop: a PIL image -> a PIL image of image_size x image_size."""
  while min(*image.size) >= 2 * image_size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = image_size / min(*image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  w, h = image.size
  left, top = (w - image_size) // 2, (h - image_size) // 2
  return image.crop((left, top, left + image_size, top + image_size))


def load_image(path: str, image_size: int | None, channels: int) -> np.ndarray:
  """Decodes one image file to uint8 (H, W, channels). Raises BadRecordError naming the file."""
  try:
    with epath.Path(path).open("rb") as f, Image.open(f) as im:
      im = im.convert("L" if channels == 1 else "RGB")
      if image_size is not None:
        im = center_crop_arr(im, image_size)
      arr = np.asarray(im, np.uint8)
  except FileNotFoundError as e:
    raise BadRecordError(f"{path}: image file not found") from e
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise BadRecordError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e
  return arr[..., None] if arr.ndim == 2 else arr


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


WNID = re.compile(r"^n\d{8}$")  # a WordNet synset id, ImageNet's class folder names


def read_synset_names(path) -> dict[str, str]:
  """{wnid: human name} from ImageNet's standard synset mapping: `LOC_synset_mapping.txt`
  (lines "n01440764 tench, Tinca tinca": the first synonym is the name) or a JSON file
  ({wnid: name}, {wnid: [names]} or Keras' imagenet_class_index.json {"0": [wnid, name]})."""
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such synset mapping file")
  text = path.read_text()
  try:
    data = json.loads(text)
  except ValueError:
    data = None
  names = {}
  if isinstance(data, dict):
    for key, value in data.items():
      if isinstance(value, list) and len(value) == 2 and WNID.match(str(value[0])):
        names[str(value[0])] = str(value[1])  # {"0": [wnid, name]}
      elif WNID.match(str(key)):
        names[str(key)] = str(value[0] if isinstance(value, list) else value).split(",", 1)[0].strip()
  elif data is None:
    for line in text.splitlines():
      wnid, _, rest = line.strip().partition(" ")
      if WNID.match(wnid) and rest.strip():
        names[wnid] = rest.split(",", 1)[0].strip()
  if not names:
    raise ValueError(
        f"{path}: no synset names found (expected lines 'n01440764 tench, Tinca tinca' or JSON "
        "{wnid: name} / {id: [wnid, name]})"
    )
  return names


def _load_class_names(class_names, folders: list[str]) -> list[str]:
  """Display names per folder: a dict folder->name, a list aligned with sorted folders, a JSON file
  holding either, or None (the folder names themselves)."""
  if class_names is None:
    return list(folders)
  if isinstance(class_names, (str, os.PathLike)):
    class_names = json.loads(epath.Path(class_names).read_text())
  if isinstance(class_names, dict):
    missing = [c for c in folders if c not in class_names]
    if missing:
      raise ValueError(f"class name mapping has no entry for folders {missing[:5]}")
    return [str(class_names[c]) for c in folders]
  names = list(class_names)
  if len(names) != len(folders):
    raise ValueError(f"{len(names)} class names for {len(folders)} class folders")
  return [str(n) for n in names]


class ImageFolderSource(Source):
  """root/<class>/<image>: {"image": uint8 HWC, "label": int, "class_name": str}.

  Labels follow the sorted folder names (ImageNet wnids sort to the standard 0..999 ids).
  `class_names` maps folders to the names used in prompts (see `_load_class_names`).
  """

  def __init__(
      self,
      root: str,
      image_size: int | None = None,
      channels: int = 3,
      class_names=None,
      skip_bad_records: bool = False,
  ):
    root = os.fspath(root)
    if not epath.Path(root).is_dir():
      raise FileNotFoundError(f"{root}: image folder not found")
    folders, root_files = paths_lib.list_dir(root)
    loose = [e for e in root_files if _is_image(e)]
    if loose:
      raise ValueError(
          f"{root}: unknown class folder layout: images directly in the root (e.g. "
          f"{loose[0]}); expected root/<class>/<image>"
      )
    if not folders:
      raise ValueError(f"{root}: unknown class folder layout: no class sub-folders; expected root/<class>/<image>")
    paths, labels = [], []
    for label, folder in enumerate(folders):
      d = os.path.join(root, folder)
      nested, files = paths_lib.list_dir(d)
      files = [f for f in files if _is_image(f)]
      if not files:
        extra = f" (it holds sub-folders {sorted(nested)[:3]}: one level too deep?)" if nested else ""
        raise ValueError(f"{d}: unknown class folder layout: class folder has no images{extra}")
      paths.extend(os.path.join(folder, f) for f in files)
      labels.extend([label] * len(files))
    self.root, self.folders = root, folders
    self.class_names = _load_class_names(class_names, folders)
    self.paths, self.labels = paths, np.asarray(labels, np.int32)
    self.image_size, self.channels, self.skip_bad_records = image_size, channels, skip_bad_records

  @property
  def num_classes(self) -> int:
    return len(self.folders)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int):
    try:
      image = load_image(os.path.join(self.root, self.paths[i]), self.image_size, self.channels)
    except BadRecordError as e:
      return self._bad(str(e))
    label = int(self.labels[i])
    return {"image": image, "label": label, "class_name": self.class_names[label]}

  def record_name(self, i: int) -> str:
    return os.path.join(self.root, self.paths[i])

  def __repr__(self) -> str:
    return (
        f"ImageFolderSource(root={self.root!r}, image_size={self.image_size}, "
        f"channels={self.channels}, n={len(self)}, classes={self.num_classes})"
    )


class ImageTextJsonlSource(JsonLinesSource):
  """JSONL lines {"image": path, "prompt": str} (JourneyDB-style) -> {"image", "prompt"}.

  Relative image paths are resolved against `image_root` (default: the JSONL file's folder).
  """

  def __init__(
      self,
      paths,
      image_root: str | None = None,
      image_size: int | None = None,
      channels: int = 3,
      image_key: str = "image",
      prompt_key: str = "prompt",
      skip_bad_records: bool = False,
  ):
    self.image_root, self.image_size, self.channels = image_root, image_size, channels
    self.image_key, self.prompt_key = image_key, prompt_key
    super().__init__(paths, skip_bad_records)

  def _record(self, obj, i: int):
    where = self.index.where(i)
    if not isinstance(obj, dict):
      return self._bad(f"{where}: expected a JSON object")
    image, prompt = obj.get(self.image_key), obj.get(self.prompt_key)
    if not isinstance(image, str) or not isinstance(prompt, str):
      return self._bad(f'{where}: needs string fields "{self.image_key}" and "{self.prompt_key}"')
    root = self.image_root or os.path.dirname(self.index.paths[self.index.files[i]])
    try:
      array = load_image(os.path.join(root, image), self.image_size, self.channels)
    except BadRecordError as e:
      return self._bad(f"{where}: {e}")
    return {"image": array, "prompt": prompt}

  def __repr__(self) -> str:
    return (
        f"ImageTextJsonlSource(paths={self.paths!r}, image_root={self.image_root!r}, "
        f"image_size={self.image_size}, channels={self.channels}, n={len(self)})"
    )

"""Data sources by name: `config.data.image_source` / `text_source` -> a random-access source.

A new source is one function here, `(data config, **kw) -> source`, added to IMAGE_SOURCES or
TEXT_SOURCES; the trainer, the tokenizer's corpus and the config checks find it by name.
"""

from __future__ import annotations

import json

from etils import epath

from monoformer_jax.data import captions, image_sources, llava, mnist, sources, tfds_latents


class DataConfigError(ValueError):
  """A data field that cannot work (the field is named in the message)."""


def class_names(data) -> list[str] | None:
  """Class names for label -> prompt: `data.class_names_file` (a JSON list, `{id: name}` or
  ImageNet-style `{id: [wnid, name]}`), MNIST's for the MNIST sources, the `class_names.json`
  extract_latents wrote beside `latents`, else None."""
  if data.class_names_file:
    path = epath.Path(data.class_names_file)
    if not path.is_file():
      raise DataConfigError(f"config.data.class_names_file: no such file {str(path)!r}")
    return _read_names(path, "config.data.class_names_file")
  if data.image_source in ("mnist", "mnist_latents", "mnist_captions"):
    return list(mnist.CLASS_NAMES)
  if data.image_source == "latents" and data.image_path:
    # The map extract_latents writes beside the dataset: a run needs no separate flag for it.
    beside = epath.Path(data.image_path) / "class_names.json"
    if beside.is_file():
      return _read_names(beside, "config.data.image_path")
  return None


def _read_names(path: epath.Path, field: str) -> list[str]:
  try:
    names = json.loads(path.read_text())
  except ValueError as e:
    raise DataConfigError(f"{field}: {path} is not JSON ({e})") from None
  return names_from_json(names, str(path))


def names_from_json(names, where: str) -> list[str]:
  """A JSON list of names, or {id: name} / {id: [wnid, name]} in id order."""
  if isinstance(names, dict):
    try:
      names = [names[k] for k in sorted(names, key=int)]
    except ValueError:
      raise DataConfigError(f"{where}: keys must be class ids (0, 1, ...)") from None
  if not isinstance(names, list) or not names:
    raise DataConfigError(f"{where}: expected a non-empty list of class names")
  out = [n if isinstance(n, str) else (n[-1] if isinstance(n, list) and n else None) for n in names]
  bad = [i for i, n in enumerate(out) if not isinstance(n, str) or not n.strip()]
  if bad:
    raise DataConfigError(f"{where}: class {bad[0]} has no name ({names[bad[0]]!r})")
  return out


def _need_path(data, source_field: str) -> str:
  field = "image_path" if source_field == "image_source" else "text_path"
  if not data[field]:
    raise DataConfigError(f"config.data.{field}: required for {source_field}={data[source_field]!r}")
  return data[field]


def _latents(data, image_shape, split="train"):
  del image_shape  # the latents carry their own
  return tfds_latents.latent_source(
      _need_path(data, "image_source"),
      split,
      class_names=class_names(data),
      skip_bad_records=data.skip_bad_records,
  )


def _image_folder(data, image_shape, split="train"):
  del split
  source = image_sources.ImageFolderSource(
      _need_path(data, "image_source"),
      image_size=image_shape[0],
      channels=image_shape[2],
      skip_bad_records=data.skip_bad_records,
  )
  names = class_names(data)
  if names is not None and len(names) < source.num_classes:
    # Every image of the folders past the names would be a bad record: one error now, even when
    # skipping, instead of whole classes dropped from the run.
    raise DataConfigError(
        f"config.data.class_names_file: {len(names)} class names for the {source.num_classes} class folders "
        f"of {source.root} (folder {source.folders[len(names)]!r}, class id {len(names)}, has no name)"
    )
  return source


def _image_text_jsonl(data, image_shape, split="train"):
  del split
  return image_sources.ImageTextJsonlSource(
      _need_path(data, "image_source").split(","),
      image_size=image_shape[0],
      channels=image_shape[2],
      skip_bad_records=data.skip_bad_records,
  )


IMAGE_SOURCES = {
    "mnist": lambda data, image_shape, split="train": sources.MnistSource(split=split),
    "mnist_latents": _latents,
    "latents": _latents,
    "image_folder": _image_folder,
    "image_text_jsonl": _image_text_jsonl,
    "mnist_captions": lambda data, image_shape, split="train": captions.MnistCaptionSource(split=split),
}
# Sources whose records carry free-text prompts (cut to data.max_prompt_tokens), not class names.
FREE_TEXT_SOURCES = ("image_text_jsonl", "mnist_captions")


def _text_files(data, split="train"):
  del split
  return sources.TextFileSource(_need_path(data, "text_source").split(","), skip_bad_records=data.skip_bad_records)


def _chat_jsonl(data, split="train"):
  del split
  return sources.ChatJsonlSource(_need_path(data, "text_source").split(","), skip_bad_records=data.skip_bad_records)


TEXT_SOURCES = {
    "pydoc": lambda data, split="train": sources.PydocSource(split=split),
    "text_file": _text_files,
    "chat_jsonl": _chat_jsonl,
}


def image_source(data, image_shape, split: str = "train"):
  """The image source `data.image_source` names; `image_shape` (H, W, C) of what the model
  diffuses (image files are centre-cropped to it)."""
  return IMAGE_SOURCES[data.image_source](data, tuple(image_shape), split)


def text_source(data, split: str = "train"):
  return TEXT_SOURCES[data.text_source](data, split)


def _llava(data, image_shape, split="train"):
  del split
  if not data.understand_path:
    raise DataConfigError("config.data.understand_path: required for understand_source='llava' (the JSON list)")
  return llava.LlavaSource(
      data.understand_path,
      image_root=data.understand_image_root,
      image_size=image_shape[0],
      channels=image_shape[2],
      skip_bad_records=data.skip_bad_records,
  )


# Sources of conversations about images ({"turns", ["image"]}) for the `understand` steps.
CONVERSATION_SOURCES = {"llava": _llava}


def conversation_source(data, image_shape, split: str = "train"):
  """The conversations `data.understand_source` names (data.understand_path, its images under
  data.understand_image_root), images centre-cropped to `image_shape` (H, W, C)."""
  return CONVERSATION_SOURCES[data.understand_source](data, tuple(image_shape), split)


def free_text_prompts(data, source) -> bool:
  """Whether the image records of `source` carry free-text prompts (cut to
  data.max_prompt_tokens) rather than class names: captioned latents carry them too."""
  return data.image_source in FREE_TEXT_SOURCES or bool(getattr(source, "has_prompts", False))


def understand_source(data, image_shape, split: str = "train"):
  """(source, class names) of the labelled images `data.understand_source` names, from the image
  sources (reading data.image_path / class_names_file as they do); the names are the answers."""
  if data.understand_source not in IMAGE_SOURCES:
    raise DataConfigError(
        f"config.data.understand_source: {data.understand_source!r} is not one of "
        f"{tuple(IMAGE_SOURCES) + tuple(CONVERSATION_SOURCES)}"
    )
  view = data.copy_and_resolve_references()
  view.image_source = data.understand_source
  names = class_names(view)
  if names is None:
    raise DataConfigError(
        f"config.data.understand_source: {data.understand_source!r} has no class names to answer with "
        "(set config.data.class_names_file)"
    )
  return IMAGE_SOURCES[view.image_source](view, tuple(image_shape), split), names

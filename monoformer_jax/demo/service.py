"""What the demo page asks of a model, bounded: `DemoService` turns one request (a dict read from
JSON) into one `InferenceModel` call and a JSON-ready answer. Model calls go one at a time (a
lock): the model, its compiled samplers and the host's cores are shared, and two requests at once
would each take as long as both in turn."""

from __future__ import annotations

import threading
import time

import numpy as np

from monoformer_jax.demo import drawing, fields
from monoformer_jax.demo.fields import BadRequest
from monoformer_jax.inference import InferenceError
from monoformer_jax.run import images as images_lib

# What one request may ask for: enough to play with, little enough that no request holds the
# server for long.
LIMITS = dict(
    max_images=16,
    max_steps=50,
    max_guidance=20.0,
    max_seed=2**31 - 1,
    max_new_tokens=64,
    max_temperature=2.0,
    max_prompt_chars=300,
    answer_tokens=16,
)


class DemoService:
  """The demo's four features over one loaded `InferenceModel`.

  Each `draw_*` / `read_drawing` / `continue_text` takes the request's fields and returns a dict
  for the page; bad fields raise `BadRequest`, and so does whatever the model refuses
  (`InferenceError`), with its message."""

  def __init__(self, model, source: str = ""):
    self.model = model
    self.source = source
    self._lock = threading.Lock()
    shape = (model.config.image_height, model.config.image_width, model.config.image_channels)
    self.image_shape = tuple(int(s) for s in shape)
    self.features = {
        "classes": self._classes_reason(),
        "caption": None,
        "read": self._read_reason(),
        "text": None,
    }

  # -- what the loaded run can do -------------------------------------------------------------
  def _classes_reason(self):
    if not self.model.class_names:
      return "this run has no class names (it was not trained on classes): draw from a caption instead"
    return None

  def _read_reason(self):
    run_config = self.model.run_config
    if run_config is not None and run_config.vae.path:
      return "this run reads VAE latents, not drawn pixels"
    if self.image_shape[-1] not in (1, 3):
      return f"this run's images have {self.image_shape[-1]} channels, not a drawing's 1 or 3"
    # Asking is the one sure test (the model knows whether it was trained to read), and for a
    # run that reads it compiles the reader before the first visitor waits on it.
    try:
      self.model.describe(np.zeros((1, *self.image_shape), np.uint8), max_new_tokens=LIMITS["answer_tokens"])
    except InferenceError as e:
      return str(e)
    return None

  def info(self) -> dict:
    model = self.model
    defaults, image = model.defaults, model.image_sampling
    question = model.run_config.data.get("understand_question") if model.run_config is not None else None
    return {
        "source": self.source,
        "step": model.step,
        "image_shape": list(self.image_shape),
        "class_names": list(model.class_names or []),
        "features": {name: {"enabled": reason is None, "reason": reason} for name, reason in self.features.items()},
        "limits": LIMITS,
        "defaults": {
            "guidance_scale": image.guidance_scale,
            "num_steps": min(image.num_steps, LIMITS["max_steps"]),
            "seed": int(defaults["seed"]),
            "max_new_tokens": min(int(defaults["max_new_tokens"]), LIMITS["max_new_tokens"]),
            "temperature": float(defaults["temperature"]),
            "question": question or "",
        },
    }

  # -- requests -------------------------------------------------------------------------------
  def _check(self, feature: str) -> None:
    if self.features[feature] is not None:
      raise BadRequest(self.features[feature])

  def _image_options(self, request: dict) -> dict:
    defaults = self.info()["defaults"]
    return dict(
        guidance_scale=fields.real(request, "guidance_scale", defaults["guidance_scale"], 1.0, LIMITS["max_guidance"]),
        num_steps=fields.integer(request, "num_steps", defaults["num_steps"], 1, LIMITS["max_steps"]),
        seed=fields.integer(request, "seed", defaults["seed"], 0, LIMITS["max_seed"]),
    )

  def _call(self, fn):
    """`fn()` under the lock, the model's refusals as BadRequest; returns (result, seconds)."""
    with self._lock:
      start = time.perf_counter()
      try:
        result = fn()
      except InferenceError as e:
        raise BadRequest(str(e)) from e
      return result, time.perf_counter() - start

  def _pictures(self, images) -> list[str]:
    """Model-space images -> PNG data URLs (through the run's VAE, if it has one)."""
    return [drawing.png_data_url(p) for p in images_lib.to_uint8(self.model.decode(images))]

  def draw_classes(self, request: dict) -> dict:
    """{classes: [id or name, ...], num_per_class, guidance_scale, num_steps, seed}."""
    self._check("classes")
    classes = request.get("classes")
    if isinstance(classes, (str, int)) and not isinstance(classes, bool):
      classes = [classes]
    if not isinstance(classes, list) or not classes:
      raise BadRequest("classes: choose at least one class")
    if any(isinstance(c, bool) or not isinstance(c, (str, int)) for c in classes):
      raise BadRequest(f"classes: give class ids or names, got {classes!r}"[:200])
    per = fields.integer(request, "num_per_class", 1, 1, LIMITS["max_images"])
    if per * len(classes) > LIMITS["max_images"]:
      raise BadRequest(
          f"{len(classes)} classes x {per} = {per * len(classes)} images; at most {LIMITS['max_images']} a request"
      )
    options = self._image_options(request)
    classes = [c.strip() if isinstance(c, str) else c for c in classes]  # ids or names: the model checks them

    def sample():
      images, labels = self.model.sample_classes(classes, per, **options)
      return self._pictures(images), labels

    (pictures, labels), seconds = self._call(sample)
    names = self.model.class_names
    return {
        "images": [{"src": p, "label": names[int(k)]} for p, k in zip(pictures, labels)],
        "seconds": round(seconds, 2),
    }

  def draw_caption(self, request: dict) -> dict:
    """{prompt, num_images, guidance_scale, num_steps, seed}."""
    self._check("caption")
    prompt = fields.text(request, "prompt", LIMITS["max_prompt_chars"])
    count = fields.integer(request, "num_images", 1, 1, LIMITS["max_images"])
    options = self._image_options(request)
    pictures, seconds = self._call(lambda: self._pictures(self.model.text_to_image([prompt] * count, **options)))
    return {"images": [{"src": p, "label": prompt} for p in pictures], "seconds": round(seconds, 2)}

  def read_drawing(self, request: dict) -> dict:
    """{image: PNG data URL of the canvas, question (optional: the run's own)} -> the answer and
    the digit as the model saw it."""
    self._check("read")
    try:
      digit = drawing.mnist_style(drawing.decode_data_url(request.get("image")), self.image_shape[:2])
    except drawing.DrawingError as e:
      raise BadRequest(str(e)) from e
    question = fields.text(request, "question", LIMITS["max_prompt_chars"], default=self.info()["defaults"]["question"])
    pixels = np.repeat(digit[None, :, :, None], self.image_shape[-1], axis=-1)
    answers, seconds = self._call(
        lambda: self.model.describe(pixels, question or None, max_new_tokens=LIMITS["answer_tokens"])
    )
    return {
        "answer": answers[0],
        "question": question,
        "seen": drawing.png_data_url(pixels[0]),
        "seconds": round(seconds, 2),
    }

  def continue_text(self, request: dict) -> dict:
    """{prompt, max_new_tokens, temperature (0: greedy), seed}."""
    self._check("text")
    defaults = self.info()["defaults"]
    prompt = fields.text(request, "prompt", LIMITS["max_prompt_chars"])
    tokens = fields.integer(request, "max_new_tokens", defaults["max_new_tokens"], 1, LIMITS["max_new_tokens"])
    temperature = fields.real(request, "temperature", defaults["temperature"], 0.0, LIMITS["max_temperature"])
    seed = fields.integer(request, "seed", defaults["seed"], 0, LIMITS["max_seed"])
    (completion,), seconds = self._call(
        lambda: self.model.generate_text([prompt], max_new_tokens=tokens, temperature=temperature, seed=seed)
    )
    return {"prompt": prompt, "completion": completion, "seconds": round(seconds, 2)}

"""The browser demo (monoformer_jax/demo): drawings read as MNIST digits look, the JSON API on
two trained tiny runs (one that reads images, one that does not), every bad request answered with
HTTP 400 and a message while the server keeps serving, and the page itself in the distribution's
headless Chromium driven by Selenium: it loads, draws a digit, reads a stroke drawn with the
mouse, shows a bad value's message, and writes a screenshot."""

import base64
import io
import json
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from benchmarks import demo_screenshot
from monoformer_jax.data import mnist
from monoformer_jax.demo import __main__ as demo_main
from monoformer_jax.demo import drawing
from monoformer_jax.demo.server import DemoServer
from monoformer_jax.demo.service import DemoService
from monoformer_jax.inference import InferenceModel
from monoformer_jax.run import images as images_lib
from tests.helpers import shared_all_in_one_run, shared_tiny_run


# -- drawings -> MNIST digits ----------------------------------------------------------------------
def _canvas_of(digit, rng, factor=10):
  """An MNIST digit's ink drawn large (nearest neighbour, `factor` x) somewhere on a black
  280x280 canvas, as a visitor might draw it."""
  rows, cols = np.nonzero(digit > drawing.INK_THRESHOLD)
  big = np.kron(digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], np.ones((factor, factor), np.uint8))
  canvas = np.zeros((280, 280), np.uint8)
  top, left = rng.integers(0, 281 - big.shape[0]), rng.integers(0, 281 - big.shape[1])
  canvas[top : top + big.shape[0], left : left + big.shape[1]] = big
  return canvas


def _centre_of_mass(image):
  ys, xs = np.indices(image.shape)
  mass = image.astype(np.float64)
  return (ys * mass).sum() / mass.sum(), (xs * mass).sum() / mass.sum()


def test_a_large_off_centre_drawing_becomes_the_mnist_digit_it_was(rng):
  """MNIST digits are their ink scaled into a 20x20 box and centred by mass in 28x28: a digit
  drawn 10x large anywhere on the canvas comes back as (nearly) the digit itself."""
  images, _ = mnist.load_mnist5k()
  digits = images[rng.choice(len(images), 40, replace=False), ..., 0]
  agreement = []
  for digit in digits:
    out = drawing.mnist_style(_canvas_of(digit, rng))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    rows, cols = np.nonzero(out > drawing.INK_THRESHOLD)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 == drawing.MNIST_BOX
    assert np.allclose(_centre_of_mass(out), 14.0, atol=0.5)  # where MNIST's are (pixel index)
    agreement.append(np.corrcoef(out.ravel().astype(float), digit.ravel().astype(float))[0, 1])
  assert np.median(agreement) > 0.99 and min(agreement) > 0.7, agreement


def test_a_stroke_keeps_its_shape_and_an_empty_canvas_is_refused():
  canvas = np.zeros((280, 280), np.uint8)
  canvas[40:240, 30:48] = 255  # a tall bar near the left edge: a "1"
  out = drawing.mnist_style(canvas)
  rows, cols = np.nonzero(out > drawing.INK_THRESHOLD)
  assert np.ptp(rows) + 1 == 20 and np.ptp(cols) + 1 <= 3  # tall and thin, not stretched square
  assert abs(_centre_of_mass(out)[1] - 14.0) <= 0.5
  assert drawing.mnist_style(canvas, (14, 14)).shape == (14, 14)  # the box scales with the field
  with pytest.raises(drawing.DrawingError, match="empty"):
    drawing.mnist_style(np.zeros((280, 280), np.uint8))


def _png_url(array, mode=None) -> str:
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, format="PNG")
  return drawing.PNG_PREFIX + base64.b64encode(buf.getvalue()).decode()


def _pixels(data_url) -> np.ndarray:
  assert data_url.startswith(drawing.PNG_PREFIX)
  with Image.open(io.BytesIO(base64.b64decode(data_url[len(drawing.PNG_PREFIX) :]))) as image:
    assert image.format == "PNG"
    return np.asarray(image)


def test_data_urls_round_trip_and_transparency_is_black():
  rgba = np.zeros((30, 20, 4), np.uint8)
  rgba[5:9, 3:7] = (255, 255, 255, 255)
  rgba[20:, :, :3] = 255  # white but fully transparent: background
  grey = drawing.decode_data_url(_png_url(rgba, "RGBA"))
  assert grey.shape == (30, 20) and grey[5:9, 3:7].min() == 255 and grey.sum() == 255 * 16
  digit = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
  shown = _pixels(drawing.png_data_url(digit))
  assert shown.shape == (112, 112) and np.array_equal(shown[::4, ::4], digit[..., 0])  # nearest, 4x
  for bad, message in [
      ("data:image/jpeg;base64,AAAA", "PNG data URL"),
      (drawing.PNG_PREFIX + "not base64!", "cannot read"),
      (drawing.PNG_PREFIX + base64.b64encode(b"GIF89a").decode(), "cannot read"),
      (_png_url(np.zeros((1100, 10), np.uint8)), "larger than"),
      (None, "PNG data URL"),
  ]:
    with pytest.raises(drawing.DrawingError, match=message):
      drawing.decode_data_url(bad)


# -- the server on two trained runs ---------------------------------------------------------------
class Served:
  """A DemoServer on a free port in a thread, with the model it serves."""

  def __init__(self, workdir):
    self.model = InferenceModel.from_workdir(str(workdir))
    self.service = DemoService(self.model, source=str(workdir))
    self.server = DemoServer(self.service, port=0)
    self.url = self.server.url
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()

  def request(self, path, body=None):
    """(HTTP status, the JSON answer) of GET `path` (body None) or POST of `body` (a dict, or
    bytes sent as they are)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path.lstrip("/"), data=data, method="GET" if body is None else "POST")
    try:
      with urllib.request.urlopen(req, timeout=300) as response:
        return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
  """The server on the all_in_one,test run: classes, captions, reading and text."""
  served = Served(shared_all_in_one_run(tmp_path_factory))
  yield served
  served.close()


@pytest.fixture(scope="module")
def drawer(tmp_path_factory):
  """The server on the tiny class-conditional run, which does not read images."""
  served = Served(shared_tiny_run(tmp_path_factory))
  yield served
  served.close()


def _stroke_url():
  canvas = np.zeros((280, 280), np.uint8)
  canvas[50:230, 130:150] = 255
  return _png_url(canvas)


def test_info_says_what_each_run_can_do(reader, drawer):
  status, info = reader.request("/api/info")
  assert status == 200 and info["class_names"][3] == "three" and info["image_shape"] == [28, 28, 1]
  assert all(f["enabled"] for f in info["features"].values()), info["features"]
  assert info["defaults"]["question"] == "Which digit is this?" and info["step"] == 6
  status, info = drawer.request("/api/info")
  assert status == 200 and info["features"]["classes"]["enabled"] and info["features"]["text"]["enabled"]
  assert not info["features"]["read"]["enabled"] and "does not read images" in info["features"]["read"]["reason"]
  status, answer = drawer.request("/api/read", {"image": _stroke_url()})
  assert status == 400 and "does not read images" in answer["error"]


BAD_REQUESTS = [
    ("/api/classes", {"classes": [3], "num_steps": 1000}, "num_steps must be between 1 and 50, got 1000"),
    ("/api/classes", {"classes": [3], "num_steps": "many"}, "num_steps must be a whole number"),
    ("/api/classes", {"classes": [3], "num_steps": 2.5}, "num_steps must be a whole number"),
    ("/api/classes", {"classes": [3], "guidance_scale": 0.5}, "guidance_scale must be between 1 and 20"),
    ("/api/classes", {"classes": [3], "guidance_scale": "nan"}, "guidance_scale must be between"),
    ("/api/classes", {"classes": [3], "seed": -1}, "seed must be between 0"),
    ("/api/classes", {"classes": ["eleven"]}, "unknown class 'eleven'"),
    ("/api/classes", {"classes": [12]}, "class id 12 is out of range"),
    ("/api/classes", {"classes": []}, "choose at least one class"),
    ("/api/classes", {"classes": [[1]]}, "class ids or names"),
    ("/api/classes", {"classes": list(range(10)), "num_per_class": 2}, "10 classes x 2 = 20 images; at most 16"),
    ("/api/caption", {"prompt": "   "}, "prompt is empty"),
    ("/api/caption", {"prompt": "a seven", "num_images": 17}, "num_images must be between 1 and 16"),
    ("/api/caption", {"prompt": "x" * 301}, "at most 300"),
    ("/api/text", {"prompt": "The", "max_new_tokens": 65}, "max_new_tokens must be between 1 and 64"),
    ("/api/text", {"prompt": "The", "temperature": -1}, "temperature must be between 0 and 2"),
    ("/api/text", {"prompt": 7}, "prompt must be text"),
    ("/api/read", {"image": "data:image/png;base64,xx"}, "cannot read the PNG"),
    ("/api/read", {"image": _png_url(np.zeros((280, 280), np.uint8))}, "the drawing is empty"),
    ("/api/read", {}, "PNG data URL"),
    ("/api/classes", b"nope", "not JSON"),
    ("/api/classes", b"[3]", "must be a JSON object"),
    ("/api/classes", b"", "the request is empty"),
]


@pytest.mark.parametrize("path, body, message", BAD_REQUESTS, ids=[m[:32] for _, _, m in BAD_REQUESTS])
def test_a_bad_request_is_answered_400_with_its_message(reader, path, body, message):
  status, answer = reader.request(path, body)
  assert status == 400 and message in answer["error"], answer
  assert reader.request("/api/info")[0] == 200  # still serving


def test_an_unknown_path_is_404_and_a_failing_model_call_is_500_not_a_dead_server(reader, monkeypatch):
  assert reader.request("/api/nope", {})[0] == 404 and reader.request("/nope")[0] == 404

  def broken(*args, **kwargs):
    raise RuntimeError("out of memory, say")

  monkeypatch.setattr(reader.model, "generate_text", broken)
  status, answer = reader.request("/api/text", {"prompt": "The"})
  assert status == 500 and "RuntimeError: out of memory, say" in answer["error"]
  monkeypatch.undo()
  status, answer = reader.request("/api/text", {"prompt": "The", "max_new_tokens": 4, "temperature": 0})
  assert (
      status == 200 and answer["completion"] == reader.model.generate_text(["The"], max_new_tokens=4, temperature=0)[0]
  )


def _model_digits(model, classes, per, **options):
  images, _ = model.sample_classes(classes, per, **options)
  return images_lib.to_uint8(model.decode(images))


def test_the_api_returns_the_models_own_digits_captions_and_answers(reader):
  options = dict(guidance_scale=2.0, num_steps=3, seed=11)
  # Two images a call, as the browser test asks: one compiled sampler for both.
  status, answer = reader.request("/api/classes", {"classes": ["three", 5], "num_per_class": 1, **options})
  assert status == 200 and [i["label"] for i in answer["images"]] == ["three", "five"]
  shown = np.stack([_pixels(i["src"])[::4, ::4, None] for i in answer["images"]])
  assert np.array_equal(shown, _model_digits(reader.model, [3, 5], 1, **options))
  status, answer = reader.request(
      "/api/caption", {"prompt": "Please generate an image of seven.", "num_images": 2, **options}
  )
  assert status == 200 and len(answer["images"]) == 2
  want = images_lib.to_uint8(reader.model.text_to_image(["Please generate an image of seven."] * 2, **options))
  assert np.array_equal(np.stack([_pixels(i["src"])[::4, ::4, None] for i in answer["images"]]), want)
  status, answer = reader.request("/api/read", {"image": _stroke_url(), "question": "Which digit is this?"})
  assert status == 200, answer
  seen = _pixels(answer["seen"])[::4, ::4, None]
  assert np.array_equal(seen[..., 0], drawing.mnist_style(drawing.decode_data_url(_stroke_url())))
  assert answer["answer"] == reader.model.describe(seen[None], "Which digit is this?")[0]


def test_the_command_refuses_a_missing_run_and_a_bad_port(tmp_path, capsys):
  assert demo_main.main([f"--workdir={tmp_path / 'nope'}"]) == 2
  assert "no such run directory" in capsys.readouterr().err
  assert demo_main.main([f"--workdir={tmp_path}", "--port=70000"]) == 2
  assert "--port" in capsys.readouterr().err
  assert demo_main.main([]) == 2 and "--workdir" in capsys.readouterr().err


# -- the page in a real browser ---------------------------------------------------------------------
def _browser(tmp_path):
  """Headless Chromium from the distribution's packages (.ci/run installs it), or a skip that
  says what is missing."""
  missing = demo_screenshot.missing_browser()
  if missing:
    pytest.skip(missing)
  return demo_screenshot.headless_chromium(tmp_path / "chromium-profile")


@pytest.mark.slow
def test_the_page_in_headless_chromium_draws_reads_and_answers_bad_values(reader, drawer, tmp_path):
  # pylint: disable=import-outside-toplevel  # selenium is a test extra: imported after the skip check
  driver = _browser(tmp_path)
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select, WebDriverWait

  find = lambda css: driver.find_element(By.CSS_SELECTOR, css)
  wait = WebDriverWait(driver, 240)

  def fill(css, value):
    element = find(css)
    element.clear()
    element.send_keys(str(value))

  try:
    driver.get(reader.url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert find("h1").text == "MonoFormer in JAX" and "step 6" in find("#run-info").text
    assert [h.text for h in driver.find_elements(By.CSS_SELECTOR, "section h2")] == [
        "Draw digits",
        "Read my drawing",
        "Continue text",
    ]
    # A digit drawn by class: the page shows the model's own pixels.
    Select(find("#class-select")).select_by_value("3")
    fill("#class-count", 2)
    fill("#guidance", 2)
    fill("#steps", 3)
    fill("#seed", 11)
    find("#draw-class").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.sample")) == 2)
    shown = np.stack(
        [_pixels(img.get_attribute("src")) for img in driver.find_elements(By.CSS_SELECTOR, "#gallery img")]
    )
    assert shown.shape == (2, 112, 112) and shown.std() > 0
    want = _model_digits(reader.model, [3], 2, guidance_scale=2.0, num_steps=3, seed=11)
    assert np.array_equal(shown[:, ::4, ::4, None], want)
    # A stroke drawn with the mouse: read, shown as the model saw it, and answered.
    canvas = find("#canvas")
    ActionChains(driver).move_to_element_with_offset(canvas, 0, -90).click_and_hold().move_by_offset(
        0, 60
    ).move_by_offset(0, 60).move_by_offset(0, 60).release().perform()
    find("#read").click()
    wait.until(lambda d: d.find_element(By.ID, "readout").is_displayed())
    seen = _pixels(find("#seen").get_attribute("src"))[::4, ::4]
    rows, cols = np.nonzero(seen > drawing.INK_THRESHOLD)
    assert np.ptp(rows) + 1 == 20 and np.ptp(cols) + 1 < 8, "the vertical stroke is not what was read"
    answer = reader.model.describe(seen[None, :, :, None], "Which digit is this?")[0]
    assert find("#answer").text == (answer.strip() or "(an empty answer)")
    assert find("#read-error").text == ""
    # Bad values: the server's message on the page, and the page keeps working.
    fill("#steps", 1000)
    find("#draw-class").click()
    wait.until(lambda d: d.find_element(By.ID, "draw-error").text)
    assert find("#draw-error").text == "num_steps must be between 1 and 50, got 1000"
    fill("#text-prompt", " ")
    find("#continue").click()
    wait.until(lambda d: d.find_element(By.ID, "text-error").text)
    assert "prompt is empty" in find("#text-error").text
    fill("#text-prompt", "The")
    fill("#text-tokens", 4)
    fill("#text-temperature", 0)
    find("#continue").click()
    wait.until(lambda d: d.find_element(By.ID, "completion").is_displayed())
    completion = reader.model.generate_text(["The"], max_new_tokens=4, temperature=0)[0]
    assert find("#completion").get_attribute("textContent") == "The" + completion and find("#text-error").text == ""
    screenshot = tmp_path / "demo.png"
    assert driver.save_screenshot(str(screenshot))
    with Image.open(screenshot) as image:
      pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 1000 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    # A run that does not read: the panel says why instead of failing.
    driver.get(drawer.url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert "does not read images" in find("#read-off").text and not find("#read").is_enabled()
    assert find("#draw-class").is_enabled()
  finally:
    driver.quit()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)

"""A screenshot of the browser demo (monoformer_jax/demo) after it has drawn, read and written:
the picture on the front page (docs/images/demo.png).

    python benchmarks/demo_screenshot.py --workdir pretrained:all_in_one --out docs/images/demo.png

Serves the run in this process, opens the page in the distribution's headless Chromium (Debian:
`apt-get install chromium chromium-driver`; the [test] extra has selenium), draws one digit of
every class, draws a 7 with the mouse and asks what it is, continues "The function", and saves the window.
`headless_chromium` is also what tests/test_demo.py drives the page with.
"""

import argparse
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402

tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)

from monoformer_jax.demo.server import DemoServer  # noqa: E402
from monoformer_jax.demo.service import DemoService  # noqa: E402
from monoformer_jax.inference import InferenceModel  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def missing_browser() -> str:
  """Why the headless browser cannot start here ('' when it can)."""
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
  if missing:
    return f"no {' / '.join(missing)}: install chromium and chromium-driver (apt-get; .ci/run does)"
  try:
    import selenium  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return "selenium is not installed (the [test] extra has it)"
  return ""


def headless_chromium(profile_dir, width: int = 1280, height: int = 860):
  """A Selenium driver of the distribution's headless Chromium, with a fresh profile in
  `profile_dir`. Works as root and with no network (nothing it starts may wait on one)."""
  from selenium import webdriver  # pylint: disable=import-outside-toplevel  # a test extra

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in (
      "--headless=new",
      "--no-sandbox",  # as root Chromium's sandbox refuses to start
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--hide-scrollbars",
      f"--window-size={width},{height}",
      f"--user-data-dir={profile_dir}",
  ):
    options.add_argument(arg)
  return webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--workdir", required=True, help="a run that reads images, or pretrained:NAME")
  parser.add_argument("--out", default="docs/images/demo.png")
  parser.add_argument("--per_class", type=int, default=1)
  parser.add_argument("--prompt", default="The function")
  args = parser.parse_args()
  reason = missing_browser()
  if reason:
    sys.exit(f"error: {reason}")
  # pylint: disable=import-outside-toplevel
  import tempfile

  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select, WebDriverWait

  server = DemoServer(DemoService(InferenceModel.from_workdir(args.workdir), source=args.workdir), port=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  with tempfile.TemporaryDirectory() as profile:
    driver = headless_chromium(profile)
    try:
      wait = WebDriverWait(driver, 600)
      find = lambda css: driver.find_element(By.CSS_SELECTOR, css)
      driver.get(server.url)
      wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
      Select(find("#class-select")).select_by_value("*")
      find("#class-count").clear()
      find("#class-count").send_keys(str(args.per_class))
      find("#draw-class").click()
      wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img.sample"))
      # A 7: the bar from left to right, then the stem down to the lower left.
      ActionChains(driver).move_to_element_with_offset(find("#canvas"), -70, -85).click_and_hold().move_by_offset(
          70, 0
      ).move_by_offset(70, 0).move_by_offset(-40, 85).move_by_offset(-40, 85).release().perform()
      find("#read").click()
      wait.until(lambda d: d.find_element(By.ID, "readout").is_displayed())
      find("#text-prompt").clear()
      find("#text-prompt").send_keys(args.prompt)
      find("#continue").click()
      wait.until(lambda d: d.find_element(By.ID, "completion").is_displayed())
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      driver.save_screenshot(args.out)
      print(f"answer: {find('#answer').text!r}; completion: {find('#completion').text!r}; wrote {args.out}")
    finally:
      driver.quit()
      server.shutdown()


if __name__ == "__main__":
  main()

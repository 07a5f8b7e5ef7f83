"""Make the trained weights shipped in monoformer_jax/pretrained/ (opened as `pretrained:NAME`).

    python benchmarks/make_pretrained.py --name mnist_tiny          # trains (~8 min on 2 cores)
    python benchmarks/make_pretrained.py --name all_in_one
    python benchmarks/make_pretrained.py --name mnist_tiny --from_run runs/mnist_tiny   # re-export

Trains the recipe of NAME with the README's command (or takes an existing run), scores it with
benchmarks/mnist_quality.py (digits recognised, digit-FID, held-out perplexity, and reading for a
run that reads), exports its EMA weights (`tools.export`, float32) to monoformer_jax/pretrained/NAME
and writes there a card (CARD.json: the command, the commit, the host, the training time and the
quality; README.md: the same for a reader). Run it again when the export format changes: the
shipped-weights test names this command when the folders no longer load.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = os.path.join(ROOT, "monoformer_jax", "pretrained")
RECIPES = {
    "mnist_tiny": "configs/mnist_tiny.py",
    "all_in_one": "configs/mnist_tiny.py:all_in_one",
}


def _run(*args) -> str:
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
  return proc.stdout


def _host() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    model = platform.processor()
  return f"{model}, {os.cpu_count()} cores"


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--name", choices=sorted(RECIPES), required=True)
  p.add_argument("--workdir", default=None, help="where to train (default runs/pretrained/NAME)")
  p.add_argument("--from_run", default=None, help="export this finished run instead of training")
  args = p.parse_args()
  command = f"python -m monoformer_jax.main --config={RECIPES[args.name]} --workdir=runs/{args.name}"
  run = args.from_run
  if run is None:
    run = args.workdir or os.path.join("runs", "pretrained", args.name)
    if os.path.exists(run):
      raise SystemExit(f"{run} exists: give a new --workdir, or --from_run {run} to export it")
    t0 = time.perf_counter()
    _run("-m", "monoformer_jax.main", f"--config={RECIPES[args.name]}", f"--workdir={run}")
    print(f"trained {args.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
  _run(os.path.join("benchmarks", "mnist_quality.py"), f"--workdir={run}")
  with open(os.path.join(run, "quality.json")) as f:
    quality = json.load(f)
  target = os.path.join(PRETRAINED, args.name)
  staging = target + ".new"
  shutil.rmtree(staging, ignore_errors=True)
  record = json.loads(_run("-m", "monoformer_jax.tools.export", f"--workdir={run}", f"--out={staging}"))
  card = {
      "name": args.name,
      "command": command,
      "code": record["code"],
      "step": record["step"],
      "host": _host(),
      "train_wall_clock_s": quality.get("train_wall_clock_s"),
      "made": time.strftime("%Y-%m-%d"),
      "quality": {
          "digits_recognised": quality["digit_accuracy"],
          "digit_fid": quality["digit_fid_vs_heldout"],
          "text_perplexity": quality["text"]["model_ppl"],
          **({"reading_accuracy": quality["reading"]["answer_accuracy"]} if "reading" in quality else {}),
      },
      "quality_settings": quality["sampling"],
  }
  with open(os.path.join(staging, "CARD.json"), "w") as f:
    json.dump(card, f, indent=2)
  with open(os.path.join(staging, "README.md"), "w") as f:
    f.write(_card_text(card))
  shutil.rmtree(target, ignore_errors=True)
  os.replace(staging, target)
  print(json.dumps(card, indent=2))


def _card_text(card: dict) -> str:
  q = card["quality"]
  lines = [
      f"# pretrained:{card['name']}",
      "",
      f"Trained with `{card['command']}` ({card['step']} steps, code {card['code']}, {card['made']},",
      f"{card['host']}; {card['train_wall_clock_s'] or 0:.0f} s). EMA weights, float32, weights only.",
      "",
      "| measure | value |",
      "|---|---|",
      f"| digits recognised by the project's classifier | {100 * q['digits_recognised']:.1f}% |",
      f"| digit-FID against held-out digits | {q['digit_fid']:.1f} |",
      f"| held-out text perplexity | {q['text_perplexity']:.1f} |",
  ]
  if "reading_accuracy" in q:
    lines.append(f"| held-out digits read right | {100 * q['reading_accuracy']:.1f}% |")
  lines += [
      "",
      "Measured by `python benchmarks/mnist_quality.py` (sampling settings in CARD.json); made by",
      f"`python benchmarks/make_pretrained.py --name {card['name']}`.",
      "",
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  main()

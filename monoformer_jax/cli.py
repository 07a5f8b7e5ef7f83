"""One command-line convention for every entry point (`main`, `sample`, `evaluate`, the tools):
absl flags (ml_collections config files where a config exists) on a FlagValues of their own.

Each entry point defines `define_flags(fv, argv)` and `run(fv, args) -> exit code`, and its `main(argv)`
is `cli.entry_point(__doc__, define_flags, run)` (`cli.main(__doc__, define_flags, run, argv)`):
  * `--help` prints the module's documentation and its flags;
  * a bad flag, an unknown config field, a missing file or any other bad input is one line on
    stderr (`error: ...`) and exit status 2, never a traceback (MONOFORMER_TRACEBACK=1 shows one);
  * `main` returns the exit status, so tests call it in-process: `assert tool.main([...]) == 0`.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

from absl import flags
from ml_collections import config_flags

EXIT_USAGE = 2
EXIT_STOPPED = 3


class RunStopped(RuntimeError):
  """A run that cannot go on (a non-finite loss): one line on stderr and exit 3, every
  checkpoint already saved left intact."""


class UsageError(ValueError):
  """A command line that cannot work (the flag and the reason in the message)."""


# What bad input raises across the package (ConfigError, InferenceError, DataConfigError and the
# readers' errors are ValueErrors; a missing file is a FileNotFoundError).
# An OSError is the environment's (a config file that would not load, a full disk): one line too.
EXPECTED_ERRORS = (UsageError, ValueError, OSError)


def _flag_error_message(error: BaseException, argv: Sequence[str]) -> str:
  """One line for what parsing raised: absl's flags.Error, or the KeyError / AttributeError a
  locked ml_collections config raises for a field it does not have (with its "did you mean")."""
  if isinstance(error, OSError):  # a --config file that cannot be loaded: its path and why
    return " ".join(str(error).split())
  if not isinstance(error, (KeyError, AttributeError)):
    return str(error).strip().split("\n", maxsplit=1)[0]
  message = error
  while isinstance(message, BaseException) and message.args:  # AttributeError(KeyError(str))
    message = message.args[0]
  field, _, hint = str(message).partition("\n")
  field = field.strip("\"'")
  given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and field in a.split("=", 1)[0].split(".")]
  return f"the config has no field {field!r} ({', '.join(given) or 'from --config'})" + (
      f"; {hint.strip()}" if hint.strip() else ""
  )


def main(
    doc: Optional[str],
    define_flags: Callable,
    run: Callable,
    argv: Optional[Sequence[str]] = None,
    prog: Optional[str] = None,
) -> int:
  """Parses `argv` (default: sys.argv[1:]) into fresh flags, runs `run(fv, positional args)`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  prog = prog or os.path.basename(sys.argv[0] or "monoformer_jax")
  fv = flags.FlagValues()
  try:
    # A config flag with a default file reads its --config.FIELD overrides as it is defined.
    define_flags(fv, [prog] + argv)
    if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv):
      print((doc or "").strip() + "\n\nflags:\n" + fv.get_help())
      return 0
    rest = fv([prog] + [str(a) for a in argv])
  except (flags.Error, KeyError, AttributeError, ValueError, OSError) as e:
    if os.environ.get("MONOFORMER_TRACEBACK"):
      raise
    print(f"error: {_flag_error_message(e, argv)} (see --help)", file=sys.stderr)
    return EXIT_USAGE
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl logging (orbax logs through it) checks the global flags
  try:
    status = run(fv, rest[1:])
  except RunStopped as e:
    if os.environ.get("MONOFORMER_TRACEBACK"):
      raise
    print(f"stopped: {e}", file=sys.stderr)
    return EXIT_STOPPED
  except EXPECTED_ERRORS as e:
    if os.environ.get("MONOFORMER_TRACEBACK"):
      raise
    print(f"error: {' '.join(str(e).split()) if isinstance(e, OSError) else e}", file=sys.stderr)
    return EXIT_USAGE
  return int(status or 0)


def entry_point(doc: Optional[str], define_flags: Callable, run: Callable) -> Callable[..., int]:
  """An entry point's `main(argv=None) -> exit status`: `main(doc, define_flags, run, argv)`."""

  def entry(argv: Optional[Sequence[str]] = None) -> int:
    return main(doc, define_flags, run, argv)

  return entry


def define_config(fv: flags.FlagValues, argv: Sequence[str], help_text: str, default: Optional[str] = None) -> None:
  """The `--config` flag of an entry point that reads a config file (configs/*.py[:VARIANT]): locked,
  its --config.FIELD overrides read from `argv` (the command line) as it is defined."""
  config_flags.DEFINE_config_file("config", default, help_text, flag_values=fv, lock_config=True, sys_argv=list(argv))


def refuse_arguments(args: Sequence[str]) -> None:
  """Entry points take flags only: positional arguments are a usage error."""
  if args:
    raise UsageError(f"unexpected arguments {args}")


def run_as_script(module_main: Callable[[], int]) -> None:
  """`if __name__ == "__main__": cli.run_as_script(main)`: exits with main's status."""
  sys.exit(module_main())

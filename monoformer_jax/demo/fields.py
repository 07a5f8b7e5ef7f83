"""The fields of a demo request (a JSON object), read with their bounds: every bad value is one
`BadRequest` naming the field, the value and what it may be."""

from __future__ import annotations

import math


class BadRequest(ValueError):
  """A request the demo refuses (HTTP 400; the message is shown on the page)."""


def _given(request: dict, name: str, default):
  value = request.get(name)
  return default if value is None or (isinstance(value, str) and not value.strip()) else value


def integer(request: dict, name: str, default: int, low: int, high: int) -> int:
  """`request[name]` (a JSON number or a numeric string; absent or blank: `default`) as an int
  in [low, high]."""
  value = _given(request, name, default)
  if isinstance(value, bool):
    raise BadRequest(f"{name} must be a whole number, got {value!r}")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise BadRequest(f"{name} must be a whole number, got {value!r}") from None
  if not math.isfinite(number) or number != int(number):
    raise BadRequest(f"{name} must be a whole number, got {value!r}")
  if not low <= number <= high:
    raise BadRequest(f"{name} must be between {low} and {high}, got {int(number)}")
  return int(number)


def real(request: dict, name: str, default: float, low: float, high: float) -> float:
  """`request[name]` as a finite float in [low, high] (absent or blank: `default`)."""
  value = _given(request, name, default)
  if isinstance(value, bool):
    raise BadRequest(f"{name} must be a number, got {value!r}")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise BadRequest(f"{name} must be a number, got {value!r}") from None
  if not math.isfinite(number) or not low <= number <= high:
    raise BadRequest(f"{name} must be between {low:g} and {high:g}, got {value!r}")
  return number


def text(request: dict, name: str, max_chars: int, default: str = None) -> str:
  """`request[name]` as a non-empty string of at most `max_chars` characters (absent or blank:
  `default`, if there is one)."""
  value = request.get(name)
  if value is None or (isinstance(value, str) and not value.strip()):
    if default is not None:
      return default
    raise BadRequest(f"{name} is empty: write something first")
  if not isinstance(value, str):
    raise BadRequest(f"{name} must be text, got {type(value).__name__}")
  if len(value) > max_chars:
    raise BadRequest(f"{name} is {len(value)} characters long; at most {max_chars}")
  return value

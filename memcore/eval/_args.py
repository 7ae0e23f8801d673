"""argparse types that check a flag's range, so a bad value is reported as
``error: argument --subset: must be an integer >= 1, got '-5'`` instead of failing later."""

import argparse
from typing import Callable, List

import torch


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in "invalid ... value" messages
    return parse


def float_in(
    low: float, high: float, *, high_open: bool = True, low_open: bool = False
) -> Callable[[str], float]:
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above or value != value:
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text!r}")
        return value

    parse.__name__ = f"number in {span}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
rate = float_in(0.0, 1.0)
positive_float = float_in(0.0, float("inf"), low_open=True)
nonnegative_float = float_in(0.0, float("inf"))


def rates(text: str) -> List[float]:
    """Comma-separated rates in [0, 1); '' for none."""
    parse = float_in(0.0, 1.0)
    return [parse(r.strip()) for r in text.split(",") if r.strip()]


def device(text: str) -> str:
    try:
        torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a torch device ({e})") from None
    return text


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default (unless its help already says it in words) and keeps the
    descriptions' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

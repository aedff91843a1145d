"""argparse types for the CLI and the benchmarks: a bad value is refused by the parser, as one line naming the
value and what is allowed (exit 2), never as a traceback from deep inside a run."""
from __future__ import annotations

import argparse
from typing import Callable, List, Sequence, Union


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...``) and exit status 2, without the usage."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An int >= ``low``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} must be >= {low}")
        return v

    return parse


positive_int, nonneg_int = int_at_least(1), int_at_least(0)


def float_in(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    """A float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < v if low_open else low <= v) or not v <= high:
            raise argparse.ArgumentTypeError(f"{v} must be in {'(' if low_open else '['}{low}, {high}]")
        return v

    return parse


def budget(text: str) -> Union[int, float]:
    """'0.02' -> fraction, '2621' -> count."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count (int) nor a fraction (float)") from None


def list_of(item: Callable[[str], object]) -> Callable[[str], List]:
    """A comma-separated list of at least one value, each parsed by ``item``."""
    def parse(text: str) -> List:
        values = [item(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError("needs at least one value")
        return values

    return parse


def names_from(allowed: Sequence[str]) -> Callable[[str], List[str]]:
    """A comma-separated list of names, each one of ``allowed``."""
    def parse(text: str) -> List[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing'} not in {', '.join(allowed)}")
        return names

    return parse

"""The command lines' shared argparse pieces (help with defaults, examples, bounded numbers): one home, so a
module with a parser of its own (bundle, runs, transport) needs nothing else of `cli`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .config import too_low


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless the help says it already), epilog examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default:" in text or action.required or not action.option_strings
                or action.default in (argparse.SUPPRESS, None)):
            return text
        return text + " (default: %(default)r)"


def examples(*lines: str) -> str:
    """A command's epilog: the examples its --help ends with."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def at_least(low: float, kind: type = int, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a `kind` of at least `low` (above it when `strict`), so a bad count fails at parsing."""
    def parse(text: str) -> float:
        value = kind(text)
        if why := too_low(value, low, strict):
            raise argparse.ArgumentTypeError(f"must be {why}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse

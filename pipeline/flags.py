"""
Argument types for slim.py's numeric flags (patch slimming, arXiv 2106.02852): each value is checked where it is
parsed, finite and in its range, and a bad one is a one-line error that gives the range. No flag takes NaN or
infinity, and a count of zero or less is an error, never "all".
"""
import argparse
import math


def number(kind=float, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: kind (int or float) in [low, high] (an open end with low_open/high_open; None: unbounded)."""
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    left, right = ("(" if low is None else left), (")" if high is None else right)
    span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    what = "an integer" if kind is int else "a finite number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}: give {what} in {span}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not finite: give {what} in {span}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is outside {span}: give {what} in that range")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


count = number(int, low=1)                      # images, steps, workers' batches: at least one
non_negative_int = number(int, low=0)           # a seed, an optional count where 0 means "off"
positive = number(float, low=0, low_open=True)  # a learning rate, a tolerated error
non_negative = number(float, low=0)             # epochs, weight decay, a mixing alpha
probability = number(float, low=0, high=1)      # a probability, label smoothing


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, "error: argument --eps: ...", without the usage block
    (--help prints it)."""

    def error(self, message):
        self.exit(2, f"error: {message} (python slim.py --help lists the flags)\n")

"""The unmodified loop on one device: the reference for every fidelity figure."""

from engine.strategies.base import Strategy


class SequentialStrategy(Strategy):
    name = "sequential"
    description = "The stock denoising loop on one device; the reference for fidelity."
    min_devices = 1
    max_devices = 1
    needs_every_step = False  # the loop is untouched, whatever its shape

    # Counting and cancel checks come from the base class; the loop itself is untouched.

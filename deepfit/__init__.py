"""deepfit: the deep-net side of the generalization experiments (randomization tests, measures)."""

__version__ = "0.1.0"

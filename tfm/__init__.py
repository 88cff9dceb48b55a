"""tfm: the Transformer family in JAX/Flax — layers, models and a trainer."""

__version__ = "0.1.0"

"""tfm: the Transformer family in JAX/Flax — pure-functional layers and paper-exact model families."""

__version__ = "0.1.0"

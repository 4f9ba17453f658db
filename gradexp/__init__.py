"""gradexp: see, measure and explain gradient flow in deep networks."""

__version__ = "0.1.0"

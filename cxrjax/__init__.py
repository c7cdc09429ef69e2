"""cxrjax: a JAX/Flax benchmark harness for NIH ChestX-ray14."""

__version__ = "0.1.0"

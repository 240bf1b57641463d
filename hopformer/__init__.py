"""hopformer: modern Hopfield attention layers and Lightning training for ViTs and STanHop-Net.

The layers (``hopformer.layers``) and the functional core (``hopformer.functional``) are pure torch;
Lightning is imported only by ``hopformer.data``, ``hopformer.training`` and the CLI.
"""

__version__ = "0.1.0"

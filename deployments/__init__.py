"""Built-in model deployments (tasks): embeddings and text generation.

Each task is Ray-free; the serving layer wraps it in a Ray Serve deployment.
Import the task modules directly (``deployments.embeddings``,
``deployments.text_generation``): importing this package loads no model code.
"""

__all__ = ["embeddings", "text_generation"]

"""Image captioning with additive attention over image regions, homework question 3b."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import captioner  # noqa: E402  (configs/ is not a package: ml_collections loads files by path)


def get_config(arg: str | None = None):
  config = captioner.get_config(arg)
  config.model.attention_dim = 100  # score_j = v^T act(W1 h + W2 s_j), this is their width
  return config

"""sftscope: where, in depth, did fine-tuning change a language model?

The package follows the pipeline: ``load`` (models, data, architectures) -> ``capture``
(streamed hidden states) -> ``metrics`` (pure functions) -> ``experiments`` (analyze, weights,
probe, swap, tune, eval, sweep, suggest) -> ``report`` (tables, plots, HTML).
"""

__version__ = "0.1.0"

from sftscope.errors import SftscopeError  # noqa: E402

__all__ = ["SftscopeError", "__version__"]

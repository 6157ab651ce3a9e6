"""sftscope: where, in depth, did fine-tuning change a language model?

The package follows the pipeline: ``load`` (models, data, architectures) -> ``capture``
(streamed hidden states) -> ``metrics`` (pure functions) -> ``experiments`` (analyze, weights,
probe, swap, tune, eval, sweep, suggest) -> ``report`` (tables, plots, HTML).
"""

from sftscope.errors import SftscopeError
from sftscope.version import __version__

_API = ("analyze_pair", "capture_states", "register_metric", "unregister_metric", "States")


def __getattr__(name: str):  # the Python API imports torch: only when it is used
    if name in _API:
        from sftscope import api

        return getattr(api, name)
    raise AttributeError(f"module 'sftscope' has no attribute {name!r}")


__all__ = ["SftscopeError", "__version__", *_API]

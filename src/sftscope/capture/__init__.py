"""Capture: hooks on decoder blocks, per-layer reduction as each batch passes, cached results."""

from sftscope.capture.stream import CaptureConfig, CaptureResult, capture

__all__ = ["CaptureConfig", "CaptureResult", "capture"]

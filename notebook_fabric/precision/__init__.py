"""Precision plugins and the mapping from ``precision=`` strings to them."""
from __future__ import annotations

import warnings
from typing import Union

from .base import Precision
from .mixed import MixedPrecision
from .true_dtype import TruePrecision

PRECISION_ALIASES = {
    "32": "32-true", 32: "32-true", "32-true": "32-true",
    "64": "64-true", 64: "64-true", "64-true": "64-true",
    "16": "16-mixed", 16: "16-mixed", "16-mixed": "16-mixed",
    "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
    "16-true": "16-true", "bf16-true": "bf16-true",
}  # fmt: skip
PRECISION_CHOICES = ("32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


def normalize_precision(precision: Union[str, int]) -> str:
    """The canonical name for ``precision`` (``16`` -> ``"16-mixed"``); ``ValueError`` lists the choices."""
    key = precision.lower() if isinstance(precision, str) else precision
    if key not in PRECISION_ALIASES:
        raise ValueError(
            f"precision={precision!r} is not supported. Choose one of {list(PRECISION_CHOICES)}"
            " (or the short forms 32, 64, 16, 'bf16')."
        )
    return PRECISION_ALIASES[key]


def resolve_precision(precision: Union[str, int, Precision], device_type: str) -> Precision:
    """A ``Precision`` plugin for ``precision`` on ``device_type`` (``16-mixed`` on the CPU becomes ``bf16-mixed``, with a warning)."""
    if isinstance(precision, Precision):
        return precision
    name = normalize_precision(precision)
    if name == "16-mixed" and device_type == "cpu":
        warnings.warn(
            "precision='16-mixed' on the CPU: float16 autocast is not supported there, so 'bf16-mixed' is used instead"
            " (pass precision='bf16-mixed' to silence this).",
            UserWarning,
            stacklevel=4,
        )
        name = "bf16-mixed"
    if name == "32-true":
        return Precision()
    if name.endswith("-mixed"):
        return MixedPrecision(name, device_type=device_type)
    return TruePrecision(name)


__all__ = ["Precision", "MixedPrecision", "TruePrecision", "PRECISION_CHOICES", "normalize_precision", "resolve_precision"]

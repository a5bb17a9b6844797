"""The key/value cache argument of a ``transformers`` forward, under its current name.

transformers 5.2x renamed a decoder forward's ``past_key_values`` argument (and a model output's field)
to ``cache``; the old names still work but warn on every call (``FutureWarning`` from the argument,
a logged deprecation from the output's property). These two helpers use whichever name the installed
version has, so the manual decode loops (``models.speech_lm.SpeechLM.generate``) are quiet on new
versions and still work on the older 5.x this project allows (``transformers>=5.0``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

__all__ = ["cache_arg", "cache_of"]


@functools.cache
def _arg_for(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters  # follows deprecate_kwarg's __wrapped__
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(module: nn.Module) -> str:
    """``"cache"`` where ``module.forward`` takes it, else the older ``"past_key_values"``."""
    return _arg_for(type(module))


def cache_of(output: Any) -> Any:
    """The cache a forward returned (``output.cache``; ``past_key_values`` on older versions), or None."""
    if "cache" in output:
        return output["cache"]
    return output.get("past_key_values")

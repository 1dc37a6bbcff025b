"""What a parameter's check may look at besides the value."""

from __future__ import annotations

from dataclasses import dataclass, field

from .limits import Limits
from .loading import LoadedModel


@dataclass
class Context:
    """What a check may look at besides the value: the served model, the limits, notices to add."""

    loaded: LoadedModel
    limits: Limits
    upload_roots: tuple[str, ...] = ()  # where uploaded files may be read from (gradio's cache)
    endpoint: str = "generate"
    notices: list[str] = field(default_factory=list)
    served: tuple[str, ...] = ()  # the models a request may choose (default: the one loaded)
    mask: str = "none"  # the request's mask mode: a concept's preset comes from that mode's table

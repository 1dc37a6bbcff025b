"""What a cached result depends on beyond its inputs: the pipeline's weights.

diffusers' loader mixins (LoRA, textual inversion) change the weights of the components in place, and a
component can be swapped (``pipe.unet = other``). :class:`WeightsVersionMixin` counts those events in
``weights_version``: every method below that changes what the models compute (wrapped by
:func:`counts_weight_changes`), and every assignment of a registered component, bumps it and clears the
inversion cache. The inversion cache keys on it too, so an inversion that was running while the weights
changed is never returned for the new weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

# diffusers' loader methods (LoraBaseMixin, TextualInversionLoaderMixin) that change what the models compute.
# Scaling a LoRA at call time (cross_attention_kwargs={"scale": s}) is part of the call's arguments instead.
WEIGHT_CHANGING_METHODS = (
    "load_lora_weights",
    "unload_lora_weights",
    "fuse_lora",
    "unfuse_lora",
    "set_adapters",
    "delete_adapters",
    "enable_lora",
    "disable_lora",
    "load_textual_inversion",
    "unload_textual_inversion",
)


class WeightsVersionMixin:
    """``weights_version``: a counter of the changes to a pipeline's weights, for cache keys. Component
    assignment counts here; decorate the pipeline class with :func:`counts_weight_changes` for the loaders."""

    weights_version: int = 0

    def weights_changed(self) -> None:
        """Count a change of the weights; cached results computed with the old ones are dropped."""
        self.__dict__["weights_version"] = self.weights_version + 1
        cache = self.__dict__.get("inversion_cache")
        if cache is not None:
            cache.clear()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # register_modules registers a component in the config before it sets it: a registered name is a component
        if name in getattr(self, "_internal_dict", {}):
            self.weights_changed()


def _counting(method: Callable) -> Callable:
    @functools.wraps(method)
    def counted(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self.weights_changed()  # also after a failure half-way: some layers may have changed

    counted.counts_weight_changes = True
    return counted


def counts_weight_changes(cls: type) -> type:
    """Class decorator: the loader methods of ``cls`` (as its bases resolve them) call ``weights_changed`` after
    they ran."""
    for name in WEIGHT_CHANGING_METHODS:
        method = getattr(cls, name, None)
        if method is not None and not getattr(method, "counts_weight_changes", False):
            setattr(cls, name, _counting(method))
    return cls

"""SegaPipeline.invert's step callback: every inversion step is reported, and raising in it stops the
inversion at once (nothing returned, nothing cached)."""

import torch

from sega import SegaPipeline
from tests.tiny import tiny_components


class Stop(Exception):
    pass


def test_invert_reports_each_step_and_a_raise_stops_it():
    pipe = SegaPipeline(**tiny_components("ddim"))
    pipe.set_progress_bar_config(disable=True)
    image = torch.zeros(1, 3, 64, 64)
    calls, seen = [], []
    real_unet = pipe.unet.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real_unet(*args, **kwargs)

    pipe.unet.forward = counting

    def on_step(_pipe, k, t, tensors):
        seen.append((k, int(t), tensors["latents"].shape))

    inv = pipe.invert(image, num_inference_steps=10, skip=0.2, generator=torch.Generator().manual_seed(0),
                      callback_on_step_end=on_step)
    assert [k for k, _, _ in seen] == list(range(8)) and [t for _, t, _ in seen] == inv.timesteps.tolist()
    assert len(calls) == 8 and seen[0][2] == inv.latents.shape

    calls.clear()

    def stop_at_third(_pipe, k, t, tensors):
        if k == 2:
            raise Stop

    try:
        pipe.invert(image + 0.5, num_inference_steps=10, skip=0.2, generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=stop_at_third)
        raise AssertionError("the inversion was not stopped")
    except Stop:
        pass
    assert len(calls) == 3  # the third step was the last one run
    assert len(pipe.inversion_cache) == 1  # only the first, finished inversion was kept

    cached = pipe.invert(image, num_inference_steps=10, skip=0.2, generator=torch.Generator().manual_seed(0),
                         callback_on_step_end=stop_at_third)
    assert cached.cache_hit  # a cache hit runs no step, so the callback is not called

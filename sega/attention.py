"""Cross-attention maps for implicit masks: stored per call, only on the layers the masks use.

LEDITS++ (arXiv 2311.16711; diffusers' ``LEditsPPPipelineStableDiffusion``) reads each concept's
cross-attention map from the down and up blocks' cross-attention layers (``attn2``) at a quarter of the latent
size (SD 1.5 at 512 px: ``down_blocks.2`` and ``up_blocks.1``, 16x16), averaged over those layers and their
heads, summed over the concept's own tokens (positions 1..n, after the start token, without padding).
diffusers does it by switching every attention layer of the UNet to classic attention with materialised
probabilities, and leaves it so. Here:

- :class:`MapRecordingProcessor` wraps the layer's own processor (SDPA by default) on those layers only, and
  every other layer keeps its processor: the UNet's output is exactly what it is without masks. For the rows
  of the batch that are edit concepts it adds softmax(Q K^T / sqrt(d)) over the 77 (or fewer) keys, reduced
  at once to the concept's token sum per head: a few small matrix products per layer.
- :class:`AttentionStore` belongs to one call. The processor finds it through a context variable that the
  call sets, so calls running in other threads (each with its own context) never see it, even though they
  share the UNet and its processors.
- :func:`recording_attention` installs the wrapping processors and puts the UNet's own back on exit (also when
  the call raises or is stopped). Concurrent calls share one installation, counted; the last one out restores.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Sequence

import torch

from .masks import attention_resolution, masked_concept_directions, noise_mask_applies
from .prompts import TOKENIZER_LOCK

_ACTIVE_STORE: contextvars.ContextVar[AttentionStore | None] = contextvars.ContextVar("sega_attention_store",
                                                                                      default=None)
_INSTALL_LOCK = threading.Lock()
_INSTALLED: dict[int, list] = {}  # id(unet) -> [unet, number of calls using it, the UNet's own processors]


def concept_token_counts(tokenizer, texts: Sequence[str]) -> list[int]:
    """How many tokens each concept text has, without start, end and padding tokens, capped at what fits
    between the start and end tokens. (diffusers 0.42.1's LEDITS++ takes the tokenizer's ``length``, which a
    fast tokenizer reports after padding: every concept would sum every position, padding included.)"""
    limit = tokenizer.model_max_length - 2
    with TOKENIZER_LOCK:
        return [min(len(tokenizer(text, add_special_tokens=False).input_ids), limit) for text in texts]


def quarter_resolution_layers(unet) -> list[str]:
    """Processor names of the down and up blocks' cross-attention layers two downsamplings below the latent
    (the mid block excluded, as LEDITS++ does)."""
    names, scale = [], 1

    def cross_attention(block, prefix):
        return [f"{prefix}.{name}.processor" for name, module in block.named_modules()
                if name.endswith("attn2") and hasattr(module, "processor")]

    for i, block in enumerate(unet.down_blocks):
        if scale == 4:
            names += cross_attention(block, f"down_blocks.{i}")
        if getattr(block, "downsamplers", None):
            scale *= 2
    for i, block in enumerate(unet.up_blocks):
        if scale == 4:
            names += cross_attention(block, f"up_blocks.{i}")
        if getattr(block, "upsamplers", None):
            scale //= 2
    return names


class AttentionStore:
    """One call's cross-attention maps of its edit concepts at one UNet call.

    Args:
        token_counts: per concept (global index), how many tokens its map sums (positions 1..n).
        sequence_length: the text encoder's sequence length (the keys of cross-attention).
        latent_size: (H, W) of the latents; maps are kept at :func:`~sega.masks.attention_resolution`.
    """

    def __init__(self, token_counts: Sequence[int], sequence_length: int, latent_size: tuple[int, int]):
        self.resolution = attention_resolution(*latent_size)
        self.tokens = torch.zeros(len(token_counts), sequence_length)
        for c, n in enumerate(token_counts):
            self.tokens[c, 1 : 1 + n] = 1.0
        self.concepts: list[int] = []
        self.batch = 0
        self._rows: torch.Tensor | None = None  # the concept rows of the whole UNet batch of a step
        self._weights: torch.Tensor | None = None
        self._span = (0, 0)  # with the batch split over UNet calls: the concept rows of the current call
        self._offset = 0  # its first row in the whole batch
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per batch layout, kept on the device
        self._key: tuple | None = None
        self._sum: torch.Tensor | None = None
        self._heads = 0

    def expect(self, segments: Sequence, batch: int) -> None:
        """Before a UNet call on ``segments`` (each ``batch`` rows; int = edit concept): forget the last maps and
        record this call's concept rows."""
        self.concepts = [s for s in segments if isinstance(s, int)]
        self.batch = batch
        self._sum, self._heads = None, 0
        if not self.concepts:
            self._rows = self._weights = None
            return
        key = (tuple(segments), batch)
        if key not in self._layouts:
            rows = [j * batch + b for j, s in enumerate(segments) if isinstance(s, int) for b in range(batch)]
            self._layouts[key] = (torch.tensor(rows),
                                  self.tokens[torch.tensor(self.concepts)].repeat_interleave(batch, dim=0))
        self._rows, self._weights = self._layouts[key]
        self._key = key
        self._span, self._offset = (0, len(self._rows)), 0

    def select_rows(self, start: int, stop: int) -> None:
        """The next UNet call evaluates rows [start, stop) of the batch announced by :meth:`expect`: it records the
        maps of the concept rows among them (each row sees all layers once, whichever call it is in)."""
        if self._rows is None:
            return
        segments, batch = self._key  # the rows from the layout, on the host: no device sync
        rows = [j * batch + b for j, s in enumerate(segments) if isinstance(s, int) for b in range(batch)]
        inside = [k for k, r in enumerate(rows) if start <= r < stop]
        self._span = (inside[0], inside[-1] + 1) if inside else (0, 0)
        self._offset = start

    @property
    def wants_maps(self) -> bool:
        return self._rows is not None and self._span[1] > self._span[0]

    def record(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb=None) -> None:
        """Add one layer's maps: per concept row, sum over heads of the probabilities of the concept's tokens."""
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        if hidden_states.shape[1] != self.resolution[0] * self.resolution[1]:
            return
        device = hidden_states.device
        if self._rows.device != device:
            self._rows, self._weights = self._rows.to(device), self._weights.to(device)
            self._layouts[self._key] = (self._rows, self._weights)
        first, last = self._span
        rows = self._rows[first:last] - self._offset
        x = hidden_states.index_select(0, rows)
        context = encoder_hidden_states.index_select(0, rows)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key = attn.to_q(x), attn.to_k(context)
        rows, heads = x.shape[0], attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(rows, -1, heads, head_dim).transpose(1, 2)
        key = key.view(rows, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        weights = self._weights[first:last, : key.shape[2]]
        if weights.shape[1] < key.shape[2]:
            weights = torch.nn.functional.pad(weights, (0, key.shape[2] - weights.shape[1]))
        maps = torch.einsum("rhqk,rk->rq", scores.softmax(dim=-1), weights.float())
        if self._sum is None:
            self._sum = maps.new_zeros((len(self._rows), maps.shape[1]))
        self._sum[first:last] += maps
        if first == 0:  # count each layer's heads once per step: in the call that holds the first concept rows
            self._heads += heads

    def maps(self, concepts: Sequence[int]) -> torch.Tensor:
        """(len(concepts), B, h, w) maps of the last UNet call, averaged over its layers and heads."""
        if list(concepts) != self.concepts or self._sum is None:
            raise RuntimeError(f"no cross-attention maps were stored for concepts {list(concepts)} at this step "
                               f"(the UNet has no cross-attention layer at {self.resolution})")
        return (self._sum / self._heads).view(len(self.concepts), self.batch, *self.resolution)


class MapRecordingProcessor:
    """Runs the layer's own attention processor, and records maps when the current call has a store."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        store = _ACTIVE_STORE.get()
        if store is not None and store.wants_maps and encoder_hidden_states is not None:
            store.record(attn, hidden_states, encoder_hidden_states, temb)
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


@contextlib.contextmanager
def recording_attention(unet, store: AttentionStore) -> Iterator[None]:
    """Within the block, this thread's UNet calls record ``store``'s maps; afterwards (also on an exception or
    a stop) the UNet has its own processors back once no other call is recording."""
    layers = set(quarter_resolution_layers(unet))
    if not layers:
        raise ValueError("use_cross_attn_mask / use_intersect_mask need a UNet with cross-attention two "
                         "downsamplings below the latent (as Stable Diffusion has); this UNet has none")
    key = id(unet)
    with _INSTALL_LOCK:
        entry = _INSTALLED.get(key)
        if entry is None:
            own = dict(unet.attn_processors)
            unet.set_attn_processor({name: MapRecordingProcessor(p) if name in layers else p
                                     for name, p in own.items()})
            entry = _INSTALLED[key] = [unet, 0, own]
        entry[1] += 1
    token = _ACTIVE_STORE.set(store)
    try:
        yield
    finally:
        _ACTIVE_STORE.reset(token)
        with _INSTALL_LOCK:
            entry[1] -= 1
            if entry[1] == 0:
                del _INSTALLED[key]
                unet.set_attn_processor(dict(entry[2]))


class EditMasks:
    """One call's mask settings, its attention store and the masks it applied, step by step.

    Args:
        n_concepts: the call's number of edit concepts.
        cross_attention: use each concept's cross-attention mask (needs ``store``).
        intersect: intersect it with the noise mask (while t <= 0.8 T).
        user_mask: (B, 1, H, W) in [0, 1], or None.
        store: the call's :class:`AttentionStore` (None without a cross-attention mask).
        num_train_timesteps: the scheduler's T, for the t <= 0.8 T rule.
        timesteps: the call's timesteps (on any device; read once, here).
    """

    def __init__(self, n_concepts: int, cross_attention: bool, intersect: bool, user_mask: torch.Tensor | None,
                 store: AttentionStore | None, num_train_timesteps: int, timesteps: Sequence[float]):
        self.n_concepts = n_concepts
        self.cross_attention, self.intersect = cross_attention, intersect
        self.user_mask, self.store = user_mask, store
        # Per step, whether the intersect mask uses the noise mask: decided on the host, once.
        self.use_noise_mask = [noise_mask_applies(t, num_train_timesteps) for t in timesteps]
        self.recorded: dict[int, torch.Tensor] = {}

    def recording(self, unet):
        """The context in which the call's UNet calls record maps (nothing to do without a store)."""
        return recording_attention(unet, self.store) if self.store is not None else contextlib.nullcontext()

    def expect(self, segments: Sequence, batch: int) -> None:
        if self.store is not None:
            self.store.expect(segments, batch)

    def select_rows(self, start: int, stop: int) -> None:
        if self.store is not None:
            self.store.select_rows(start, stop)

    def directions(self, i: int, t, noise_uncond: torch.Tensor, noise_concepts: torch.Tensor,
                   needed: Sequence[int], signed_scales: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Step i's masked directions of the ``needed`` concepts (see :func:`~sega.masks.masked_concept_directions`);
        records the implicit masks."""
        maps = self.store.maps(needed) if self.store is not None else None
        psi, mask = masked_concept_directions(
            noise_uncond, noise_concepts, signed_scales, thresholds, attention_maps=maps, user_mask=self.user_mask,
            intersect=self.intersect, use_noise_mask=self.use_noise_mask[i])
        if mask is not None:
            full = mask.new_zeros((self.n_concepts, *mask.shape[1:]))
            full[list(needed)] = mask
            self.recorded[i] = full
        return psi

    def stacked(self, n_steps: int) -> torch.Tensor | None:
        """(n_steps, C, B, H, W) implicit masks, zeros where a concept's mask was not computed; None without."""
        if not self.recorded:
            return None
        blank = torch.zeros_like(next(iter(self.recorded.values())))
        return torch.stack([self.recorded.get(i, blank) for i in range(n_steps)])

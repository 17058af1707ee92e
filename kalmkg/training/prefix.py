"""The frozen bottom of the model, run once per text: its outputs kept and reused by later steps.

When LoRA adapts only the top N layers (`--lora-layers`, the default for small bases), the token
embeddings and every layer below the lowest adapted one never change during a run. Their output for a
token row is then the same at every step, so it is computed once, kept (up to a memory budget, least
recently used out first), and later steps run only the adapted layers on it. A tail view is in the
batch each time its entity is an answer, an hr view once per answer of its query, so most rows of an
epoch come back.

    rows -> [kept states of layers 0..k-1 | run them once]  ->  layers k.. (trained) -> norm -> hidden

The split reuses the decoder's own forward (its masks, rotary positions, attention kernel) on a slice of
its layers: the bottom with the final norm taken out, the top with the kept states as `inputs_embeds`.
Rows are right-padded, so under the causal mask a row's states do not depend on what it was batched
with. A decoder whose forward does more than embed -> layers -> norm (Gemma scales its embeddings) would
not split this way, nor one whose layers differ by kind (`config.layer_types`: sliding-window and full
attention, looked up by position in the layer list, which a slice shifts): the latter gets no cache, and
the first calls (the first step's chunks) compare the split with the whole pass and turn the cache
off if they differ. The kept states live on the training device, packed into a few large slabs
(`Slabs`), never as one tensor per row: on a CPU, glibc's heap held twice the states' bytes when each
row was its own tensor (its mmap threshold rises to the largest block freed, a step's activations then
come from the heap between the kept rows, and the heap cannot shrink past them). This module imports
torch at the top: import it lazily from light modules.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

# The split and the whole pass run the same kernels on the same rows; a decoder that does not split
# gives cosines far below this.
AGREEMENT = 0.9999
CHECKED_CALLS = 3  # a step's chunks (views, longer views, completion rows), shortest to longest
# Above glibc's largest dynamic mmap threshold (32 MiB on 64-bit): each slab is a mapping of its own,
# outside the heap; small enough that evicting one drops a small share of a default 2 GiB budget.
SLAB_BYTES = 64 * 2**20
MIN_SLABS = 8  # a budget below 512 MiB is cut in 8 slabs, so an eviction drops an eighth of it, not all;
MIN_SLAB_BYTES = 2**20  # ... a budget below 8 MiB is one slab
_ALIGN = 64  # bytes: every row starts where any dtype's view of it is aligned


def trained_from(decoder) -> int | None:
    """Index of the lowest layer with a trainable weight, if the embeddings and every layer below it are
    frozen and run without dropout (so their output is a function of the tokens) and every layer is of
    one kind; None otherwise, or if no layer trains or none lies below the lowest that does."""
    layers = getattr(decoder, "layers", None)
    if layers is None or getattr(decoder, "norm", None) is None:
        return None
    if any(p.requires_grad for p in decoder.get_input_embeddings().parameters()):
        return None
    first = lowest_trained(decoder)
    if not first:
        return None
    config = getattr(decoder, "config", None)
    if len(set(getattr(config, "layer_types", None) or ())) > 1 or getattr(config, "attention_dropout", 0.0):
        return None
    top = {id(m) for layer in layers[first:] for m in layer.modules()}
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 and id(m) not in top for m in decoder.modules()):
        return None  # dropout anywhere below the adapted layers (embeddings included) makes the bottom random
    return first


def lowest_trained(decoder) -> int | None:
    """Index of the lowest decoder layer with a trainable weight (None: none)."""
    return next((i for i, layer in enumerate(decoder.layers) if any(p.requires_grad for p in layer.parameters())),
                None)


class Slabs:
    """Token rows' states packed into at most `budget` bytes of large buffers, filled one after another;
    when none has room, the least recently used slab is emptied whole (an LRU at the slab's grain). A
    row is read back as a view of its slab: copy it before the next `put`, which may reuse the slab."""

    def __init__(self, budget: int, slab_bytes: int | None = None):
        if slab_bytes is None:
            slab_bytes = min(SLAB_BYTES, budget // MIN_SLABS) if budget >= MIN_SLABS * MIN_SLAB_BYTES else budget
        self.slab_bytes = min(budget, slab_bytes)
        self.count = budget // self.slab_bytes if self.slab_bytes > 0 else 0
        self.buffers: list[torch.Tensor] = []  # uint8, allocated as they are first needed
        self.fill: list[int] = []  # bytes used in each buffer
        self.used: list[int] = []  # when each was last read or written (a counter)
        self.members: list[list[tuple]] = []  # the keys each holds
        self.where: dict[tuple, tuple[int, int, torch.Size, torch.dtype]] = {}  # key -> slab, offset, shape, dtype
        self.current = -1  # the slab being filled
        self.clock = 0

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, key: tuple) -> bool:
        return key in self.where

    @property
    def bytes(self) -> int:
        """The bytes the rows take (their slabs reserve at most the budget)."""
        return sum(self.fill)

    def get(self, key: tuple) -> torch.Tensor | None:
        at = self.where.get(key)
        if at is None:
            return None
        slab, offset, shape, dtype = at
        self._touch(slab)
        return self._view(slab, offset, shape, dtype)

    def put(self, key: tuple, state: torch.Tensor, evict: bool = True) -> bool:
        """Keep a copy of `state` under `key`; False when it does not fit (larger than a slab, or no slab
        has room and `evict` is off)."""
        if key in self.where:
            return True
        size = state.numel() * state.element_size()
        slab = self._room(size, evict, state.device)
        if slab is None:
            return False
        offset = self.fill[slab]
        self._view(slab, offset, state.shape, state.dtype).copy_(state)
        self.fill[slab] = offset + -(-size // _ALIGN) * _ALIGN
        self.where[key] = (slab, offset, state.shape, state.dtype)
        self.members[slab].append(key)
        self._touch(slab)
        return True

    def _room(self, size: int, evict: bool, device: torch.device) -> int | None:
        if size > self.slab_bytes or self.count == 0:
            return None
        if self.current >= 0 and self.fill[self.current] + size <= self.slab_bytes:
            return self.current
        if len(self.buffers) < self.count:
            self.buffers.append(torch.empty(self.slab_bytes, dtype=torch.uint8, device=device))
            self.fill.append(0)
            self.used.append(0)
            self.members.append([])
            self.current = len(self.buffers) - 1
        elif evict:
            self.current = min(range(len(self.buffers)), key=self.used.__getitem__)
            for key in self.members[self.current]:
                del self.where[key]
            self.members[self.current], self.fill[self.current] = [], 0
        else:
            return None
        return self.current

    def _view(self, slab: int, offset: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        n = shape.numel() * dtype.itemsize
        return self.buffers[slab][offset: offset + n].view(dtype).view(shape)

    def _touch(self, slab: int) -> None:
        self.clock += 1
        self.used[slab] = self.clock


class FrozenPrefix:
    """The kept outputs of a decoder's frozen layers, by token row."""

    def __init__(self, decoder, first_trained: int, budget_mb: float):
        self.decoder = decoder
        self.k = first_trained
        self.budget = int(budget_mb * 2**20)
        self.kept = Slabs(self.budget)  # by (autocast dtype or None, *tokens)
        self.hits = self.misses = 0
        self.checks_left = CHECKED_CALLS  # the first calls compare the split with the whole pass
        self.off = False

    @classmethod
    def build(cls, decoder, budget_mb: float) -> "FrozenPrefix | None":
        """A cache for `decoder` (a backbone), or None when there is nothing frozen to keep or no budget."""
        first = trained_from(decoder) if budget_mb > 0 else None
        return None if first is None else cls(decoder, first, budget_mb)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor, rows: list[list[int]], *,
               evict: bool = True) -> torch.Tensor:
        """`decoder(ids, mask).last_hidden_state` ([n, T, D]) for the right-padded `ids` of `rows`, from
        kept bottom states where there are (`encode.last_hidden` pads and calls this).
        `evict=False` (validation's scan over every entity) keeps new rows only where there is room, so a
        scan larger than the budget cannot push out the training rows."""
        if self.off:
            return self._whole(ids, mask)
        states = self._bottom(rows, ids, mask, evict)
        if self.checks_left:
            agree = self._splits(ids, mask, states)
            self.checks_left -= 1  # after the check: one that raised is made again
            if not agree:
                self.off = True
                self.kept = Slabs(0)
                warnings.warn(f"{type(self.decoder).__name__} does not split at layer {self.k}: the frozen "
                              "layers' outputs are not kept (each step runs the whole model)", stacklevel=3)
                return self._whole(ids, mask)
        return self._top(states, mask)

    @property
    def bytes(self) -> int:
        return self.kept.bytes

    def stats(self) -> dict:
        return {"layers": self.k, "rows": len(self.kept), "mb": round(self.bytes / 2**20, 1),
                "hits": self.hits, "misses": self.misses, "off": self.off}

    # ------------------------------------------------------------------ pieces
    def _bottom(self, rows: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, evict: bool) -> torch.Tensor:
        """[n, T, D]: each row's output of layers 0..k-1 (zeros past its end), kept or run now (all missing
        rows in one pass, then kept)."""
        # states made under bf16 autocast (training) and without it (validation) differ in rounding: each
        # mode keeps its own, so a state is only ever reused under the arithmetic that made it
        mode = _autocast_mode(ids.device.type)
        keys = [(mode, *r) for r in rows]
        first = {}  # each distinct key's first row
        for j, key in enumerate(keys):
            first.setdefault(key, j)
        found = {key: self.kept.get(key) for key in first}  # views of slabs: copied before anything is kept
        missing = [key for key, state in found.items() if state is None]
        self.hits += len(found) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad(), self._layers(slice(0, self.k)), self._without_norm():
                out = self.decoder(input_ids=ids[[first[k] for k in missing]],
                                   attention_mask=mask[[first[k] for k in missing]]).last_hidden_state
            for i, key in enumerate(missing):
                found[key] = out[i, : len(key) - 1]
        like = next(iter(found.values()))
        states = torch.zeros(*ids.shape, like.shape[-1], dtype=like.dtype, device=ids.device)
        for j, key in enumerate(keys):
            states[j, : len(key) - 1] = found[key]
        for key in missing:
            self.kept.put(key, found[key], evict)
        return states

    def _whole(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state

    def _top(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self._layers(slice(self.k, None)):
            return self.decoder(inputs_embeds=states, attention_mask=mask).last_hidden_state

    def _splits(self, ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor) -> bool:
        """Whether bottom states + top equal the whole pass here (in eval mode: no dropout draws)."""
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            with torch.no_grad():
                split = self._top(states, mask)
                whole = self._whole(ids, mask)
        finally:
            self.decoder.train(was_training)
        return _agree(split, whole, mask)

    @contextlib.contextmanager
    def _layers(self, part: slice):
        """The decoder with only `part` of its layers, for the length of a call."""
        layers = self.decoder.layers
        self.decoder.layers = torch.nn.ModuleList(list(layers)[part])
        try:
            yield
        finally:
            self.decoder.layers = layers

    @contextlib.contextmanager
    def _without_norm(self):
        norm = self.decoder.norm
        self.decoder.norm = torch.nn.Identity()
        try:
            yield
        finally:
            self.decoder.norm = norm


def _autocast_mode(device_type: str):
    """The dtype autocast runs matmuls in on `device_type` now, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _agree(split: torch.Tensor, whole: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether every real token's hidden state of the split pass points where the whole pass's does."""
    real = mask.bool()
    cos = torch.nn.functional.cosine_similarity(split.detach().float()[real], whole.detach().float()[real], dim=-1)
    return bool(cos.min() >= AGREEMENT)


def prefix_for(model: Any, budget_mb: float) -> FrozenPrefix | None:
    """The cache for a (peft-wrapped) causal LM's backbone."""
    from kalmkg.models import backbone

    return FrozenPrefix.build(backbone(model), budget_mb)

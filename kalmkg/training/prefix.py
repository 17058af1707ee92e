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
off if they differ. The kept states live on the training device. This module imports torch at the top: import it lazily from light modules.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Any

import torch

# The split and the whole pass run the same kernels on the same rows; a decoder that does not split
# gives cosines far below this.
AGREEMENT = 0.9999
CHECKED_CALLS = 3  # a step's chunks (views, longer views, completion rows), shortest to longest


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


class FrozenPrefix:
    """The kept outputs of a decoder's frozen layers, by token row."""

    def __init__(self, decoder, first_trained: int, budget_mb: float):
        self.decoder = decoder
        self.k = first_trained
        self.budget = int(budget_mb * 2**20)
        self.kept: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (autocast dtype or None, *tokens)
        self.bytes = 0
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
        bottom = self._bottom(rows, ids, mask, evict)
        states = torch.zeros(*ids.shape, bottom[0].shape[-1], dtype=bottom[0].dtype, device=ids.device)
        for j, s in enumerate(bottom):
            states[j, : len(s)] = s
        if self.checks_left:
            agree = self._splits(ids, mask, states)
            self.checks_left -= 1  # after the check: one that raised is made again
            if not agree:
                self.off = True
                self.kept.clear()
                self.bytes = 0
                warnings.warn(f"{type(self.decoder).__name__} does not split at layer {self.k}: the frozen "
                              "layers' outputs are not kept (each step runs the whole model)", stacklevel=3)
                return self._whole(ids, mask)
        return self._top(states, mask)

    def stats(self) -> dict:
        return {"layers": self.k, "rows": len(self.kept), "mb": round(self.bytes / 2**20, 1),
                "hits": self.hits, "misses": self.misses, "off": self.off}

    # ------------------------------------------------------------------ pieces
    def _bottom(self, rows: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, evict: bool) -> list[torch.Tensor]:
        """Each row's [len, D] output of layers 0..k-1: kept, or run now (all missing rows in one pass)."""
        # states made under bf16 autocast (training) and without it (validation) differ in rounding: each
        # mode keeps its own, so a state is only ever reused under the arithmetic that made it
        mode = _autocast_mode(ids.device.type)
        keys = [(mode, *r) for r in rows]
        found: dict[tuple, torch.Tensor] = {}
        missing = []
        for j, key in enumerate(keys):
            if key in found:
                continue
            state = self.kept.get(key)
            if state is None:
                missing.append(j)
                found[key] = None  # type: ignore[assignment]  # filled below
            else:
                self.kept.move_to_end(key)
                found[key] = state
                self.hits += 1
        if missing:
            self.misses += len(missing)
            with torch.no_grad(), self._layers(slice(0, self.k)), self._without_norm():
                out = self.decoder(input_ids=ids[missing], attention_mask=mask[missing]).last_hidden_state
            for i, j in enumerate(missing):
                state = out[i, : len(rows[j])].clone()  # its own storage: the batch tensor is not kept alive
                found[keys[j]] = state
                self._keep(keys[j], state, evict)
        return [found[key] for key in keys]

    def _keep(self, key: tuple, state: torch.Tensor, evict: bool = True) -> None:
        size = state.numel() * state.element_size()
        if size > self.budget or (not evict and self.bytes + size > self.budget):
            return
        self.kept[key] = state
        self.bytes += size
        while self.bytes > self.budget:
            _, old = self.kept.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

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

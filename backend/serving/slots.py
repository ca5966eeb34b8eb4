"""The static KV cache: fixed per-slot buffers written in place, slots reused across requests.

Each running sequence owns one slot (a row of every layer's [slots, H, max_len, D] key and value
buffers) and keeps its tokens at columns equal to their position ids, so a decode step writes one
column per row (`scatter_`) and attends over the slots' columns up to their positions through a
4D mask: no per-step concatenation, no merge copy of the running batch when a request joins, no
trim when one leaves. Prefill stays `BatchDecoder`'s one padded forward; its KV is copied into the
new sequences' slots. Buffers grow by doubling to the peak number of slots and are then reused
(also across weight swaps: they hold no weights). Eager steps compute only the occupied slot
prefix and the columns in use; a compiled step (CUDA) always sees every slot and a power-of-two
width, so it meets few shapes. Free slots inside the window decode a dummy token at column 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import Cache

from backend.serving.engine import ServingPlan
from backend.serving.generation import BatchDecoder, DecodingModel, DecodingSequence

# Attention implementations whose 4D mask format is known: sdpa (bool, True = attend) and eager
# (additive float); other kernels (flash attention) take no arbitrary mask.
SUPPORTED_ATTENTION = ("sdpa", "eager")
# Narrowest width of a compiled step's attention window (then powers of two).
_COMPILED_MIN_WIDTH = 64


class SlotCache(Cache):
    """Per-layer key/value buffers [slots, H, max_len, D]; `update` writes each row's new
    key/value at its own column and returns the window the step attends over."""

    def __init__(self, max_len: int, *, static_addresses: bool = False) -> None:
        super().__init__(layers=[])
        self.max_len = max_len
        # Compiled steps with CUDA graphs replay on fixed addresses: mark the buffers so.
        self.static_addresses = static_addresses
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # slots the current step computes (a prefix)
        self.width = 0  # columns the current step attends over (a prefix)
        self._index_R1: torch.Tensor | None = None  # each row's write column

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def allocate(self, slots: int, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """At least `slots` rows, shaped and typed like the prefill's `kv`; kept rows copied."""
        if slots <= self.capacity:
            return
        old = list(zip(self.keys, self.values, strict=True))
        self.keys, self.values = [], []
        for index, (keys_BHTD, values_BHTD) in enumerate(kv):
            for buffers, like in ((self.keys, keys_BHTD), (self.values, values_BHTD)):
                heads, dim = like.shape[1], like.shape[3]
                buffer = like.new_zeros(slots, heads, self.max_len, dim)
                if old:
                    kept = old[index][0 if buffers is self.keys else 1]
                    buffer[: kept.shape[0]].copy_(kept)
                if self.static_addresses:
                    torch._dynamo.mark_static_address(buffer)
                buffers.append(buffer)

    def write_prefill(
        self, slots: list[int], kv: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: list[int]
    ) -> None:
        """Copy prefill rows `rows` (right-padded, real tokens first) into `slots`, column 0 on.
        The padding's KV lands after each prompt, where the mask hides it until overwritten."""
        device = self.keys[0].device
        slot_index = torch.tensor(slots, device=device)
        row_index = torch.tensor(rows, device=device)
        for buffer_k, buffer_v, (keys, values) in zip(self.keys, self.values, kv, strict=True):
            length = keys.shape[2]
            buffer_k[slot_index, :, :length] = keys.index_select(0, row_index).to(buffer_k.dtype)
            buffer_v[slot_index, :, :length] = values.index_select(0, row_index).to(buffer_v.dtype)

    def prepare(self, rows: int, width: int, columns_R1: torch.Tensor) -> None:
        """The next step computes `rows` slots over `width` columns, writing at `columns_R1`."""
        self.rows, self.width, self._index_R1 = rows, width, columns_R1

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._index_R1 is not None, "prepare() comes before every decode forward"
        keys = self.keys[layer_idx][: self.rows]
        values = self.values[layer_idx][: self.rows]
        heads, dim = keys.shape[1], keys.shape[3]
        index = self._index_R1.view(-1, 1, 1, 1).expand(self.rows, heads, 1, dim)
        keys.scatter_(2, index, key_states.to(keys.dtype))
        values.scatter_(2, index, value_states.to(values.dtype))
        return keys[:, :, : self.width], values[:, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width


class StaticBatchDecoder(BatchDecoder):
    """`BatchDecoder` over a `SlotCache`: the same admissions, draws and stops; in-place steps."""

    def __init__(self, model: DecodingModel, plan: ServingPlan) -> None:
        if not plan.static:
            raise ValueError("StaticBatchDecoder needs a plan with a static KV cache")
        super().__init__(model)
        self.plan = plan
        self.slots: list[int] = []  # slots[i] is the slot of active[i]
        self._slot_cache = SlotCache(plan.static_max_len, static_addresses=plan.compile_decode)
        self._forwards: dict[int, Callable[..., Any]] = {}
        self._check_attention(model)

    @property
    def sequence_limit(self) -> int | None:
        return self.plan.static_max_len

    @property
    def capacity(self) -> int:
        """Slots allocated so far (they grow to the peak batch and are reused)."""
        return self._slot_cache.capacity

    def serve(self, model: DecodingModel) -> None:
        self._check_attention(model)
        super().serve(model)

    def cancel_all(self) -> list[DecodingSequence]:
        running = [s for s in self.active if not s.done]
        self.active, self.slots = [], []
        return running

    def _merge(
        self,
        sequences: list[DecodingSequence],
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        lengths: list[int],
        rows: list[int],
    ) -> None:
        taken = set(self.slots)
        free = (slot for slot in range(len(taken) + len(sequences)) if slot not in taken)
        new_slots = [next(free) for _ in sequences]
        needed = max(new_slots) + 1
        if needed > self.capacity:  # doubling: a handful of growths in a replica's life
            self._slot_cache.allocate(max(needed, 2 * self.capacity), kv)
        self._slot_cache.write_prefill(new_slots, kv, rows)
        self.active.extend(sequences)
        self.slots.extend(new_slots)

    def _decode_logits(self) -> torch.Tensor:
        device = self.model.device
        compiled = self.plan.compile_decode
        rows = self.capacity if compiled else max(self.slots) + 1
        slot_index = torch.tensor(self.slots, device=device)
        tokens_R1 = torch.zeros(rows, 1, dtype=torch.int64, device=device)
        columns_R1 = torch.zeros(rows, 1, dtype=torch.int64, device=device)
        tokens_R1[slot_index, 0] = torch.tensor([s.tokens[-1] for s in self.active], device=device)
        last = [s.next_position for s in self.active]
        columns_R1[slot_index, 0] = torch.tensor(last, device=device)
        width = max(last) + 1
        if compiled:
            width = min(self.plan.static_max_len, max(_COMPILED_MIN_WIDTH, _next_power(width)))
        self._slot_cache.prepare(rows, width, columns_R1)
        # Row r attends to its columns 0..position (its own tokens); the rest is stale or empty.
        visible_R11W = torch.arange(width, device=device).view(1, 1, 1, width) <= columns_R1.view(
            rows, 1, 1, 1
        )
        out = self._forward(self.model)(
            input_ids=tokens_R1,
            position_ids=columns_R1,
            attention_mask=self._mask(visible_R11W),
            use_cache=True,
            **{self.model.cache_kwarg: self._slot_cache},
        )
        logits_RV: torch.Tensor = out.logits[:, -1]
        return logits_RV.index_select(0, slot_index).float()

    def _drop_done(self) -> None:
        keep = [b for b, s in enumerate(self.active) if not s.done]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[b] for b in keep]
        self.slots = [self.slots[b] for b in keep]  # the others' slots are free again

    def _mask(self, visible_R11W: torch.Tensor) -> torch.Tensor:
        if self._attention == "sdpa":
            return visible_R11W
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled() else torch.float32
        blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=visible_R11W.device)
        return torch.where(visible_R11W, torch.zeros((), dtype=dtype), blocked)

    def _forward(self, model: DecodingModel) -> Callable[..., Any]:
        """The module's forward, compiled once per module when the plan asks (a replica
        alternates between two modules of one architecture, so this holds at most two)."""
        if not self.plan.compile_decode:
            return model.module
        key = id(model.module)
        if key not in self._forwards:
            self._forwards[key] = torch.compile(model.module, mode="reduce-overhead", dynamic=False)
        return self._forwards[key]

    def _check_attention(self, model: DecodingModel) -> None:
        config = getattr(model.module, "config", None)
        attention = str(getattr(config, "_attn_implementation", "eager"))
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"the static KV cache supports attention {SUPPORTED_ATTENTION}, this model uses "
                f"{attention!r} (set the serving engine's kv_cache to 'dynamic')"
            )
        self._attention = attention


def new_decoder(model: DecodingModel, plan: ServingPlan) -> BatchDecoder:
    """The decoder `plan` asks for."""
    return StaticBatchDecoder(model, plan) if plan.static else BatchDecoder(model)


def _next_power(n: int) -> int:
    return 1 << (n - 1).bit_length()

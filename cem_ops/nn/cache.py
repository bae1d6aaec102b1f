"""Caches of earlier positions for generation: what attention keeps per token, preallocated.

A CEM attention layer keeps its keys k_j = W_K c_j, H Dh numbers per token, and with a diagonal
also the context c_j (D more): V = K, so there is nothing else to keep. A Llama layer keeps keys and
values, 2 H Dh per token. Lengths live on the CPU: the bookkeeping is host-side, so checking
that a chunk fits costs no device sync.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor


class _PositionCache:
    """Per-row lengths and the rows' storage tensors (B, capacity, ...), appended chunk by chunk."""

    def __init__(self, storage: dict[str, Tensor | None], batch_size: int):
        self._storage = storage
        self.lengths = torch.zeros(batch_size, dtype=torch.int64)  # (B,) on the CPU: cached positions per row
        # A copy beside the storage, advanced there, for kernels that read the lengths on a GPU
        # (no host-to-device copy per call).
        device = self._device
        self._device_lengths = self.lengths.to(device) if device.type != "cpu" else self.lengths

    @property
    def keys(self) -> Tensor:
        """(B, capacity, H, Dh): every kind of cache keeps keys."""
        return self._storage["keys"]

    @property
    def _device(self) -> torch.device:
        return self.keys.device

    def device_lengths(self) -> Tensor:
        """The lengths on the storage's device."""
        return self._device_lengths

    def in_use(self, chunk: int) -> dict[str, Tensor | None]:
        """The storage narrowed to the positions a chunk of ``chunk`` attends to (views, no copy)."""
        used = int(self.lengths.max()) + chunk
        return {k: None if t is None else t[:, :used] for k, t in self._storage.items()}

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    @property
    def bytes_per_token(self) -> int:
        """Bytes held per cached position of one batch row."""
        return sum(t[0, 0].numel() * t.element_size() for t in self._storage.values() if t is not None)

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated storage."""
        return self.bytes_per_token * self.batch_size * self.capacity

    def check_chunk(self, who: str, x: Tensor, dim: int) -> None:
        """That the chunk x (B, C, D) fits: its width, dtype, device, batch size and length."""
        if x.dim() != 3 or x.shape[2] != dim:
            raise ValueError(f"{who}: x must have shape (B, C, D) with D = {dim}, got {tuple(x.shape)}")
        if x.dtype != self.keys.dtype or x.device != self.keys.device:
            raise ValueError(f"{who}: x ({x.dtype}, {x.device}) must have the cache's dtype and device "
                             f"({self.keys.dtype}, {self.keys.device})")
        batch, chunk = x.shape[0], x.shape[1]
        if batch != self.batch_size:
            raise ValueError(f"{who}: the chunk has batch size {batch} but the cache holds {self.batch_size} rows")
        longest = int(self.lengths.max()) if batch else 0
        if longest + chunk > self.capacity:
            raise ValueError(f"{who}: appending {chunk} positions to a row holding {longest} exceeds the cache's "
                             f"capacity of {self.capacity}; make it with a larger capacity")

    def _positions(self, chunk: int) -> tuple[Tensor, Tensor]:
        """(rows, positions) index tensors (B, C) of the chunk's slots, on the storage's device."""
        device = self._device
        positions = self._device_lengths[:, None] + torch.arange(chunk, device=device)
        return torch.arange(self.batch_size, device=device)[:, None].expand_as(positions), positions

    def _write(self, chunk: int, **values: Tensor | None) -> None:
        """Store each (B, C, ...) value at the rows' next C positions and advance the lengths."""
        rows, positions = self._positions(chunk)
        for name, value in values.items():
            if value is not None:  # detached: a cache serves inference and keeps no autograd graph
                self._storage[name][rows, positions] = value.detach().to(self._storage[name].dtype)
        self.lengths += chunk
        if self._device_lengths is not self.lengths:
            self._device_lengths += chunk

    def rows(self, index: int | slice) -> "_PositionCache":
        """A view of some batch rows (an int or a slice) sharing this cache's storage and lengths:
        prefill prompts of different lengths one row at a time, then decode them together."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"row {index} is out of range for a cache of {self.batch_size} rows")
            index = slice(index % self.batch_size, index % self.batch_size + 1)
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"rows takes an int or a contiguous slice, got {index!r}")
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._storage = {k: None if t is None else t[index] for k, t in self._storage.items()}
        view.lengths = self.lengths[index]
        view._device_lengths = view.lengths if self._device_lengths is self.lengths else self._device_lengths[index]
        return view

    def reset(self) -> None:
        """Forget every cached position (the storage is kept)."""
        self.lengths.zero_()
        if self._device_lengths is not self.lengths:
            self._device_lengths.zero_()


class AttentionCache(_PositionCache):
    """The keys (B, capacity, H, Dh) of a CEM attention layer's earlier positions, and their
    context (B, capacity, D) when the layer has a diagonal (else ``context`` is None)."""

    def __init__(self, batch_size: int, capacity: int, heads: int, head_dim: int, dim: int, with_context: bool, *,
                 dtype: torch.dtype, device: torch.device | str | None):
        batch_size, capacity = _check_sizes(batch_size, capacity)
        factory = {"dtype": dtype, "device": device}
        keys = torch.zeros(batch_size, capacity, heads, head_dim, **factory)
        context = torch.zeros(batch_size, capacity, dim, **factory) if with_context else None
        super().__init__({"keys": keys, "context": context}, batch_size)

    @property
    def context(self) -> Tensor | None:
        return self._storage["context"]

    def append(self, keys: Tensor, context: Tensor | None) -> None:
        self._write(keys.shape[1], keys=keys, context=context)


class KVCache(_PositionCache):
    """Keys and values (B, capacity, H, Dh) of a Llama attention layer's earlier positions."""

    def __init__(self, batch_size: int, capacity: int, heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str | None):
        batch_size, capacity = _check_sizes(batch_size, capacity)
        factory = {"dtype": dtype, "device": device}
        keys = torch.zeros(batch_size, capacity, heads, head_dim, **factory)
        values = torch.zeros(batch_size, capacity, heads, head_dim, **factory)
        super().__init__({"keys": keys, "values": values}, batch_size)

    @property
    def values(self) -> Tensor:
        return self._storage["values"]

    def append(self, keys: Tensor, values: Tensor) -> None:
        self._write(keys.shape[1], keys=keys, values=values)

    def reset(self) -> None:
        """Forget every cached position and zero the storage: SDPA masks a shorter row's unused
        slots with -inf scores, which still multiplies their values by 0, so they must be finite."""
        super().reset()
        self.keys.zero_()
        self.values.zero_()


def _check_sizes(batch_size, capacity) -> tuple[int, int]:
    """(batch_size, capacity) as ints; anything int-like (numpy or 0-d torch integers) is taken."""
    sizes = []
    for name, value in (("batch_size", batch_size), ("capacity", capacity)):
        try:
            size = operator.index(value) if not isinstance(value, bool) else None
        except TypeError:
            size = None
        if size is None or size < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        sizes.append(size)
    return sizes[0], sizes[1]

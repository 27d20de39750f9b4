"""The rolling-buffer KV cache.

One buffer per layer of shape (batch, n_kv_heads, capacity, head_dim). Absolute position p lives
in slot p % capacity. A windowed model never holds more than W slots (older keys fall out of the
window anyway); a full-attention model grows its buffer with the tokens actually used, up to the
context length. Keys are stored after rotary, so slot order never matters, only which absolute
position each slot holds, and that is derived from the row's positions: nothing needs clearing
when a finished sequence's row is reused by a new one that starts at position 0.

Each row has one more slot, after the `capacity` ring slots: a scratch slot. A row given a negative
position in a one-token step (an idle row in the engine's batched decode step: free, prefilling, or
kept for its prefix) writes its key there and attends only to it, so its ring slots stay untouched.

    cache = KVCache(cfg, batch_size=4, dtype=torch.float32, device="cpu")
    cache.reserve(prompt_len + max_tokens)        # preallocate: decode shapes never change
    cache.relayout(rows=2, capacity=64, moves=[(3, 0, 40)])   # row 3's first 40 slots become row 0's
    logits = model(tokens, positions, cache=cache)               # every row
    logits = model(tokens, positions, cache=cache.rows(slice(2, 3)))  # prefill row 2 alone
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


@dataclass
class Step:
    """What one forward call over the cache needs, computed once and shared by every layer."""

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    mask: torch.Tensor  # (B, 1, T, keys) True = may attend
    write_first: bool  # write new keys, then attend over the buffer; else attend over buffer + chunk
    slots: torch.Tensor  # (B, T') buffer slots the (last T') new tokens go to
    rows: slice


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, *, dtype=torch.float32, device="cpu",
                 capacity: int = 256):
        self.window = config.sliding_window
        # A windowed model needs W slots at most; a full-attention one, its whole context.
        self.limit = min(config.sliding_window or config.max_seq_len, config.max_seq_len)
        self.batch_size = batch_size
        self._shape = (batch_size, config.n_kv_heads, 0, config.head_dim)
        self._dtype, self._device = dtype, torch.device(device)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.capacity = 0
        self.final = False  # set by reserve(final=True): no growth check (a host sync) in decode steps
        self._n_layers = config.n_layers
        self.reserve(capacity)

    # ---- memory ---------------------------------------------------------------------------
    def reserve(self, n_positions: int, final: bool = False) -> None:
        """Make room for positions [0, n_positions), never beyond the limit. Before the buffer
        reaches its limit no slot has wrapped (slot == position), so growing is a plain copy.
        final: the caller never goes past n_positions, so one-token steps skip the check (static shapes,
        nothing for torch.compile to break on)."""
        self.final = self.final or final
        want = min(self.limit, max(n_positions, 1))
        if want <= self.capacity:
            return
        new_cap = min(self.limit, max(want, 2 * self.capacity))
        b, h, _, d = self._shape
        for store in (self.k, self.v):
            for i in range(self._n_layers):
                new = torch.zeros(b, h, new_cap + 1, d, dtype=self._dtype, device=self._device)  # + scratch
                if i < len(store):
                    new[:, :, : self.capacity] = store[i][:, :, : self.capacity]
                    store[i] = new
                else:
                    store.append(new)
        self.capacity = new_cap

    def relayout(self, rows: int, capacity: int, moves: list[tuple[int, int, int]]) -> None:
        """New buffers of `rows` rows x `capacity` slots; moves (old_row, new_row, n) copy slots [0, n) of
        rows that have not wrapped (n <= both capacities). Old and new buffers coexist during the copy."""
        b, h, _, d = self._shape
        assert capacity <= self.limit and all(n <= min(capacity, self.capacity) for _, _, n in moves)
        for store in (self.k, self.v):
            for i in range(self._n_layers):
                new = torch.zeros(rows, h, capacity + 1, d, dtype=self._dtype, device=self._device)
                for old, row, n in moves:
                    new[row, :, :n] = store[i][old, :, :n]
                store[i] = new
        self._shape = (rows, h, 0, d)
        self.batch_size, self.capacity, self.final = rows, capacity, True

    def bytes_per_slot(self) -> int:
        """Keys and values of one position of one row, over every layer."""
        _, h, _, d = self._shape
        return 2 * self._n_layers * h * d * torch.empty(0, dtype=self._dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def rows(self, rows: slice) -> _RowView:
        """The same cache, addressing only rows[start:stop] (e.g. to prefill one sequence)."""
        return _RowView(self, rows)

    # ---- one forward call ------------------------------------------------------------------
    def prepare(self, positions: torch.Tensor, rows: slice = slice(None)) -> Step:
        t = positions.shape[1]
        if t > 1 or (self.capacity < self.limit and not self.final):  # a host sync: prefill, or may grow
            end = int(positions.max()) + 1
            self.reserve(end)
            no_wrap = end <= self.capacity
        else:
            no_wrap = False
        cap = self.capacity
        write_first = t == 1 or no_wrap  # nothing the chunk still needs gets overwritten
        q = positions[:, None, :, None]  # (B, 1, T, 1)
        scratch = torch.full_like(positions[:, :1], -1)  # (B, 1) the scratch slot holds no position
        if write_first:
            last = positions[:, -1:] + 1  # (B, 1) tokens held after the write
            held = torch.cat([_slot_positions(last, cap), scratch], dim=1)  # (B, cap + 1)
            mask = self._allowed(q, held[:, None, None, :])
            if t == 1:  # idle rows (position < 0) write to the scratch slot and attend to it alone
                idle = positions < 0  # (B, 1)
                mask = torch.cat([mask[..., :cap], mask[..., cap:] | idle[:, None, :, None]], dim=-1)
                slots = torch.where(idle, cap, positions % cap)
            else:
                slots = positions % cap
        else:
            held = _slot_positions(positions[:, :1], cap)  # (B, cap) before the chunk's writes
            keys = torch.cat([held, scratch, positions], dim=1)  # (B, cap + 1 + T)
            mask = self._allowed(q, keys[:, None, None, :])
            keep = min(t, cap)  # only the chunk's last `cap` tokens survive in the buffer
            slots = positions[:, t - keep:] % cap
        return Step(positions, mask, write_first, slots, rows)

    def _allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ok = (k >= 0) & (k <= q)
        if self.window is not None:
            ok &= k > q - self.window
        return ok

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def buffers(self, layer: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value buffers (B, Hkv, capacity + 1, D) for the step's rows: contiguous views, no
        copy. A kernel that writes a write_first step's keys at step.slots itself attends over these
        (fastattention.py, fastblock.py)."""
        if step.rows == slice(None):  # every row: the buffers themselves (a view costs a cold op a layer)
            return self.k[layer], self.v[layer]
        return self.k[layer][step.rows], self.v[layer][step.rows]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: Step):
        """Store the new keys/values (B, Hkv, T, D); return the keys/values to attend over."""
        kb, vb = self.buffers(layer, step)
        if step.write_first:
            _write(kb, step.slots, k)
            _write(vb, step.slots, v)
            return kb, vb
        k_all, v_all = torch.cat([kb, k], dim=2), torch.cat([vb, v], dim=2)
        keep = step.slots.shape[1]
        _write(kb, step.slots, k[:, :, -keep:])
        _write(vb, step.slots, v[:, :, -keep:])
        return k_all, v_all


class _RowView:
    def __init__(self, cache: KVCache, rows: slice):
        self.cache, self.rows_slice = cache, rows

    def prepare(self, positions):
        return self.cache.prepare(positions, self.rows_slice)

    @property
    def dtype(self):
        return self.cache.dtype

    def buffers(self, layer, step):
        return self.cache.buffers(layer, step)

    def update(self, layer, k, v, step):
        return self.cache.update(layer, k, v, step)


def _slot_positions(n_held: torch.Tensor, cap: int) -> torch.Tensor:
    """(B, 1) tokens written so far -> (B, cap) absolute position in each slot (< 0: empty)."""
    last = n_held - 1
    j = torch.arange(cap, device=n_held.device)
    return last - torch.remainder(last - j, cap)


def _write(buf: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    # buf (B, H, S, D), slots (B, T), x (B, H, T, D)
    b = buf.shape[0]
    if b == 1:
        buf.index_copy_(2, slots[0], x)
    elif x.shape[2] == 1:  # a decode step: each row's (H, D) key at its slot (scatter_ is ~25x slower here)
        buf[torch.arange(b, device=buf.device), :, slots[:, 0]] = x[:, :, 0]
    else:
        idx = slots[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
        buf.scatter_(2, idx, x)

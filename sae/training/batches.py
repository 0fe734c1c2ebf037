"""The training batch stream over any row array (MATH §4.3, §3.4): the pipeline reads a Zarr store through it, a
notebook a numpy array or a tensor, and both get the same batches for the same rows, chunking and seed.

Kept hand-written rather than a torch DataLoader: the stream must resume bit-for-bit from a small cursor without
re-reading what earlier buffers consumed, which no sampler offers.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

DEFAULT_CHUNK_ROWS = 4096
"""Rows per read block when the rows are not chunked on disk; the pipeline's stores default to the same
(`extract.chunk_rows`), so a notebook array and a default store give the same batch order."""


class RowArray(Protocol):
    """What the stream reads: a 2-D array sliced by contiguous row ranges (numpy, Zarr, a CPU tensor, a memmap)."""

    shape: tuple[int, ...]

    def __getitem__(self, key: slice, /) -> Any: ...


class ShuffledBatches:
    """Endless stream of shuffled float32 batches of `rows`, multiplied by `scale`, `excluded` rows left out.

    Each epoch visits the row chunks (`chunk_rows` rows each: a store's own chunks) in a random order and pools
    `chunks_per_buffer` chunks at a time; a pool is the rows carried over from the previous pool plus those chunks,
    permuted, and cut into whole batches whose remainder is carried into the next pool. Both permutations are
    functions of (seed, epoch, buffer) only, so `cursor()` — where the stream stands plus the carried rows —
    restores it by reading the current buffer's chunks alone: nothing consumed in earlier buffers is read again.
    """

    def __init__(
        self,
        rows: RowArray,
        batch_size: int,
        scale: float = 1.0,
        seed: int = 0,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        chunks_per_buffer: int = 8,
        excluded: np.ndarray | None = None,
        cursor: dict[str, Any] | None = None,
        name: str = "rows",
    ):
        self.arr = rows
        self.excluded = np.zeros(0, dtype=np.int64) if excluded is None else np.asarray(excluded, dtype=np.int64)
        self.n_rows, self.d = int(rows.shape[0]), int(rows.shape[1])
        self.chunk_rows = chunk_rows
        self.n_chunks = -(-self.n_rows // chunk_rows)
        if self.n_rows - len(self.excluded) <= 0:
            raise ValueError(f"{name}: every row is excluded (outliers); there is nothing to train on")
        self.batch_size, self.scale, self.seed, self.chunks_per_buffer = batch_size, scale, seed, chunks_per_buffer
        self.n_buffers = -(-self.n_chunks // chunks_per_buffer)
        self.epoch = self.buffer = self.batch = 0
        self.carry = np.zeros((0, self.d), dtype=np.float32)
        """Rows carried into the current buffer's pool from the previous one (unscaled)."""
        self._pool: np.ndarray | None = None
        if cursor is not None:
            self._restore(cursor)

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> torch.Tensor:
        while self._pool is None:
            self._fill()
        i, b = self.batch, self.batch_size
        x = self._pool[i * b : (i + 1) * b] * self.scale
        self.batch += 1
        if (self.batch + 1) * b > len(self._pool):
            self._next_buffer()
        return torch.from_numpy(x)

    def cursor(self) -> dict[str, Any]:
        """Where the next batch comes from: (epoch, buffer, batches of that buffer already taken), the rows carried
        into that buffer, and the stream settings a restored stream must share."""
        return {
            "epoch": self.epoch,
            "buffer": self.buffer,
            "batch": self.batch,
            "carry": torch.from_numpy(self.carry.copy()),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "chunks_per_buffer": self.chunks_per_buffer,
        }

    def _restore(self, cursor: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "chunks_per_buffer"):
            if cursor[key] != getattr(self, key):
                mine = getattr(self, key)
                raise ValueError(f"batch cursor was made with {key}={cursor[key]}, this stream has {key}={mine}")
        self.epoch, self.buffer, self.batch = int(cursor["epoch"]), int(cursor["buffer"]), int(cursor["batch"])
        self.carry = np.asarray(cursor["carry"], dtype=np.float32).reshape(-1, self.d)
        if self.batch:
            self._fill(skip_empty=False)
            if self._pool is None or (self.batch + 1) * self.batch_size > len(self._pool):
                raise ValueError(f"batch cursor {self.batch} lies past the end of its buffer")

    def _chunk_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, 0, self.epoch]).permutation(self.n_chunks)

    def _fill(self, skip_empty: bool = True) -> None:
        """Read the current buffer's chunks and permute them with the carry into the pool."""
        chunks = self._chunk_order()[self.buffer * self.chunks_per_buffer : (self.buffer + 1) * self.chunks_per_buffer]
        parts = [self.carry]
        for c in chunks:
            lo, hi = c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n_rows)
            block = self.arr[lo:hi]
            rows = block.numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
            rows = rows.astype(np.float32, copy=False)
            if len(self.excluded):
                drop = self.excluded[(self.excluded >= lo) & (self.excluded < hi)] - lo
                rows = np.delete(rows, drop, axis=0)
            parts.append(rows)
        pool = np.concatenate(parts)
        self._pool = pool[np.random.default_rng([self.seed, 1, self.epoch, self.buffer]).permutation(len(pool))]
        if skip_empty and len(self._pool) < self.batch_size:
            self._next_buffer()  # too few rows for one batch: all of them carry on

    def _next_buffer(self) -> None:
        assert self._pool is not None
        self.carry = self._pool[self.batch * self.batch_size :]
        self._pool, self.batch = None, 0
        self.buffer += 1
        if self.buffer == self.n_buffers:
            self.epoch, self.buffer = self.epoch + 1, 0


def buffer_bytes(d: int, batch_size: int, chunk_rows: int = DEFAULT_CHUNK_ROWS, chunks_per_buffer: int = 8) -> int:
    """Host memory the stream holds at once: a buffer's rows plus the carry, about three copies."""
    return 3 * 4 * d * (chunks_per_buffer * chunk_rows + batch_size)


def sample_rows(
    rows: RowArray,
    n: int,
    scale: float = 1.0,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    excluded: np.ndarray | None = None,
) -> torch.Tensor:
    """About n rows from random chunks (excluded rows left out), × scale: the sample b_dec is initialised from."""
    stream = ShuffledBatches(rows, min(n, 1024), scale, seed + 1, chunk_rows, excluded=excluded)
    return torch.cat([b for _, b in zip(range(-(-n // 1024)), stream)])[:n]

"""Chunks that no longer read back as written, found, named and marked for recomputation.

Every array saeflow writes carries a CRC32C of each compressed chunk (`CHUNK_CODECS`), which zarr checks on every
read, so a reused store is verified as it is read, at no extra pass. A chunk that fails (checksum mismatch, or a
store from before checksums whose chunk no longer decompresses) is located by reading the store chunk by chunk,
named in one line, and its store marked so that the next run recomputes it (and only what follows it). A chunk
file that is missing altogether reads as zeros; writers check that every chunk they count as done exists.
"""

from __future__ import annotations

from typing import Protocol

import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from saeflow.storage.faults import exception_chain

CHUNK_CODECS = (ZstdCodec(level=0), Crc32cCodec())
"""Bytes-to-bytes codecs of every saeflow array: zarr's default zstd, then the chunk's CRC32C."""


class CorruptChunkError(RuntimeError):
    """A stored chunk is damaged; str() is one line naming the store, the chunk and the fix."""


def corruption_kind(exc: BaseException) -> str | None:
    """'checksum mismatch' / 'does not decompress' when `exc` (or what it wraps) is zarr failing to read a chunk."""
    for e in exception_chain(exc):
        text = str(e)
        if isinstance(e, ValueError) and "checksum do not match" in text:
            return "checksum mismatch"
        if isinstance(e, RuntimeError) and "decompression error" in text.lower():
            return "does not decompress"
    return None


def first_bad_chunk(arr: zarr.Array) -> tuple[int, str] | None:
    """(index along rows, kind) of the first chunk of `arr` that does not read back, or None."""
    step = arr.chunks[0]
    for i in range(-(-arr.shape[0] // step)):
        try:
            arr[i * step : (i + 1) * step]
        except Exception as e:
            kind = corruption_kind(e)
            if kind is None:
                raise
            return i, kind
    return None


def chunks_missing(arr: zarr.Array, rows_done: int) -> bool:
    """Whether a chunk holding any of the first `rows_done` rows has no file (it would read as zeros)."""
    return arr.nchunks_initialized < -(-rows_done // arr.chunks[0])


class Checked(Protocol):
    def mark_first_bad_chunk(self) -> tuple[str, int, str] | None: ...


def locate_corruption(exc: BaseException, stores: dict[str, Checked | None]) -> CorruptChunkError | None:
    """If `exc` is a chunk failing to read, the error naming it. `stores` maps what each store is ("token store")
    to it (None: not made yet); the first with a bad chunk has it marked for recomputation."""
    if corruption_kind(exc) is None:
        return None
    for what, store in stores.items():
        found = store.mark_first_bad_chunk() if store is not None else None
        if found is not None:
            url, chunk, kind = found
            return CorruptChunkError(
                f"chunk {chunk} of the {what} {url} is corrupt ({kind}): it is marked for recomputation, rerun the "
                "same command (the rest of the store is reused)"
            )
    return None

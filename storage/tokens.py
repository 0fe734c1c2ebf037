"""Token store: fixed-length token windows in one Zarr array, train windows first, held-out eval windows after."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saeflow.storage.integrity import CHUNK_CODECS, chunks_missing, first_bad_chunk
from saeflow.storage.zarr_io import WRITE_EVERY_CHUNK, array, open_group

WINDOWS_PER_CHUNK = 256


@dataclass(frozen=True)
class TokenStoreRef:
    """Where a finished token store lives and what it holds; passed between pipeline stages."""

    url: str
    n_train: int
    n_eval: int
    context_size: int
    content_hash: str

    def mark_first_bad_chunk(self) -> tuple[str, int, str] | None:
        """Find the first chunk that does not read back; mark the store unfinished (the next run writes it again)
        and return (array URL, chunk, kind)."""
        bad = first_bad_chunk(array(open_group(self.url, mode="r"), "tokens"))
        if bad is None:
            return None
        open_group(self.url, mode="r+").attrs["complete"] = False
        return f"{self.url}/tokens", *bad

    def manifest(self) -> dict[str, Any]:
        g = open_group(self.url, mode="r")
        a = array(g, "tokens")
        return {
            "uri": self.url,
            "shape": list(a.shape),
            "dtype": str(a.dtype),
            "chunks": list(a.chunks),
            "content_hash": self.content_hash,
            "n_train_windows": self.n_train,
            "n_eval_windows": self.n_eval,
            "producing_config": dict(g.attrs).get("config", {}),
        }


def open_token_store(url: str) -> TokenStoreRef | None:
    """The finished token store at `url`, or None if there is none (or it never completed)."""
    try:
        g = open_group(url, mode="r")
    except Exception:
        return None
    a = dict(g.attrs)
    if not a.get("complete") or chunks_missing(array(g, "tokens"), int(str(a["n_train"])) + int(str(a["n_eval"]))):
        return None
    return TokenStoreRef(
        url, int(str(a["n_train"])), int(str(a["n_eval"])), int(str(a["context_size"])), str(a["content_hash"])
    )


def write_token_store(
    url: str,
    windows: Iterable[np.ndarray],
    n_train: int,
    n_eval: int,
    context_size: int,
    attrs: dict[str, Any],
    on_windows=None,
) -> TokenStoreRef:
    """Write exactly n_train + n_eval windows; fail clearly if the text runs out first.

    The store is marked complete only after every window is written, so a crash leaves nothing that a later run
    would mistake for a finished store.
    """
    total = n_train + n_eval
    g = open_group(url, mode="w")
    arr = g.create_array(
        "tokens",
        shape=(total, context_size),
        chunks=(WINDOWS_PER_CHUNK, context_size),
        dtype="int32",
        compressors=CHUNK_CODECS,
        config=WRITE_EVERY_CHUNK,
    )
    digest = hashlib.sha256()
    buf: list[np.ndarray] = []
    written = 0
    for w in windows:
        buf.append(w)
        if len(buf) == WINDOWS_PER_CHUNK:
            block = np.stack(buf)
            arr[written : written + len(block)] = block
            digest.update(block.tobytes())
            written += len(block)
            buf = []
            if on_windows:
                on_windows(written, total)
        if written + len(buf) >= total:
            break
    if buf:
        block = np.stack(buf)[: total - written]
        arr[written : written + len(block)] = block
        digest.update(block.tobytes())
        written += len(block)
        if on_windows:
            on_windows(written, total)
    if written < total:
        raise ValueError(
            f"the dataset ran out after {written} windows of {context_size} tokens, {total} needed: lower "
            "tokens.train_tokens / tokens.eval_tokens or point dataset.source at more text"
        )
    g.attrs.update(
        {
            **attrs,
            "n_train": n_train,
            "n_eval": n_eval,
            "context_size": context_size,
            "content_hash": digest.hexdigest(),
            "complete": True,
        }
    )
    return TokenStoreRef(url, n_train, n_eval, context_size, digest.hexdigest())


def read_windows(ref: TokenStoreRef, split: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Windows [start, stop) of the `train` or `eval` split as an int array."""
    arr = array(open_group(ref.url, mode="r"), "tokens")
    base, n = (0, ref.n_train) if split == "train" else (ref.n_train, ref.n_eval)
    stop = n if stop is None else min(stop, n)
    return np.asarray(arr[base + start : base + stop])


def eval_split_hash(ref: TokenStoreRef) -> str:
    """sha256 of the held-out windows: two SAEs scored on stores with the same hash saw the same eval tokens."""
    return hashlib.sha256(read_windows(ref, "eval").astype(np.int32).tobytes()).hexdigest()


def iter_window_batches(ref: TokenStoreRef, split: str, batch_size: int, start: int = 0):
    """Yield (first window index, LongTensor [B, T]) batches of one split, from window `start` on."""
    n = ref.n_train if split == "train" else ref.n_eval
    for i in range(start, n, batch_size):
        yield i, torch.from_numpy(read_windows(ref, split, i, i + batch_size).astype(np.int64))

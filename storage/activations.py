"""Activation store: one chunked, compressed Zarr array [n_rows, d] per site, written resumably, read shuffled.

Layout under the store URL: `<site>/acts` (float rows, chunked along rows, whole windows per chunk) and, after
the stats stage, `<site>/outlier_rows` (int64 row indices excluded from training and stats, MATH §4.2).
Rows are positions 1..T-1 of each token window: the BOS position 0 is never stored (MATH §4.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saeflow.sae.training.batches import DEFAULT_CHUNK_ROWS, ShuffledBatches, buffer_bytes
from saeflow.sae.training.batches import sample_rows as sample_rows_of
from saeflow.storage.integrity import CHUNK_CODECS, chunks_missing, first_bad_chunk
from saeflow.storage.zarr_io import WRITE_EVERY_CHUNK, array, open_group

TARGET_CHUNK_ROWS = DEFAULT_CHUNK_ROWS


@dataclass(frozen=True)
class ActivationStoreRef:
    url: str
    sites: tuple[str, ...]
    n_rows: int
    d_model: int
    rows_per_window: int
    chunk_rows: int

    def array(self, site: str):
        return open_group(self.url, mode="r")[f"{site}/acts"]

    def attrs(self) -> dict[str, Any]:
        return dict(open_group(self.url, mode="r").attrs)

    def outlier_rows(self, site: str) -> np.ndarray:
        g = open_group(self.url, mode="r")
        key = f"{site}/outlier_rows"
        return np.asarray(array(g, key)[:]) if key in g else np.zeros(0, dtype=np.int64)

    def mark_first_bad_chunk(self) -> tuple[str, int, str] | None:
        """Find the first chunk of any site that does not read back; mark the store unfinished from that chunk on
        (extraction resumes there) and return (array URL, chunk, kind). Damaged outlier rows drop the site's
        statistics instead (the stats stage recomputes both)."""
        for site in self.sites:
            bad = first_bad_chunk(self.array(site))
            if bad is not None:
                g = open_group(self.url, mode="r+")
                rows_done = min(int(str(g.attrs["rows_done"])), bad[0] * self.chunk_rows)
                g.attrs.update({"rows_done": rows_done, "complete": False})
                return f"{self.url}/{site}/acts", *bad
            g = open_group(self.url, mode="r")
            if f"{site}/outlier_rows" in g and (bad := first_bad_chunk(array(g, f"{site}/outlier_rows"))):
                acts = array(open_group(self.url, mode="r+"), f"{site}/acts")
                acts.attrs.update({"stats": None})
                return f"{self.url}/{site}/outlier_rows", *bad
        return None

    def manifest(self, site: str) -> dict[str, Any]:
        a = self.array(site)
        attrs = dict(a.attrs)
        return {
            "uri": f"{self.url}/{site}/acts",
            "shape": list(a.shape),
            "dtype": str(a.dtype),
            "chunks": list(a.chunks),
            "compressors": [str(c) for c in a.compressors],
            "content_hash": attrs.get("stats", {}).get("content_hash"),
            "producing_config": self.attrs().get("config", {}),
            **{k: attrs[k] for k in ("model", "site", "token_store") if k in attrs},
        }


def open_activation_store(url: str) -> ActivationStoreRef | None:
    """The finished store at `url`, or None when absent or unfinished."""
    try:
        a = dict(open_group(url, mode="r").attrs)
    except Exception:
        return None
    if not a.get("complete"):
        return None
    return _ref(url, a)


def _ref(url: str, a: dict[str, Any]) -> ActivationStoreRef:
    return ActivationStoreRef(url, tuple(a["sites"]), a["n_rows"], a["d_model"], a["rows_per_window"], a["chunk_rows"])


class ActivationWriter:
    """Appends rows chunk by chunk; `rows_done` is committed only after every site's chunk is on disk.

    Reopening an unfinished store with the same identity continues from `rows_done`, so an interrupted
    extraction never duplicates or skips rows.
    """

    def __init__(
        self,
        url: str,
        sites: list[str],
        n_windows: int,
        rows_per_window: int,
        d_model: int,
        dtype: str,
        identity: dict[str, Any],
        site_attrs: dict[str, Any],
        target_chunk_rows: int = TARGET_CHUNK_ROWS,
    ):
        self.url = url
        self.sites = sites
        windows_per_chunk = max(1, target_chunk_rows // rows_per_window)
        self.chunk_rows = windows_per_chunk * rows_per_window
        self.n_rows = n_windows * rows_per_window
        self.rows_per_window = rows_per_window
        g = open_group(url, mode="a")
        if dict(g.attrs).get("identity") != identity:
            g = open_group(url, mode="w")  # different producer (or nothing yet): start clean
            for s in sites:
                g.create_group(s).create_array(
                    "acts",
                    shape=(self.n_rows, d_model),
                    chunks=(self.chunk_rows, d_model),
                    dtype=dtype,
                    compressors=CHUNK_CODECS,
                    config=WRITE_EVERY_CHUNK,
                )
                g[f"{s}/acts"].attrs.update({"site": s, **site_attrs})
            g.attrs.update(
                {
                    "identity": identity,
                    "config": identity,
                    "sites": sites,
                    "n_rows": self.n_rows,
                    "d_model": d_model,
                    "rows_per_window": rows_per_window,
                    "chunk_rows": self.chunk_rows,
                    "rows_done": 0,
                    "complete": False,
                }
            )
        self.group = g
        self.arrays = {s: array(g, f"{s}/acts") for s in sites}
        self.rows_done = int(str(g.attrs["rows_done"]))
        if any(chunks_missing(a, self.rows_done) for a in self.arrays.values()):
            self.rows_done = 0  # a chunk counted as written has no file: write them all again
        self.buffers: dict[str, list[np.ndarray]] = {s: [] for s in sites}

    @property
    def next_window(self) -> int:
        return self.rows_done // self.rows_per_window

    def add(self, rows: dict[str, np.ndarray]) -> int:
        """Buffer rows for each site; write whole chunks as they fill. Returns chunks written by this call."""
        for s in self.sites:
            self.buffers[s].append(rows[s])
        buffered = sum(len(b) for b in self.buffers[self.sites[0]])
        written = 0
        while buffered >= self.chunk_rows:
            self._write(self.chunk_rows)
            buffered -= self.chunk_rows
            written += 1
        return written

    def _write(self, n: int) -> None:
        start = self.rows_done
        for s in self.sites:
            block = np.concatenate(self.buffers[s])
            self.arrays[s][start : start + n] = block[:n]
            self.buffers[s] = [block[n:]] if len(block) > n else []
        self.rows_done = start + n
        self.group.attrs["rows_done"] = self.rows_done  # commit point

    def finish(self) -> ActivationStoreRef:
        rest = sum(len(b) for b in self.buffers[self.sites[0]])
        if rest:
            self._write(rest)
        if self.rows_done != self.n_rows:
            raise RuntimeError(f"extraction wrote {self.rows_done} rows, expected {self.n_rows}")
        self.group.attrs["complete"] = True
        return _ref(self.url, dict(self.group.attrs))


def iter_training_batches(
    ref: ActivationStoreRef,
    site: str,
    batch_size: int,
    scale: float,
    seed: int,
    chunks_per_buffer: int = 8,
    cursor: dict[str, Any] | None = None,
) -> ShuffledBatches:
    """The resumable batch stream of `site` (`sae.training.ShuffledBatches` over the Zarr array, in the store's own
    chunks, its outlier rows left out); `cursor` continues a saved one."""
    return ShuffledBatches(
        ref.array(site),
        batch_size,
        scale,
        seed,
        ref.chunk_rows,
        chunks_per_buffer,
        ref.outlier_rows(site),
        cursor,
        site,
    )


def training_buffer_bytes(ref: ActivationStoreRef, batch_size: int, chunks_per_buffer: int = 8) -> int:
    """Host memory the batch stream holds at once (`sae.training.batches.buffer_bytes`)."""
    return buffer_bytes(ref.d_model, batch_size, ref.chunk_rows, chunks_per_buffer)


def sample_rows(ref: ActivationStoreRef, site: str, n: int, scale: float, seed: int) -> torch.Tensor:
    """About n rows from random chunks (outliers left out), for b_dec initialisation (`sae.training.sample_rows`)."""
    return sample_rows_of(ref.array(site), n, scale, seed, ref.chunk_rows, ref.outlier_rows(site))

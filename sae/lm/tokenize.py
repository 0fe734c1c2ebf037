"""Pack a stream of documents into fixed-length token windows, each starting with a BOS token."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def bos_token_id(tokenizer) -> int | None:
    """The token that opens every window: BOS, else CLS (BERT-likes), else EOS; None if the tokenizer has none."""
    for attr in ("bos_token_id", "cls_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return None


def pack_windows(
    texts: Iterable[str],
    tokenizer,
    context_size: int,
    prepend_bos: bool = True,
    max_windows: int | None = None,
    batch_docs: int = 64,
) -> Iterator[np.ndarray]:
    """Yield int32 windows of exactly `context_size` tokens.

    Documents are concatenated, separated by EOS (or the BOS token when there is no EOS), and cut into windows;
    with `prepend_bos`, each window is BOS + (context_size − 1) document tokens, as SAELens does, so position 0
    is always BOS and never a mid-document token.
    """
    bos = bos_token_id(tokenizer) if prepend_bos else None
    sep = getattr(tokenizer, "eos_token_id", None)
    sep = bos if sep is None else sep
    body = context_size - (1 if bos is not None else 0)
    if body < 1:
        raise ValueError(f"context_size {context_size} leaves no room for text after BOS; use at least 2")
    buf: list[int] = []
    made = 0
    batch: list[str] = []

    def drain() -> Iterator[np.ndarray]:
        nonlocal buf, made
        while len(buf) >= body and (max_windows is None or made < max_windows):
            chunk, buf = buf[:body], buf[body:]
            yield np.asarray(([bos] if bos is not None else []) + chunk, dtype=np.int32)
            made += 1

    for text in texts:
        if not text:
            continue
        batch.append(text)
        if len(batch) < batch_docs:
            continue
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf.extend(ids + ([sep] if sep is not None else []))
        batch = []
        yield from drain()
        if max_windows is not None and made >= max_windows:
            return
    if batch:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf.extend(ids + ([sep] if sep is not None else []))
    yield from drain()

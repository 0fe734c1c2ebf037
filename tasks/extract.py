from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from saeflow.config import PipelineConfig
from saeflow.sae.lm.sites import run_to_sites, site_width
from saeflow.storage.activations import ActivationStoreRef, ActivationWriter, open_activation_store
from saeflow.storage.tokens import TokenStoreRef, iter_window_batches
from saeflow.tasks.common import DOWNLOAD_RETRIES, activation_store_url, loaded_model, model_identity, run_logger


@task(name="extract", cache_policy=NO_CACHE, **DOWNLOAD_RETRIES)  # resumable: a retry continues
def extract_activations(
    cfg: PipelineConfig, tokens: TokenStoreRef, on_chunk: Callable[[int], None] | None = None
) -> ActivationStoreRef:
    """Run the model over the train windows and write each site's activations (positions 1..T-1) to Zarr.

    Resumes an interrupted extraction from its last complete chunk. `on_chunk(rows_done)` is called after each
    batch that committed at least one chunk.
    """
    log = run_logger()
    url, identity = activation_store_url(cfg, tokens)
    if (ref := open_activation_store(url)) is not None:
        log.info(f"extract: reusing {url} ({ref.n_rows:,} rows × {len(ref.sites)} sites)")
        return ref
    lm = loaded_model(cfg)
    sites = list(cfg.extract.sites)
    d = site_width(lm.model, sites[0])
    rows_per_window = tokens.context_size - 1
    site_attrs = {"model": model_identity(cfg), "dtype": cfg.extract.dtype, "token_store": tokens.manifest()}
    writer = ActivationWriter(
        url, sites, tokens.n_train, rows_per_window, d, cfg.extract.dtype, identity, site_attrs, cfg.extract.chunk_rows
    )
    if writer.rows_done:
        log.info(f"extract: resuming {url} at row {writer.rows_done:,} of {writer.n_rows:,}")
    bar = tqdm(total=writer.n_rows, initial=writer.rows_done, unit="tok", unit_scale=True, desc="extract")
    t0, start_rows = time.time(), writer.rows_done
    for _, ids in iter_window_batches(tokens, "train", cfg.extract.batch_size, start=writer.next_window):
        acts = run_to_sites(lm.model, ids.to(lm.device), sites)
        rows = {
            s: acts[s][:, 1:].reshape(-1, d).float().cpu().numpy().astype(np.dtype(cfg.extract.dtype)) for s in sites
        }
        if writer.add(rows):
            rate = (writer.rows_done - start_rows) / max(time.time() - t0, 1e-9)
            log.info(f"extract: {writer.rows_done:,}/{writer.n_rows:,} tokens ({rate:,.0f} tok/s)")
            if on_chunk:
                on_chunk(writer.rows_done)
        bar.update(ids.shape[0] * rows_per_window)
    bar.close()
    ref = writer.finish()
    log.info(f"extract: wrote {url}")
    return ref

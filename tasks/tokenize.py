from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from saeflow.config import PipelineConfig
from saeflow.sae.lm.tokenize import pack_windows
from saeflow.storage.text import load_texts
from saeflow.storage.tokens import TokenStoreRef, open_token_store, write_token_store
from saeflow.tasks.common import DOWNLOAD_RETRIES, loaded_model, run_logger, token_store_url


@task(name="tokenize", cache_policy=NO_CACHE, **DOWNLOAD_RETRIES)
def tokenize_dataset(cfg: PipelineConfig) -> TokenStoreRef:
    """Text → fixed-length BOS-led token windows in a Zarr store; reuses a finished store with the same identity."""
    log = run_logger()
    url, identity = token_store_url(cfg)
    if (ref := open_token_store(url)) is not None:
        log.info(f"tokenize: reusing {url} ({ref.n_train} train + {ref.n_eval} eval windows)")
        return ref
    tok = loaded_model(cfg).tokenizer
    t = cfg.tokens
    n_train, n_eval = identity["n_train"], identity["n_eval"]
    d = cfg.dataset
    texts = load_texts(d.source, d.text_field, d.split, d.subset, d.revision)
    windows = pack_windows(texts, tok, t.context_size, t.prepend_bos, max_windows=n_train + n_eval)

    bar = tqdm(total=(n_train + n_eval) * t.context_size, unit="tok", unit_scale=True, desc="tokenize")

    def progress(done: int, total: int) -> None:
        bar.total = total * t.context_size
        bar.update(done * t.context_size - bar.n)

    with bar:
        ref = write_token_store(
            url, windows, n_train, n_eval, t.context_size, {"config": identity}, on_windows=progress
        )
    log.info(f"tokenize: wrote {url} ({n_train} train + {n_eval} eval windows of {t.context_size})")
    return ref

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import PipelineConfig
from saeflow.storage.activations import ActivationStoreRef
from saeflow.storage.stats import SiteStats, compute_site_stats, dask_client, load_site_stats, save_site_stats
from saeflow.tasks.common import run_logger, tracker


@task(name="stats", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)  # a Dask cluster that failed to start
def compute_stats(cfg: PipelineConfig, acts: ActivationStoreRef, parent_run_id: str) -> dict[str, SiteStats]:
    """Per-site mean, variance, norms, normalization scale and outliers with Dask; stored with the array."""
    log = run_logger()
    st = cfg.stats
    wanted = {"normalize": st.normalize, "outlier_norm_ratio": st.outlier_norm_ratio}
    todo = [
        s
        for s in acts.sites
        if (old := load_site_stats(acts, s)) is None or any(getattr(old, k) != v for k, v in wanted.items())
    ]
    if todo:
        with dask_client(st.dask_scheduler, st.n_workers) as client:
            log.info(f"stats: Dask {client.dashboard_link or client.scheduler.address} over {todo}")
            for site in todo:
                computed = compute_site_stats(acts, site, st.outlier_norm_ratio, st.normalize)
                save_site_stats(acts, site, computed.stats, computed.outlier_rows)
    else:
        log.info("stats: reusing stored statistics for every site")
    stats: dict[str, SiteStats] = {}
    for site in acts.sites:
        saved = load_site_stats(acts, site)
        if saved is None:
            raise RuntimeError(f"statistics of {site!r} were not saved in {acts.url}")
        stats[site] = saved
    tr = tracker(cfg)
    for site, s in stats.items():
        keys = ("scale", "mean_norm", "median_norm", "mean_var", "n_outliers", "outlier_energy_fraction", "n_rows_used")
        tr.log_metrics(parent_run_id, {k: getattr(s, k) for k in keys}, prefix=f"stats/{site}/")
        tr.log_dict(parent_run_id, s.model_dump(mode="json"), f"stats/{site}.json")
        tr.log_dict(parent_run_id, acts.manifest(site), f"manifests/activations/{site}.json")
        log.info(
            f"stats {site}: scale {s.scale:.4g}, mean ‖x‖ {s.mean_norm:.4g}, "
            f"{s.n_outliers} outlier rows ({s.outlier_energy_fraction:.1%} of energy) excluded"
        )
    return stats

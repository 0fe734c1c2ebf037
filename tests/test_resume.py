"""Resumable training (MATH §3.4): a killed run resumed from its last checkpoint ends at exactly the weights of an
uninterrupted run, reading only the data it had not consumed; half-written checkpoints are ignored; a group that
cannot fit in memory fails before anything is allocated."""

from __future__ import annotations

import logging
import os
from dataclasses import astuple, dataclass, field

import numpy as np
import pytest
import torch

from saeflow.sae import ReLUConfig, TopKConfig, build_sae
from saeflow.sae.training import TrainingConfig, TrainingMemoryError, train_saes
from saeflow.storage import checkpoints
from saeflow.storage.activations import ActivationStoreRef, ActivationWriter, iter_training_batches, sample_rows
from saeflow.storage.checkpoints import load_training_state, save_training_state
from saeflow.storage.stats import SiteStats, compute_site_stats, save_site_stats

D, CHUNKS_PER_BUFFER, TOTAL = 32, 3, 1200
CFG = TrainingConfig(batch_size=32, log_every=1, checkpoint_every_tokens=200, dead_tokens=128, device="cpu")
SPECS = [TopKConfig(k=4, d_sae=64), ReLUConfig(l1_coefficient=1.0, d_sae=64)]


class Killed(Exception):
    """Stands in for the process being killed."""


class CountingArray:
    def __init__(self, arr, reads: list[int]):
        self.arr, self.reads = arr, reads
        self.shape = arr.shape

    def __getitem__(self, key: slice):
        self.reads.append(key.start)
        return self.arr[key]


@dataclass(frozen=True)
class CountingRef(ActivationStoreRef):
    """The store, recording the first row of every chunk the batch stream reads."""

    reads: list[int] = field(default_factory=list, compare=False)

    def array(self, site: str):
        return CountingArray(super().array(site), self.reads)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared CPU run far faster (and the same) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStoreRef:
    """720 rows of width 32 in 12 chunks of 60 rows, 4 of them outliers (so pools vary in size and rows carry)."""
    x = np.random.default_rng(0).normal(size=(48 * 15, D)).astype(np.float32)
    url = str(tmp_path_factory.mktemp("resume") / "acts")
    w = ActivationWriter(url, ["s"], 48, 15, D, "float32", {"test": "resume"}, {}, target_chunk_rows=60)
    w.add({"s": x})
    ref = w.finish()
    stats = compute_site_stats(ref, "s").stats.model_copy(update={"content_hash": "resume-test"})
    save_site_stats(ref, "s", stats, np.array([3, 100, 401, 650]))
    return ref


def counting(ref: ActivationStoreRef) -> CountingRef:
    return CountingRef(*astuple(ref))


def new_group():
    torch.manual_seed(0)
    return [build_sae(spec, D) for spec in SPECS]


def assert_same_training_state(a, b):
    assert (a.step_count, a.tokens_seen) == (b.step_count, b.tokens_seen)
    for sa, sb in zip(a.saes, b.saes):
        for (ka, va), (kb, vb) in zip(sa.state_dict().items(), sb.state_dict().items()):
            assert ka == kb and torch.equal(va, vb), ka
    for oa, ob in zip(a.optimizers, b.optimizers):
        da, db = oa.state_dict(), ob.state_dict()
        assert da["param_groups"] == db["param_groups"]
        for pid in da["state"]:
            for k, v in da["state"][pid].items():
                assert torch.equal(v, db["state"][pid][k]), (pid, k)
    for sa, sb in zip(a.schedulers, b.schedulers):
        assert sa.state_dict() == sb.state_dict()
    for ta, tb in zip(a.tokens_since_fired, b.tokens_since_fired):
        assert torch.equal(ta, tb)


def test_a_stream_restored_from_its_cursor_continues_with_the_same_batches(store):
    stream = iter_training_batches(store, "s", 32, 1.0, seed=5, chunks_per_buffer=CHUNKS_PER_BUFFER)
    cursors, batches = [], []
    for _ in range(50):  # more than two epochs
        cursors.append(stream.cursor())
        batches.append(next(stream))
    for i in range(0, 50, 3):
        restored = iter_training_batches(
            store, "s", 32, 1.0, seed=5, chunks_per_buffer=CHUNKS_PER_BUFFER, cursor=cursors[i]
        )
        for j in range(i, min(i + 4, 50)):
            assert torch.equal(next(restored), batches[j]), (i, j)


def test_a_killed_run_resumed_from_its_checkpoint_ends_bit_for_bit_where_an_uninterrupted_run_ends(store, tmp_path):
    sample = sample_rows(store, "s", 256, 1.0, seed=0)

    full_ref = counting(store)
    full_stream = iter_training_batches(full_ref, "s", 32, 1.0, seed=0, chunks_per_buffer=CHUNKS_PER_BUFFER)
    full = train_saes(new_group(), full_stream, CFG, TOTAL, b_dec_sample=sample, progress=False)

    stream = iter_training_batches(store, "s", 32, 1.0, seed=0, chunks_per_buffer=CHUNKS_PER_BUFFER)

    def kill_at_step_30(step, tokens, metrics):
        if step == 30:
            raise Killed

    with pytest.raises(Killed):
        train_saes(
            new_group(),
            stream,
            CFG,
            TOTAL,
            b_dec_sample=sample,
            on_step=kill_at_step_30,
            progress=False,
            on_checkpoint=lambda tr: save_training_state(str(tmp_path), tr, stream.cursor()),
        )
    ckpt = load_training_state(str(tmp_path))
    assert ckpt.tokens_seen == 800  # the last multiple of 200 reached before step 30 (960 tokens)
    cur = ckpt.cursor
    assert (cur["epoch"], cur["buffer"]) == (1, 0) and cur["batch"] > 0 and len(cur["carry"]) > 0  # mid-buffer

    resumed_ref = counting(store)
    resumed_stream = iter_training_batches(
        resumed_ref, "s", 32, 1.0, seed=0, chunks_per_buffer=CHUNKS_PER_BUFFER, cursor=ckpt.cursor
    )
    resumed = train_saes(new_group(), resumed_stream, CFG, TOTAL, resume_from=ckpt.state, progress=False)

    assert_same_training_state(full, resumed)
    # The resumed run reads the checkpoint's buffer again and then what the full run read after it; nothing of the
    # buffers consumed before the checkpoint.
    n_chunks = 12
    consumed = cur["epoch"] * n_chunks + cur["buffer"] * CHUNKS_PER_BUFFER
    assert consumed > 0 and resumed_ref.reads == full_ref.reads[consumed:]


def test_a_save_killed_midway_leaves_the_previous_checkpoint_in_force(store, tmp_path, monkeypatch):
    stream = iter_training_batches(store, "s", 32, 1.0, seed=0)
    cfg = CFG.model_copy(update={"checkpoint_every_tokens": 64})
    real_save_file = checkpoints.save_file
    saves = []

    def on_checkpoint(trainer):
        if len(saves) == 1:  # the second save dies after writing part of its tensors

            def partial_write(tensors, path):
                real_save_file(dict(list(tensors.items())[:3]), path)
                raise Killed

            monkeypatch.setattr(checkpoints, "save_file", partial_write)
        saves.append(save_training_state(str(tmp_path), trainer, stream.cursor()))

    with pytest.raises(Killed):
        train_saes(new_group(), stream, cfg, TOTAL, on_checkpoint=on_checkpoint, progress=False)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert len(saves) == 1 and len(leftovers) == 1  # the half-written state is still on disk...
    ckpt = load_training_state(str(tmp_path))
    assert ckpt.path == saves[0] and ckpt.tokens_seen == 64  # ...and ignored


def test_a_state_only_half_written_is_no_checkpoint(tmp_path):
    os.makedirs(tmp_path / ".tmp-abc")
    (tmp_path / ".tmp-abc" / checkpoints.STATE_JSON).write_text('{"format": "saeflow.training_state/1"')
    assert load_training_state(str(tmp_path)) is None


def pipeline_config(root: str, **train):
    from saeflow.config import validate_config

    return validate_config(
        {
            "root": root,
            "saes": [s.model_dump() for s in SPECS],
            "train": {
                "batch_size": 32,
                "log_every": 5,
                "dead_tokens": 128,
                "device": "cpu",
                "tokens": TOTAL,
                "b_dec_sample_rows": 256,
                "checkpoint_every_tokens": 200,
                **train,
            },
        }
    )


STATS = SiteStats(  # what the train task reads: scale, the row budget, the normalization; the rest is filler
    n_rows=720,
    n_rows_used=716,
    d_model=D,
    mean=[0.0] * D,
    var=[1.0] * D,
    mean_var=1.0,
    mean_norm=1.0,
    median_norm=1.0,
    mean_sq_norm=1.0,
    normalize="none",
    scale=1.0,
    outlier_norm_ratio=None,
    outlier_norm_threshold=None,
    n_outliers=4,
    outlier_energy_fraction=0.0,
    outlier_positions=[],
    content_hash="resume-test",
)


def test_too_large_a_group_fails_before_building_anything_with_one_line_naming_the_fix(store, tmp_path):
    from saeflow.tasks.train import train_site_saes

    cfg = pipeline_config(str(tmp_path / "work"))
    cfg.saes[0] = TopKConfig(k=4, expansion_factor=10**8)  # 3.2e9 latents: terabytes of Adam state
    with pytest.raises(TrainingMemoryError) as err:
        train_site_saes.fn(cfg, store, STATS, "s", list(cfg.saes), "no-parent-run")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("train s [topk-x100000000-k4, ")
    for words in (
        "needs about",
        "GiB",
        "available RAM",
        "train.batch_size",
        "expansion_factor",
        "train.group_by_site=false",
    ):
        assert words in msg
    assert not os.path.exists(tmp_path / "work")  # no MLflow store, no checkpoint: it failed first


def test_a_killed_train_task_resumes_in_the_same_mlflow_runs_and_ends_like_an_uninterrupted_one(
    store, tmp_path, monkeypatch, caplog
):
    import saeflow.tasks.train as train_task
    from saeflow.tasks.common import tracker

    cfg = pipeline_config(str(tmp_path / "work"))
    tr = tracker(cfg)
    trainers = []
    real_train, real_save = train_task.train_saes, train_task.save_training_state

    def recording_train(*args, **kwargs):
        trainers.append(real_train(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(train_task, "train_saes", recording_train)

    def killed_after_four_saves(directory, *a, **k):
        if load_training_state(directory) and load_training_state(directory).tokens_seen >= 800:
            raise Killed  # the fifth checkpoint (1024 tokens) never happens: 7 steps are lost
        return real_save(directory, *a, **k)

    monkeypatch.setattr(train_task, "save_training_state", killed_after_four_saves)
    first_parent = tr.start_run("killed")
    with pytest.raises(Killed):
        train_task.train_site_saes.fn(cfg, store, STATS, "s", list(cfg.saes), first_parent)
    ckpt_dir, _ = train_task.checkpoint_location(cfg, store, "s", list(cfg.saes), 1.0, TOTAL)
    killed_runs = load_training_state(ckpt_dir).record.runs
    monkeypatch.setattr(train_task, "save_training_state", real_save)

    second_parent = tr.start_run("resumed")
    # The handler goes on the "saeflow" logger itself: Prefect configures logging lazily, and when that happens
    # inside this call (this test run alone) it replaces the root handlers, caplog's among them.
    saeflow_log = logging.getLogger("saeflow")
    saeflow_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="saeflow"):
            resumed = train_task.train_site_saes.fn(cfg, store, STATS, "s", list(cfg.saes), second_parent)
    finally:
        saeflow_log.removeHandler(caplog.handler)
    assert "train s: resuming from" in caplog.text and "at 800/1,200 tokens" in caplog.text
    assert [t.run_id for t in resumed] == killed_runs
    for run_id in killed_runs:
        run = tr.client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == second_parent and run.data.tags["resumed_at_tokens"] == "800"
        assert run.info.status == "RUNNING"  # the evaluate task ends it
    assert not os.path.exists(ckpt_dir)  # finished: nothing left to resume

    uninterrupted = train_task.train_site_saes.fn(cfg, store, STATS, "s", list(cfg.saes), tr.start_run("full"))
    assert {t.run_id for t in uninterrupted}.isdisjoint(killed_runs)
    resumed_trainer, uninterrupted_trainer = trainers  # the killed call returned none
    assert_same_training_state(resumed_trainer, uninterrupted_trainer)
    # The steps replayed after the checkpoint are logged once: the resumed run's curve is the uninterrupted one's.
    for killed, full in zip(killed_runs, [t.run_id for t in uninterrupted]):
        curve = [(m.step, m.value) for m in tr.client.get_metric_history(killed, "train/loss")]
        assert sorted(curve) == sorted((m.step, m.value) for m in tr.client.get_metric_history(full, "train/loss"))


def test_a_kill_between_two_registrations_leaves_one_version_per_sae(store, tmp_path, monkeypatch):
    """Killed right after the first of two SAEs was registered, the rerun resumes and registers the second;
    the first keeps its one version (registration is idempotent per run and model)."""
    import saeflow.tasks.train as train_task
    from saeflow.tasks.common import tracker

    cfg = pipeline_config(str(tmp_path / "work"))
    tr = tracker(cfg)
    real_publish = train_task.publish_sae
    published: list[str] = []

    def killed_after_first_registration(*args, **kwargs):
        if published:
            raise Killed
        published.append(real_publish(*args, **kwargs))
        return published[-1]

    monkeypatch.setattr(train_task, "publish_sae", killed_after_first_registration)
    with pytest.raises(Killed):
        train_task.train_site_saes.fn(cfg, store, STATS, "s", list(cfg.saes), tr.start_run("killed"))
    monkeypatch.setattr(train_task, "publish_sae", real_publish)
    resumed = train_task.train_site_saes.fn(cfg, store, STATS, "s", list(cfg.saes), tr.start_run("rerun"))
    for t in resumed:
        versions = tr.client.search_model_versions(f"name = '{t.registered_name}'")
        assert [(str(v.version), v.run_id) for v in versions] == [("1", t.run_id)]
        assert str(tr.client.get_model_version_by_alias(t.registered_name, cfg.tracking.alias).version) == "1"
    assert [t.version for t in resumed] == ["1", "1"] and published == ["1"]


def test_non_finite_losses_stop_training_with_one_line_naming_the_step():
    from saeflow.sae.training import NonFiniteLossError

    good = torch.randn(64, D)
    poisoned = good.clone()
    poisoned[3, 5] = float("nan")
    batches = iter([good, good, good, poisoned, good, good])
    cfg = TrainingConfig(batch_size=64, log_every=1, dead_tokens=128, device="cpu")
    with pytest.raises(NonFiniteLossError) as err:
        train_saes(new_group(), batches, cfg, 6 * 64, group="train s [toy]", progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("train s [toy]: topk-x64-k4's loss is nan at step 3 (192 tokens); training stopped")


def test_an_sae_with_non_finite_weights_is_never_registered(tmp_path):
    from saeflow.storage.tracking import NonFiniteModelError, Tracker, publish_sae

    tr = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "faults", f"file://{tmp_path}/artifacts")
    run_id = tr.start_run("nan")
    sae = new_group()[0]
    with torch.no_grad():
        sae.W_dec[2, 1] = float("inf")
    with pytest.raises(NonFiniteModelError, match=r"^m: the trained SAE has NaN/inf in W_dec; it is not registered"):
        publish_sae(tr, run_id, sae, {"site": "s"}, "m", {"site": "s"}, "current")
    assert tr.client.search_registered_models() == []
    assert tr.client.get_run(run_id).data.tags.get("registered_version") is None

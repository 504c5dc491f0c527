"""skops' default trusted type names, without its two slow searches at every import.

MLflow 3 saves and loads scikit-learn models with skops. ``skops.io`` (0.16) builds its default trusted
types when ``skops.io._trusted_types`` is imported, with two searches that every process loading or
logging a model pays -- each model server's start (every canary), the rollout controller's scorer, each
pipeline's task server:

- ``sklearn.utils.all_estimators()`` imports *every* scikit-learn module (and pytest through
  ``sklearn.utils._testing``) for the estimator names: ~0.5 s on a slow 2-core machine;
- ``get_public_type_names(scipy.special, np.ufunc)`` finds each of ~230 ufuncs' module by scanning
  ``sys.modules`` in import order (ufuncs have no ``__module__``): 0.07 s in a bare interpreter, **2.9 s**
  in a model server, where kserve and MLflow put ~2,000 modules before scipy's.

Both answers are functions of the installed scikit-learn, skops, numpy and scipy versions, so they are
kept in the user's cache (:mod:`driftloop.core.user_cache`): the first process computes them as skops
does (its own functions, then writes the names), later ones hand skops' import the same answers -- the
estimator names as stand-in classes (``__module__`` and ``__name__`` are all skops reads of them:
``get_type_name``), the ufunc names as the lists -- and both searches are skipped. skops' module is
otherwise untouched, so trust decisions are skops' own; ``tests/test_skops_names.py`` checks the lists
are identical to skops' own in a bare interpreter and in one with a model server's imports, and that
models round-trip with the default trust.

:func:`install` (from ``driftloop/__init__.py``) puts a finder first on ``sys.meta_path`` that acts only on
``skops.io._trusted_types``; ``DRIFTLOOP_SKOPS_NAMES=off`` turns it off (skops searches as it always did).
While skops' module runs, ``sklearn.utils.all_estimators`` answers with the stand-ins: a call from another
thread in that moment (none in this project) would get them too.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from typing import Any

__all__ = ["install", "MODULE", "OFF_ENV"]

MODULE = "skops.io._trusted_types"
OFF_ENV = "DRIFTLOOP_SKOPS_NAMES"


def _versions() -> dict[str, str]:
    import numpy  # all imported already by the time skops imports this module
    import scipy
    import sklearn
    import skops

    return {"scikit-learn": sklearn.__version__, "skops": skops.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__}


def _stand_in(name: str) -> type:
    module, _, cls = name.rpartition(".")
    return type(cls, (), {"__module__": module})


def _valid(cached: Any) -> bool:
    def names(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(n, str) and "." in n for n in value)

    return (isinstance(cached, dict) and names(cached.get("estimators")) and bool(cached["estimators"])
            and isinstance(cached.get("public"), dict) and all(names(v) for v in cached["public"].values()))


class _Loader(importlib.machinery.SourceFileLoader):
    """skops' own module, executed with its two slow helpers answering from the cache when they can."""

    def exec_module(self, module: Any) -> None:
        import sklearn.utils
        from skops.io import _utils

        from driftloop.core.user_cache import cache_file, read_json, write_json

        path = cache_file("skops-trusted-names", **_versions())
        cached = read_json(path)
        if not _valid(cached):
            cached = {"estimators": None, "public": {}}
        public: dict[str, list[str]] = dict(cached["public"])
        real_estimators, real_public = sklearn.utils.all_estimators, _utils.get_public_type_names

        def estimators(type_filter: Any = None) -> list[tuple[str, type]]:
            if type_filter is not None or cached["estimators"] is None:  # not cached: as scikit-learn answers
                return real_estimators(type_filter=type_filter)
            return [(n.rpartition(".")[2], _stand_in(n)) for n in cached["estimators"]]

        def public_names(module: Any, oftype: type) -> list[str]:
            key = f"{module.__name__}:{oftype.__module__}.{oftype.__qualname__}"
            if key not in public:
                public[key] = real_public(module=module, oftype=oftype)
            return list(public[key])

        sklearn.utils.all_estimators, _utils.get_public_type_names = estimators, public_names
        try:
            super().exec_module(module)
        finally:
            sklearn.utils.all_estimators, _utils.get_public_type_names = real_estimators, real_public
        # the module's own names for them are skops' and scikit-learn's again
        module.all_estimators, module.get_public_type_names = real_estimators, real_public
        if cached["estimators"] is None or public != cached["public"]:
            write_json(path, {"estimators": list(module.SKLEARN_ESTIMATOR_TYPE_NAMES), "public": public})


class _Finder:
    """A meta path finder (``find_spec`` is all the import system asks of one; ``importlib.abc`` is not
    imported for its base class: it costs every process ~20 ms)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != MODULE or os.environ.get(OFF_ENV) == "off":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec  # not a plain source file (a zip, a frozen build): imported as it comes
        spec.loader = _Loader(fullname, spec.origin)
        return spec


_FINDER = _Finder()


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)

"""The shadow phase's contract between serving and monitoring, and the comparison of joined answers.

serving/ and monitoring/ never import each other; what both must agree on lives here:

* names — the serving role ``shadow``, the shadow InferenceService ``<name>-shadow``, the
  annotations its logger copies into each CloudEvent, and the request-id header KServe's logger
  copies into the ``metadata`` extension (``metadataHeaders``);
* :func:`compare_rows` — agreement (classification: share of equal labels; regression: mean
  absolute and relative difference), both prediction samples for the output PSI, and the quality
  of both on the same labelled rows. The local gateway judges its in-process join with it
  (``serving.shadow.ShadowStats``) and the monitor the join of a cluster's inference log
  (``GET /shadow``), so the rollout controller reads the same numbers in both homes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "SHADOW_ROLE",
    "SHADOW_SUFFIX",
    "ROLE_ANNOTATION",
    "VERSION_ANNOTATION",
    "REQUEST_ID_HEADER",
    "shadow_name",
    "quality_of",
    "compare_rows",
]

SHADOW_ROLE = "shadow"
SHADOW_SUFFIX = "-shadow"  # the shadow InferenceService's name, and the gateway's ce-id of a shadow answer
ROLE_ANNOTATION = "driftloop.io/serving-role"
VERSION_ANNOTATION = "driftloop.io/model-version"
# KServe's logger matches metadataHeaders against Go's canonical header names (r.Header keys), so the
# name must be written canonically: "x-request-id" would never match (pkg/logger/handler.go).
REQUEST_ID_HEADER = "X-Request-Id"


def shadow_name(name: str) -> str:
    """The shadow InferenceService of the InferenceService ``name``."""
    return f"{name}{SHADOW_SUFFIX}"


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_discrete(value: Any) -> bool:
    return isinstance(value, (str, bool)) or (isinstance(value, (int, float)) and float(value).is_integer())


def quality_of(pairs: list[tuple[Any, Any]]) -> tuple[str, float] | None:
    """Quality of (prediction, label) pairs: accuracy for class labels, else negative mean absolute error.

    Both are "higher is better", so the controller can compare two models the same way.
    """
    if not pairs:
        return None
    if all(_is_discrete(p) and _is_discrete(y) for p, y in pairs):
        hits = sum(1 for p, y in pairs if str(p) == str(y) or (_num(p) is not None and _num(p) == _num(y)))
        return "accuracy", hits / len(pairs)
    errors = [abs(float(p) - float(y)) for p, y in pairs if _num(p) is not None and _num(y) is not None]
    if not errors:
        return None
    return "neg_mae", -sum(errors) / len(errors)


def compare_rows(rows: Iterable[tuple[Any, Any, Any]], *, max_predictions: int = 2_000) -> dict[str, Any]:
    """Compare joined answers row by row: ``(primary prediction, shadow prediction, label or None)``.

    Returns ``rows``, the last ``max_predictions`` of both predictions (for the output PSI),
    ``agreement`` when every prediction is a class label (str, bool, int) or ``mean_abs_diff`` and
    ``relative_diff`` when all are numbers, ``labels`` and, with labels, ``quality_metric``,
    ``primary_quality`` and ``shadow_quality`` (see :func:`quality_of`) on the same rows.
    """
    rows = list(rows)
    joined = [(a, b) for a, b, _ in rows]
    out: dict[str, Any] = {
        "rows": len(joined),
        "primary_predictions": [a for a, _ in joined][-max_predictions:],
        "shadow_predictions": [b for _, b in joined][-max_predictions:],
    }
    nums = [(_num(a), _num(b)) for a, b in joined]
    discrete = joined and all(isinstance(a, (str, bool, int)) and isinstance(b, (str, bool, int)) for a, b in joined)
    if discrete:
        out["agreement"] = sum(1 for a, b in joined if str(a) == str(b)) / len(joined)
    elif joined and all(a is not None and b is not None for a, b in nums):
        diffs = [abs(a - b) for a, b in nums]
        scale = sum(abs(a) for a, _ in nums) / len(nums)
        out["mean_abs_diff"] = sum(diffs) / len(diffs)
        out["relative_diff"] = out["mean_abs_diff"] / scale if scale > 0 else (0.0 if not any(diffs) else None)
    labelled = [(a, b, y) for a, b, y in rows if y is not None]
    qp, qs = quality_of([(a, y) for a, _, y in labelled]), quality_of([(b, y) for _, b, y in labelled])
    out["labels"] = len(labelled)
    if qp and qs:
        out["quality_metric"], out["primary_quality"], out["shadow_quality"] = qp[0], qp[1], qs[1]
    return out

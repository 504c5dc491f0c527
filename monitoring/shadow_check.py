"""The shadow comparison on a cluster: the shadow InferenceService's logged answers against the primary's.

During a shadow phase on a cluster both InferenceServices log to this monitor; KServe's logger
copies the ``X-Request-Id`` into the ``metadata`` extension, so the store joins the shadow's rows
with the primary's of the same request (:meth:`monitoring.store.InferenceStore.shadow_pairs`).
:func:`shadow_summary` compares them with the numbers the local gateway reports for its own
join; the rollout controller reads it through ``GET /shadow`` (:mod:`monitoring.routes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from driftloop.core.shadow import compare_rows

if TYPE_CHECKING:
    from monitoring.store import InferenceStore

__all__ = ["shadow_summary"]


def shadow_summary(store: InferenceStore, since: float | None = None, version: str | None = None) -> dict[str, Any]:
    """The shadow's logged answers since ``since`` joined with the primary's and compared
    (``driftloop.core.shadow.compare_rows``: the numbers the local gateway reports for its own join).

    ``joined_requests`` counts the shadow's requests whose primary answer was found;
    ``unjoined_rows`` the shadow rows without one yet (in flight, or a logger without
    ``metadataHeaders``). Errors and latency of the shadow are not here: its logger logs only
    the answers it gave (HTTP 200), so the controller reads those from Prometheus."""
    pairs = store.shadow_pairs(since, version=version)
    joined = pairs[pairs["primary_id"].notna()]
    out = compare_rows(zip(joined["primary_prediction"].tolist(), joined["shadow_prediction"].tolist(),
                           joined["label"].tolist()))
    out.update({"source": "monitor", "shadow_rows": len(pairs), "unjoined_rows": len(pairs) - len(joined),
                "shadow_requests_logged": int(pairs["request_key"].nunique()),
                "joined_requests": int(joined["request_key"].nunique())})
    return out

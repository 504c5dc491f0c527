"""Compact schema of Istio's ``VirtualService`` (``networking.istio.io/v1``), for the shadow mirror.

The cluster side of the shadow phase (:func:`serving.inference_service.build_mirror_virtual_service`)
renders a VirtualService with ``http[].mirror`` and ``mirrorPercentage``. Istio has no Python
model classes here and no API server is at hand, so the rendered dict is checked against this
schema with the infra check's compact validator (:func:`driftloop.app.infra_check.check_objects`).

Where it came from — and how: TRANSCRIBED BY HAND, not downloaded, from the upstream CRD
``manifests/charts/base/files/crd-all.gen.yaml`` of istio/istio 1.24
(``virtualservices.networking.istio.io``, version ``v1``, served and stored since Istio 1.22;
the ``v1beta1``/``v1alpha3`` schemas are the same). The ``openAPIV3Schema`` of ``spec`` was
reduced as in :mod:`driftloop.app.infra_crds`: ``type``, ``required``, ``enum``, ``properties``
and ``items`` only; descriptions, formats, bounds and CEL rules (e.g. ``mirror`` and ``mirrors``
are mutually exclusive, a port number ≤ 4294967295) dropped; the subtrees driftloop does not
render (``tls``, ``tcp``, ``match``, ``fault``, ``corsPolicy``, ``retries``, ``redirect``,
``directResponse``, ``delegate``) cut to their type. A node that lists ``properties`` lists all
of the CRD's properties there, so an unknown key is an error; a node with only a type is checked
for its type. The deprecated ``mirror_percent``/``mirrorPercent`` (an integer) are listed so an
older manifest is not refused; driftloop writes ``mirrorPercentage.value`` (a double, 0–100).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ISTIO_CRD_SCHEMAS", "VIRTUAL_SERVICE"]

VIRTUAL_SERVICE = "networking.istio.io/v1/VirtualService"

_PORT: dict[str, Any] = {"type": "object", "properties": {"number": {"type": "integer"}}}

# Destination: where a route (or a mirror) sends requests
_DESTINATION: dict[str, Any] = {
    "type": "object",
    "required": ["host"],
    "properties": {"host": {"type": "string"}, "port": _PORT, "subset": {"type": "string"}},
}

_HEADER_OPERATIONS: dict[str, Any] = {
    "type": "object",
    "properties": {"add": {"type": "object"}, "remove": {"type": "array", "items": {"type": "string"}},
                   "set": {"type": "object"}},
}

_HEADERS: dict[str, Any] = {
    "type": "object",
    "properties": {"request": _HEADER_OPERATIONS, "response": _HEADER_OPERATIONS},
}

_PERCENT: dict[str, Any] = {"type": "object", "properties": {"value": {"type": "number"}}}

_HTTP_ROUTE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "corsPolicy": {"type": "object"},
        "delegate": {"type": "object"},
        "directResponse": {"type": "object"},
        "fault": {"type": "object"},
        "headers": _HEADERS,
        "match": {"type": "array", "items": {"type": "object"}},
        "mirror": _DESTINATION,
        "mirrorPercent": {"type": "integer"},
        "mirrorPercentage": _PERCENT,
        "mirror_percent": {"type": "integer"},
        "mirrors": {"type": "array", "items": {
            "type": "object", "required": ["destination"],
            "properties": {"destination": _DESTINATION, "percentage": _PERCENT}}},
        "name": {"type": "string"},
        "redirect": {"type": "object"},
        "retries": {"type": "object"},
        "rewrite": {"type": "object", "properties": {"authority": {"type": "string"}, "uri": {"type": "string"},
                                                     "uriRegexRewrite": {"type": "object"}}},
        "route": {"type": "array", "items": {
            "type": "object", "required": ["destination"],
            "properties": {"destination": _DESTINATION, "headers": _HEADERS, "weight": {"type": "integer"}}}},
        "timeout": {"type": "string"},
    },
}

ISTIO_CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    VIRTUAL_SERVICE: {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": {
            "type": "object",
            "properties": {
                "exportTo": {"type": "array", "items": {"type": "string"}},
                "gateways": {"type": "array", "items": {"type": "string"}},
                "hosts": {"type": "array", "items": {"type": "string"}},
                "http": {"type": "array", "items": _HTTP_ROUTE},
                "tcp": {"type": "array", "items": {"type": "object"}},
                "tls": {"type": "array", "items": {"type": "object"}},
            },
        }},
    },
}

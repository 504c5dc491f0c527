"""Compact schemas of the Kueue and Kubeflow Profile custom resources that tenants use.

The infra check validates custom resources against compact schemas (see
:mod:`driftloop.app.infra_crds` for the Prometheus Operator ones and the format); these cover
what ``driftloop tenant add`` renders: Kueue's ``ResourceFlavor``, ``ClusterQueue`` and
``LocalQueue`` and Kubeflow's ``Profile``.

Where they came from — and how: neither project publishes its CRDs on PyPI and no copy was
at hand on the development machine, so these were TRANSCRIBED BY HAND, not downloaded,
from the upstream CRD files as they stood at these versions:

* Kueue v0.9 (github.com/kubernetes-sigs/kueue), ``config/components/crd/bases/``
  ``kueue.x-k8s.io_resourceflavors.yaml``, ``kueue.x-k8s.io_clusterqueues.yaml`` and
  ``kueue.x-k8s.io_localqueues.yaml``, version ``v1beta1``. Fields that later releases added
  (``admissionScope``, ``fairSharing`` on a LocalQueue, ``topologyName``) are listed too, so a
  newer cluster's manifests are not refused; the ``Cohort`` kind (v1alpha1) is not used: a
  cohort is the shared name in ``ClusterQueue.spec.cohort``.
* Kubeflow Profile ``kubeflow.org/v1`` from
  ``components/profile-controller/config/crd/bases/kubeflow.org_profiles.yaml`` of
  kubeflow/kubeflow v1.9 (the controller moved to kubeflow/dashboard in 1.10 with the same
  schema).

Each ``openAPIV3Schema`` was reduced as in ``infra_crds``: ``type``, ``required``, ``enum``,
``properties`` and ``items`` only; descriptions, patterns and CEL rules dropped; subtrees that
driftloop does not render cut to their type. A node that lists ``properties`` lists all of the
CRD's properties there, so an unknown key is an error; a node with only a type is checked for
its type. Quantities (``nominalQuota``, ``borrowingLimit``) are ``int-or-string`` as in the CRD.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TENANT_CRD_SCHEMAS", "CLUSTER_SCOPED_KINDS"]

_LABEL_SELECTOR: dict[str, Any] = {
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object"},
        "matchExpressions": {
            "type": "array",
            "items": {"type": "object", "required": ["key", "operator"],
                      "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                                     "values": {"type": "array"}}},
        },
    },
}

_RESOURCE_QUOTA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "nominalQuota"],
    "properties": {
        "name": {"type": "string"},
        "nominalQuota": {"type": "int-or-string"},
        "borrowingLimit": {"type": "int-or-string"},
        "lendingLimit": {"type": "int-or-string"},
    },
}

_CLUSTER_QUEUE_SPEC: dict[str, Any] = {
    "type": "object",
    "properties": {
        "admissionChecks": {"type": "array"},
        "admissionChecksStrategy": {"type": "object"},
        "admissionScope": {"type": "object"},
        "cohort": {"type": "string"},
        "fairSharing": {"type": "object", "properties": {"weight": {"type": "int-or-string"}}},
        "flavorFungibility": {
            "type": "object",
            "properties": {
                "whenCanBorrow": {"type": "string", "enum": ["Borrow", "TryNextFlavor"]},
                "whenCanPreempt": {"type": "string", "enum": ["Preempt", "TryNextFlavor"]},
            },
        },
        "namespaceSelector": _LABEL_SELECTOR,
        "preemption": {
            "type": "object",
            "properties": {
                "borrowWithinCohort": {
                    "type": "object",
                    "properties": {"maxPriorityThreshold": {"type": "integer"},
                                   "policy": {"type": "string", "enum": ["Never", "LowerPriority"]}},
                },
                "reclaimWithinCohort": {"type": "string", "enum": ["Never", "LowerPriority", "Any"]},
                "withinClusterQueue": {"type": "string",
                                       "enum": ["Never", "LowerPriority", "LowerOrNewerEqualPriority"]},
            },
        },
        "queueingStrategy": {"type": "string", "enum": ["StrictFIFO", "BestEffortFIFO"]},
        "resourceGroups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["coveredResources", "flavors"],
                "properties": {
                    "coveredResources": {"type": "array", "items": {"type": "string"}},
                    "flavors": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "resources"],
                            "properties": {"name": {"type": "string"},
                                           "resources": {"type": "array", "items": _RESOURCE_QUOTA}},
                        },
                    },
                },
            },
        },
        "stopPolicy": {"type": "string", "enum": ["None", "Hold", "HoldAndDrain"]},
    },
}

TENANT_CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "kueue.x-k8s.io/v1beta1/ResourceFlavor": {
        "type": "object",
        "properties": {"spec": {
            "type": "object",
            "properties": {
                "nodeLabels": {"type": "object"},
                "nodeTaints": {"type": "array", "items": {
                    "type": "object", "required": ["effect", "key"],
                    "properties": {"effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                                   "key": {"type": "string"}, "timeAdded": {"type": "string"},
                                   "value": {"type": "string"}}}},
                "tolerations": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"effect": {"type": "string"}, "key": {"type": "string"},
                                   "operator": {"type": "string"}, "tolerationSeconds": {"type": "integer"},
                                   "value": {"type": "string"}}}},
                "topologyName": {"type": "string"},
            },
        }},
    },
    "kueue.x-k8s.io/v1beta1/ClusterQueue": {
        "type": "object",
        "properties": {"spec": _CLUSTER_QUEUE_SPEC},
    },
    "kueue.x-k8s.io/v1beta1/LocalQueue": {
        "type": "object",
        "properties": {"spec": {
            "type": "object",
            "properties": {
                "clusterQueue": {"type": "string"},
                "fairSharing": {"type": "object", "properties": {"weight": {"type": "int-or-string"}}},
                "stopPolicy": {"type": "string", "enum": ["None", "Hold", "HoldAndDrain"]},
            },
        }},
    },
    "kubeflow.org/v1/Profile": {
        "type": "object",
        "properties": {"spec": {
            "type": "object",
            "properties": {
                # an rbac.authorization.k8s.io/v1 Subject
                "owner": {"type": "object", "required": ["kind", "name"],
                          "properties": {"apiGroup": {"type": "string"}, "kind": {"type": "string"},
                                         "name": {"type": "string"}, "namespace": {"type": "string"}}},
                "plugins": {"type": "array", "items": {"type": "object"}},
                # a core/v1 ResourceQuotaSpec
                "resourceQuotaSpec": {"type": "object",
                                      "properties": {"hard": {"type": "object"}, "scopeSelector": {"type": "object"},
                                                     "scopes": {"type": "array", "items": {"type": "string"}}}},
            },
        }},
    },
}

# Kinds that have no namespace (the rest of what tenants render is namespaced).
CLUSTER_SCOPED_KINDS = frozenset({"Namespace", "Profile", "ClusterQueue", "ResourceFlavor"})

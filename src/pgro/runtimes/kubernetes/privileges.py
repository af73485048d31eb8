"""At start: does the operator hold permissions pgro never grants?

deploy/rbac.yaml binds pgro's own ClusterRole (`pgro-operator`) to the ServiceAccount the
reference operator used too, `postgres-restore-operator`. Applying deploy/ over a reference
install therefore leaves the reference's ClusterRole (also `postgres-restore-operator`)
bound to it: every verb on Secrets, Deployments, Namespaces, `pods/portforward`, ... The
operator cannot read ClusterRoleBindings (nor should it), so it asks the API server what
it may do itself (a SelfSubjectAccessReview, which every authenticated account may create)
for a few permissions the reference granted and neither deploy/ nor deploy/canopy/ does.
Any of them allowed is one warning naming the fix (docs/migrating-from-the-reference.md).
"""

from __future__ import annotations

import logging
from typing import Final

from lightkube.models.authorization_v1 import ResourceAttributes, SelfSubjectAccessReviewSpec
from lightkube.resources.authorization_v1 import SelfSubjectAccessReview

from pgro.kube.client import KubeApi

log = logging.getLogger("pgro.operator")

REFERENCE_CLUSTER_ROLE: Final = "postgres-restore-operator"

# (verb, API group, resource[/subresource]), cluster-wide: in the reference's ClusterRole,
# never in pgro's (tests/unit/test_deploy_manifests.py pins pgro's verbs).
NEVER_GRANTED: Final = (
    ("update", "", "secrets"),
    ("delete", "apps", "deployments"),
    ("create", "", "pods/portforward"),
)


def _describe(verb: str, group: str, resource: str) -> str:
    return f"{verb} {resource}" + (f" ({group})" if group else "")


def excess_permissions(api: KubeApi) -> list[str]:
    """Which of NEVER_GRANTED this account holds, cluster-wide."""
    held = []
    for verb, group, resource in NEVER_GRANTED:
        name, _, sub = resource.partition("/")
        review = SelfSubjectAccessReview(
            spec=SelfSubjectAccessReviewSpec(
                resourceAttributes=ResourceAttributes(
                    verb=verb, group=group, resource=name, subresource=sub or None
                )
            )
        )
        answer = api.client.create(review)
        if answer.status is not None and answer.status.allowed:
            held.append(_describe(verb, group, resource))
    return held


def warn_about_excess_permissions(api: KubeApi) -> list[str]:
    """Log one warning when the operator holds permissions pgro never needs; returns them.
    Best effort: an API error is one info line, and start-up carries on."""
    try:
        held = excess_permissions(api)
    except Exception as exc:
        log.info("could not review the operator's own permissions: %s", exc)
        return []
    if held:
        log.warning(
            "this ServiceAccount may %s cluster-wide, which pgro never needs: the reference "
            "operator's ClusterRole is probably still bound to it. Remove it with "
            "`kubectl delete clusterrolebinding %s` and `kubectl delete clusterrole %s` "
            "(docs/migrating-from-the-reference.md, step 4)",
            ", ".join(held),
            REFERENCE_CLUSTER_ROLE,
            REFERENCE_CLUSTER_ROLE,
        )
    return held

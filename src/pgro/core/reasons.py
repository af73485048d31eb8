"""Condition types, condition reasons and event reasons: wire strings people alert on.

The reference's strings are kept; the ones pgro adds are marked.
"""

from __future__ import annotations

from typing import Final

# Condition types on the replica.
KOPIA_SECRET_VALID: Final = "KopiaSecretValid"  # noqa: S105 (a wire name, not a password)
SNAPSHOT_AVAILABLE: Final = "SnapshotAvailable"
RESTORE_CREATION_BLOCKED: Final = "RestoreCreationBlocked"
RESTORE_SCHEDULING_SUSPENDED: Final = "RestoreSchedulingSuspended"
# pgro: whether `spec.schedule` can be evaluated (the reference only logged a warning).
SCHEDULE_VALID: Final = "ScheduleValid"
# pgro: whether the spec can be acted on as written: False for a byte size that is not a
# quantity (no restore is sized from it) or a field pgro does not build (overlayDatabase).
SPEC_VALID: Final = "SpecValid"
# pgro: the last restore attempt failed. Written in the same patch as the failure
# counter, it names the restore counted, so a retried failure path never counts twice.
LAST_RESTORE_FAILED: Final = "LastRestoreFailed"

# KopiaSecretValid reasons.
SECRET_VALID: Final = "SecretValid"  # noqa: S105 (a wire name, not a password)
CANOPY_SOURCED: Final = "CanopySourced"
# pgro: canopy refused the replica's credentials (403) or its group is not ready (409).
CANOPY_CREDENTIALS_REFUSED: Final = "CanopyCredentialsRefused"
# pgro: the runtime has not obtained the replica's canopy credentials yet.
CANOPY_CREDENTIALS_PENDING: Final = "CanopyCredentialsPending"
# pgro: a canopy replica on a runtime started without canopy (no --canopy-url or
# CANOPY_BASE_URL).
CANOPY_NOT_CONFIGURED: Final = "CanopyNotConfigured"
SECRET_NOT_FOUND: Final = "SecretNotFound"  # noqa: S105 (a wire name, not a password)
SECRET_INVALID: Final = "SecretInvalid"  # noqa: S105 (a wire name, not a password)
# pgro: the runtime could not check the Secret yet.
SECRET_NOT_CHECKED: Final = "SecretNotChecked"  # noqa: S105 (a wire name, not a password)

# SnapshotAvailable reasons.
SNAPSHOT_FOUND: Final = "SnapshotFound"
NO_MATCHING_SNAPSHOTS: Final = "NoMatchingSnapshots"
CANOPY_DESIRED_SNAPSHOT_MISSING: Final = "CanopyDesiredSnapshotMissing"
PARSE_ERROR: Final = "ParseError"
# pgro: the listing itself failed (the reference's `JobFailed`; there is no Job here).
LISTING_FAILED: Final = "ListingFailed"

# RestoreCreationBlocked reasons.
TOO_MANY_RESTORES: Final = "TooManyRestores"
HEALTHY: Final = "Healthy"
# pgro: the reference returned a reconcile error without a condition.
STORAGE_LIMIT_EXCEEDED: Final = "StorageLimitExceeded"

# RestoreSchedulingSuspended reasons (legacy condition, only ever cleared).
SUSPENSION_REMOVED: Final = "SuspensionRemoved"
RESTORE_SUCCEEDED: Final = "RestoreSucceeded"

# ScheduleValid reasons.
VALID_SCHEDULE: Final = "ValidSchedule"
INVALID_SCHEDULE: Final = "InvalidSchedule"

# SpecValid reasons.
VALID_SPEC: Final = "ValidSpec"
INVALID_QUANTITY: Final = "InvalidQuantity"
OVERLAY_DATABASE_UNSUPPORTED: Final = "OverlayDatabaseUnsupported"

# LastRestoreFailed reasons.
RESTORE_FAILED: Final = "RestoreFailed"

# Event reasons.
EVENT_RESTORE_STARTED: Final = "RestoreStarted"
EVENT_RESTORE_CREATION_BLOCKED: Final = "RestoreCreationBlocked"
EVENT_RESTORE_COMPLETED: Final = "RestoreCompleted"
EVENT_RESTORE_FAILED: Final = "RestoreFailed"
# pgro: a verify replica's restore was torn down after verification.
EVENT_RESTORE_VERIFIED: Final = "RestoreVerified"
# pgro: canopy refused a verification report for good (400, 404); it is dropped.
EVENT_VERIFICATION_REPORT_REJECTED: Final = "VerificationReportRejected"

"""DIMSE status codes used by grok-pacs, by name (PS3.4 Annex B.2.3, PS3.7 Annex C), never bare hex.

Shared by the listener (what it answers) and the SCU (how it reads a peer's answer).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class DimseStatus(IntEnum):
    """The status codes grok-pacs answers or reads, by name; members are ints (pynetdicom takes them)."""

    SUCCESS = 0x0000
    # Warnings (the instance was stored).
    WARNING_COERCION_OF_DATA_ELEMENTS = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
    # Failures.
    REFUSED_OUT_OF_RESOURCES = 0xA700  # A7xx: the peer may retry later
    ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # A9xx
    ERROR_CANNOT_UNDERSTAND = 0xC000  # Cxxx
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_CLASS = 0x0118
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    # grok-pacs' own failure codes inside the Cxxx range (cannot understand), one per reason, for logs.
    ERROR_INVALID_UID = 0xC001
    ERROR_INCOMPLETE_DATASET = 0xC002
    ERROR_UID_MISMATCH = 0xC003
    # A dataset over a listener cap (max_inflated_mb, max_sequence_depth). Cxxx, not A7xx: "out of resources"
    # would tell the sender to retry the same instance, which would exceed the cap again.
    ERROR_DATASET_LIMIT = 0xC004


class StatusCategory(StrEnum):
    SUCCESS = "success"
    WARNING = "warning"
    TRANSIENT = "transient"  # try again later (out of resources, processing failure)
    PERMANENT = "permanent"  # the same request will fail again


def category(status: int) -> StatusCategory:
    """How a C-STORE response status should be treated by a sender."""
    if status == DimseStatus.SUCCESS:
        return StatusCategory.SUCCESS
    if (status & 0xF000) == 0xB000:
        return StatusCategory.WARNING
    if (status & 0xFF00) == 0xA700 or status == DimseStatus.PROCESSING_FAILURE:
        return StatusCategory.TRANSIENT
    return StatusCategory.PERMANENT


def status_name(status: int) -> str:
    """A readable name for a status code (for logs and the CLI); a code we do not name, by its range."""
    if status in DimseStatus._value2member_map_:
        return DimseStatus(status).name
    if (status & 0xFF00) == 0xA700:
        return DimseStatus.REFUSED_OUT_OF_RESOURCES.name
    if (status & 0xF000) == 0xC000:
        return DimseStatus.ERROR_CANNOT_UNDERSTAND.name
    if (status & 0xFF00) == 0xA900:
        return DimseStatus.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS.name
    return f"STATUS_0x{status:04X}"

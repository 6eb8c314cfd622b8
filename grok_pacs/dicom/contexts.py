"""Presentation contexts: which SOP classes and transfer syntaxes the listener accepts (docs/domain.md,
DICOM objects and Library facts).

pynetdicom's `StoragePresentationContexts` offer only uncompressed and deflated syntaxes, so a fundus
camera's JPEG or an OCT's JPEG 2000 would be refused; here every accepted SOP class is offered with
every transfer syntax ophthalmic devices send. The listener stores the bytes as received and never
decodes pixels, so accepting a syntax costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom import uid
from pynetdicom.presentation import PresentationContext, build_context

VERIFICATION = "1.2.840.10008.1.1"

#: Transfer syntaxes accepted for storage, uncompressed first (preferred when a peer proposes several
#: syntaxes in one context; the peer's compressed bytes are kept as they are).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.JPEG2000MCLossless,
    uid.JPEG2000MC,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
)

#: Transfer syntaxes for Verification (C-ECHO carries no dataset).
VERIFICATION_SYNTAXES: tuple[str, ...] = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)


def storage_contexts(sop_classes: Iterable[str]) -> list[PresentationContext]:
    """One SCP presentation context per SOP class, each with all of `TRANSFER_SYNTAXES`."""
    return [build_context(sop_class, list(TRANSFER_SYNTAXES)) for sop_class in dict.fromkeys(sop_classes)]


def verification_context() -> PresentationContext:
    return build_context(VERIFICATION, list(VERIFICATION_SYNTAXES))


def scp_contexts(sop_classes: Iterable[str]) -> list[PresentationContext]:
    """Everything the listener supports: Verification plus the storage classes. Nothing else."""
    return [verification_context(), *storage_contexts(sop_classes)]


def requested_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """SCU contexts for (SOP class, transfer syntax) pairs from files to send.

    Each file's own syntax is proposed; uncompressed files also offer the other uncompressed syntax so
    a peer that accepts only one of them still takes the file. Raises ValueError above 128 contexts
    (the DICOM limit per association).
    """
    uncompressed = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)
    wanted: dict[str, dict[str, None]] = {}
    for sop_class, syntax in pairs:
        key = f"{sop_class}|{syntax}"
        syntaxes = [syntax, *(ts for ts in uncompressed if syntax in uncompressed and ts != syntax)]
        wanted.setdefault(key, {}).update(dict.fromkeys(syntaxes))
    contexts = [build_context(key.split("|")[0], list(syntaxes)) for key, syntaxes in wanted.items()]
    if len(contexts) > 128:
        raise ValueError(f"{len(contexts)} SOP class / transfer syntax combinations exceed 128 contexts")
    return contexts

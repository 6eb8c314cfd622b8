"""The storage SOP class UIDs grok-pacs receives (docs/domain.md, DICOM objects; DICOM PS3.4 Annex B.5).

Imports nothing: `grok_pacs.config` reads its defaults from here (the classes the listener offers).
"""

from __future__ import annotations

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image: a CFP
OP_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"  # Ophthalmic Photography 16 Bit Image: a CFP
OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image: an OCT volume
OCT_EN_FACE = "1.2.840.10008.5.1.4.1.1.77.1.5.7"
OCT_BSCAN_VOLUME_ANALYSIS = "1.2.840.10008.5.1.4.1.1.77.1.5.8"
THICKNESS_MAP = "1.2.840.10008.5.1.4.1.1.81.1"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: Offered by default (setting `sop_classes`).
DEFAULT_SOP_CLASSES = (OP_8BIT, OP_16BIT, OPT, OCT_EN_FACE, OCT_BSCAN_VOLUME_ANALYSIS, THICKNESS_MAP)
#: Photography in older classes, taken as a CFP only with `accept_legacy_photography`.
LEGACY_SOP_CLASSES = (VL_PHOTOGRAPHIC, SECONDARY_CAPTURE)

"""The segmentation label set (clinical spec section 0), shared by every part of ``ai``.

Labels are exclusive: one integer per pixel. The DICOM codes for each label live in
``node/encode/codes.py``; here we keep only what the analysis needs.
"""

from __future__ import annotations

from enum import IntEnum


class Label(IntEnum):
    """Segmentation classes, values as in the clinical spec (0 = background)."""

    BACKGROUND = 0
    VERTEBRAL_BODY = 1
    DISC = 2
    POSTERIOR_ELEMENTS = 3
    DURAL_SAC = 4
    EPIDURAL_SPACE = 5
    PSOAS_LEFT = 6
    PSOAS_RIGHT = 7
    ERECTOR_SPINAE_LEFT = 8
    ERECTOR_SPINAE_RIGHT = 9
    MULTIFIDUS_LEFT = 10
    MULTIFIDUS_RIGHT = 11
    SUBCUTANEOUS_FAT = 12


NUM_CLASSES = len(Label)

#: Structure key (as used in results.json) -> the labels whose union it is.
STRUCTURES: dict[str, tuple[Label, ...]] = {
    "vertebral_body": (Label.VERTEBRAL_BODY,),
    "disc": (Label.DISC,),
    "posterior_elements": (Label.POSTERIOR_ELEMENTS,),
    "dural_sac": (Label.DURAL_SAC,),
    "spinal_canal": (Label.DURAL_SAC, Label.EPIDURAL_SPACE),
    "psoas_left": (Label.PSOAS_LEFT,),
    "psoas_right": (Label.PSOAS_RIGHT,),
    "erector_spinae_left": (Label.ERECTOR_SPINAE_LEFT,),
    "erector_spinae_right": (Label.ERECTOR_SPINAE_RIGHT,),
    "multifidus_left": (Label.MULTIFIDUS_LEFT,),
    "multifidus_right": (Label.MULTIFIDUS_RIGHT,),
    "subcutaneous_fat": (Label.SUBCUTANEOUS_FAT,),
}

#: Muscles get FCSA, fat fraction and signal intensity on top of CSA.
MUSCLES: tuple[str, ...] = (
    "psoas_left",
    "psoas_right",
    "erector_spinae_left",
    "erector_spinae_right",
    "multifidus_left",
    "multifidus_right",
)

#: Left/right pairs for asymmetry and laterality checks: pair name -> (left, right).
PAIRS: dict[str, tuple[str, str]] = {
    "psoas": ("psoas_left", "psoas_right"),
    "erector_spinae": ("erector_spinae_left", "erector_spinae_right"),
    "multifidus": ("multifidus_left", "multifidus_right"),
}

def _mirrored() -> tuple[int, ...]:
    muscles = ("PSOAS", "ERECTOR_SPINAE", "MULTIFIDUS")
    swap = {int(Label[f"{m}_LEFT"]): int(Label[f"{m}_RIGHT"]) for m in muscles}
    swap.update({right: left for left, right in swap.items()})
    return tuple(swap.get(int(lab), int(lab)) for lab in Label)


#: ``MIRRORED[label]``: the label the same pixel carries once the image is mirrored left to
#: right (a left muscle becomes the right one; midline structures keep theirs). Used by the
#: mirroring augmentation and the mirrored second opinion at inference.
MIRRORED: tuple[int, ...] = _mirrored()

#: Human-readable names, as viewers show them (segment labels).
DISPLAY_NAMES: dict[Label, str] = {
    Label.VERTEBRAL_BODY: "Vertebral body",
    Label.DISC: "Intervertebral disc",
    Label.POSTERIOR_ELEMENTS: "Posterior elements",
    Label.DURAL_SAC: "Dural sac",
    Label.EPIDURAL_SPACE: "Epidural space",
    Label.PSOAS_LEFT: "Psoas major left",
    Label.PSOAS_RIGHT: "Psoas major right",
    Label.ERECTOR_SPINAE_LEFT: "Erector spinae left",
    Label.ERECTOR_SPINAE_RIGHT: "Erector spinae right",
    Label.MULTIFIDUS_LEFT: "Multifidus left",
    Label.MULTIFIDUS_RIGHT: "Multifidus right",
    Label.SUBCUTANEOUS_FAT: "Subcutaneous fat",
}

#: Display colours (RGB 0-255), distinct and stable across SEG, overlay and contact sheets.
COLORS: dict[Label, tuple[int, int, int]] = {
    Label.VERTEBRAL_BODY: (230, 230, 120),
    Label.DISC: (80, 160, 255),
    Label.POSTERIOR_ELEMENTS: (200, 170, 90),
    Label.DURAL_SAC: (255, 255, 0),
    Label.EPIDURAL_SPACE: (255, 150, 200),
    Label.PSOAS_LEFT: (255, 60, 60),
    Label.PSOAS_RIGHT: (200, 30, 30),
    Label.ERECTOR_SPINAE_LEFT: (60, 220, 60),
    Label.ERECTOR_SPINAE_RIGHT: (20, 150, 20),
    Label.MULTIFIDUS_LEFT: (0, 230, 230),
    Label.MULTIFIDUS_RIGHT: (0, 150, 170),
    Label.SUBCUTANEOUS_FAT: (255, 160, 40),
}

#: Disc level names, caudal last. Position 1 in results is the most caudal level found.
LEVEL_NAMES: tuple[str, ...] = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")

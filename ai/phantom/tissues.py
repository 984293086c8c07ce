"""Fine tissue classes of the phantom and how they collapse to segmentation labels.

The phantom draws a *tissue* map with more classes than :class:`ai.labels.Label` (annulus and
nucleus, cortex and marrow, CSF and rootlets, intramuscular fat...) so that image synthesis can
give each tissue its own intensity; :data:`TISSUE_TO_LABEL` then collapses it to the exclusive
label map the networks learn.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from ai.labels import Label


class Tissue(IntEnum):
    """Fine tissue classes (values index the lookup tables below)."""

    AIR = 0
    SKIN = 1
    SUBCUT_FAT = 2  # anterior / lateral subcutaneous fat (background label)
    SUBCUT_FAT_POST = 3  # posterior subcutaneous fat (label 12)
    FASCIA = 4
    MUSCLE_OTHER = 5  # abdominal wall, quadratus lumborum, iliacus, gluteal
    VISCERAL_FAT = 6  # retroperitoneal and intra-abdominal fat
    BOWEL = 7
    BOWEL_GAS = 8
    ARTERY = 9
    VEIN = 10
    KIDNEY = 11
    VB_MARROW = 12
    VB_CORTEX = 13
    ANNULUS = 14
    NUCLEUS = 15
    PE_MARROW = 16
    PE_CORTEX = 17
    LIG_FLAVUM = 18
    FACET_FLUID = 19
    EPIDURAL_FAT = 20
    EPIDURAL_VEIN = 21
    NERVE_ROOT = 22  # traversing roots in the lateral recess (epidural space)
    CSF = 23
    ROOTLET = 24
    CORD = 25
    SAC_COMPRESSED = 26  # sac without CSF, rootlets not recognisable (Schizas C/D)
    ILIAC_MARROW = 27
    ILIAC_CORTEX = 28
    PSOAS_L = 29
    PSOAS_L_FAT = 30
    PSOAS_R = 31
    PSOAS_R_FAT = 32
    ES_L = 33
    ES_L_FAT = 34
    ES_R = 35
    ES_R_FAT = 36
    MF_L = 37
    MF_L_FAT = 38
    MF_R = 39
    MF_R_FAT = 40
    FORAMEN_FAT = 41
    EXITING_ROOT = 42
    INTERMUSC_FAT = 43
    BASIVERTEBRAL_VEIN = 44


NUM_TISSUES = len(Tissue)

#: muscle structure key -> (lean tissue, fat tissue, label)
MUSCLE_TISSUES: dict[str, tuple[Tissue, Tissue, Label]] = {
    "psoas_left": (Tissue.PSOAS_L, Tissue.PSOAS_L_FAT, Label.PSOAS_LEFT),
    "psoas_right": (Tissue.PSOAS_R, Tissue.PSOAS_R_FAT, Label.PSOAS_RIGHT),
    "erector_spinae_left": (Tissue.ES_L, Tissue.ES_L_FAT, Label.ERECTOR_SPINAE_LEFT),
    "erector_spinae_right": (Tissue.ES_R, Tissue.ES_R_FAT, Label.ERECTOR_SPINAE_RIGHT),
    "multifidus_left": (Tissue.MF_L, Tissue.MF_L_FAT, Label.MULTIFIDUS_LEFT),
    "multifidus_right": (Tissue.MF_R, Tissue.MF_R_FAT, Label.MULTIFIDUS_RIGHT),
}

_LABEL_OF: dict[Tissue, Label] = {
    Tissue.SUBCUT_FAT_POST: Label.SUBCUTANEOUS_FAT,
    Tissue.VB_MARROW: Label.VERTEBRAL_BODY,
    Tissue.VB_CORTEX: Label.VERTEBRAL_BODY,
    Tissue.BASIVERTEBRAL_VEIN: Label.VERTEBRAL_BODY,
    Tissue.ANNULUS: Label.DISC,
    Tissue.NUCLEUS: Label.DISC,
    Tissue.PE_MARROW: Label.POSTERIOR_ELEMENTS,
    Tissue.PE_CORTEX: Label.POSTERIOR_ELEMENTS,
    Tissue.LIG_FLAVUM: Label.POSTERIOR_ELEMENTS,
    Tissue.FACET_FLUID: Label.POSTERIOR_ELEMENTS,
    Tissue.EPIDURAL_FAT: Label.EPIDURAL_SPACE,
    Tissue.EPIDURAL_VEIN: Label.EPIDURAL_SPACE,
    Tissue.NERVE_ROOT: Label.EPIDURAL_SPACE,
    Tissue.CSF: Label.DURAL_SAC,
    Tissue.ROOTLET: Label.DURAL_SAC,
    Tissue.CORD: Label.DURAL_SAC,
    Tissue.SAC_COMPRESSED: Label.DURAL_SAC,
}
for _lean, _fat, _label in MUSCLE_TISSUES.values():
    _LABEL_OF[_lean] = _label
    _LABEL_OF[_fat] = _label

#: tissue value -> label value (uint8 lookup table).
TISSUE_TO_LABEL: np.ndarray = np.zeros(NUM_TISSUES, dtype=np.uint8)
for _tissue, _lab in _LABEL_OF.items():
    TISSUE_TO_LABEL[int(_tissue)] = int(_lab)

#: Relative T2 (FSE) signal of each tissue, 0..1: fat > CSF > nucleus > muscle.
T2_SIGNAL: np.ndarray = np.zeros(NUM_TISSUES, dtype=np.float32)
for _tissue, _value in {
    Tissue.AIR: 0.0,
    Tissue.SKIN: 0.45,
    Tissue.SUBCUT_FAT: 0.9,
    Tissue.SUBCUT_FAT_POST: 0.9,
    Tissue.FASCIA: 0.1,
    Tissue.MUSCLE_OTHER: 0.2,
    Tissue.VISCERAL_FAT: 0.82,
    Tissue.BOWEL: 0.42,
    Tissue.BOWEL_GAS: 0.03,
    Tissue.ARTERY: 0.05,
    Tissue.VEIN: 0.2,
    Tissue.KIDNEY: 0.55,
    Tissue.VB_MARROW: 0.5,
    Tissue.VB_CORTEX: 0.07,
    Tissue.ANNULUS: 0.17,
    Tissue.NUCLEUS: 0.78,
    Tissue.PE_MARROW: 0.45,
    Tissue.PE_CORTEX: 0.07,
    Tissue.LIG_FLAVUM: 0.16,
    Tissue.FACET_FLUID: 0.7,
    Tissue.EPIDURAL_FAT: 0.85,
    Tissue.EPIDURAL_VEIN: 0.6,
    Tissue.NERVE_ROOT: 0.28,
    Tissue.CSF: 1.0,
    Tissue.ROOTLET: 0.3,
    Tissue.CORD: 0.38,
    Tissue.SAC_COMPRESSED: 0.4,
    Tissue.ILIAC_MARROW: 0.5,
    Tissue.ILIAC_CORTEX: 0.07,
    Tissue.FORAMEN_FAT: 0.85,
    Tissue.EXITING_ROOT: 0.3,
    Tissue.INTERMUSC_FAT: 0.85,
    Tissue.BASIVERTEBRAL_VEIN: 0.75,
}.items():
    T2_SIGNAL[int(_tissue)] = _value
for _lean, _fat, _label in MUSCLE_TISSUES.values():
    T2_SIGNAL[int(_lean)] = 0.2
    T2_SIGNAL[int(_fat)] = 0.82

#: Relative texture (multiplicative, smooth) amplitude per tissue in the realistic mode.
T2_TEXTURE: np.ndarray = np.full(NUM_TISSUES, 0.05, dtype=np.float32)
T2_TEXTURE[int(Tissue.BOWEL)] = 0.35
T2_TEXTURE[int(Tissue.VB_MARROW)] = 0.12
T2_TEXTURE[int(Tissue.PE_MARROW)] = 0.12
T2_TEXTURE[int(Tissue.VEIN)] = 0.6
T2_TEXTURE[int(Tissue.KIDNEY)] = 0.15
T2_TEXTURE[int(Tissue.AIR)] = 0.0

"""Every coded concept the encoders write (clinical spec section 0 and 4).

Standard codes are taken from ``pydicom.sr.codedict.codes`` where pydicom (DICOM PS3.16
2024c) knows them; the unit test ``test_encode_codes`` checks each of those against
pydicom's dictionary. Codes pydicom does not carry (vertebral body, multifidus, iliopsoas)
come from the sources named in the clinical spec. Concepts with no standard code use the
private coding scheme :data:`PRIVATE_SCHEME` (``99LUMBAR``), documented in
``docs/dicom-outputs.md``.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ai.labels import Label

#: Private coding scheme designator for concepts with no standard code.
PRIVATE_SCHEME = "99LUMBAR"
#: Version of the private scheme's value set; bump when a value changes meaning.
PRIVATE_SCHEME_VERSION = "1"


def private(value: str, meaning: str) -> Code:
    """A concept of the private ``99LUMBAR`` scheme."""
    return Code(value, PRIVATE_SCHEME, meaning)


# --- Segmented property categories ------------------------------------------------------
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # SCT 91723000
TISSUE = codes.SCT.Tissue  # SCT 85756007

# --- Laterality ---------------------------------------------------------------------------
LEFT = codes.SCT.Left  # SCT 7771000
RIGHT = codes.SCT.Right  # SCT 24028007

# --- Segmented property types (by label) ----------------------------------------------------
VERTEBRAL_BODY = Code("3572006", "SCT", "Vertebral body")  # TotalSegmentator mapping
DISC_GENERIC = private("DISC", "Intervertebral disc, level not named")
POSTERIOR_ELEMENTS = private("POSTELEM", "Posterior vertebral elements (lamina, facets, spinous)")
DURAL_SAC = codes.SCT.SpinalCerebrospinalFluidPathway  # SCT 280401006, label text "Dural sac"
EPIDURAL_SPACE = private("EPIDURAL", "Epidural space within the vertebral canal")
VERTEBRAL_CANAL = codes.SCT.VertebralCanal  # SCT 61853006
ILIOPSOAS = Code("68455001", "SCT", "Iliopsoas muscle")  # TotalSegmentator, SegDB
ERECTOR_SPINAE = codes.SCT.ErectorSpinaeMuscle  # SCT 44947003
MULTIFIDUS = Code("5709001", "SCT", "Multifidus muscles")  # FHIR SNOMED body-site value set
SUBCUTANEOUS_FAT = codes.SCT.SubcutaneousTissueStructure  # SCT 71966008 (category Tissue)

#: Level name (ai.labels.LEVEL_NAMES) -> level-specific disc code (CID 7604).
DISC_BY_LEVEL: dict[str, Code] = {
    "L1-L2": Code("80064006", "SCT", "L1/L2 disc"),
    "L2-L3": Code("67459009", "SCT", "L2/L3 disc"),
    "L3-L4": Code("62551000", "SCT", "L3/L4 disc"),
    "L4-L5": Code("84020006", "SCT", "L4/L5 disc"),
    "L5-S1": Code("715056000", "SCT", "Structure of intervertebral disc of L5 and S1"),
}

#: Level name -> "Level of Lx/Ly intervertebral disc" (finding site in the SR).
LEVEL_SITE: dict[str, Code] = {
    "L1-L2": Code("243920003", "SCT", "Level of L1/L2 intervertebral disc"),
    "L2-L3": Code("243921004", "SCT", "Level of L2/L3 intervertebral disc"),
    "L3-L4": Code("243922006", "SCT", "Level of L3/L4 intervertebral disc"),
    "L4-L5": Code("243923001", "SCT", "Level of L4/L5 intervertebral disc"),
    "L5-S1": Code("243927000", "SCT", "Level of L5/S1 intervertebral disc"),
}
#: Finding site when the level could not be named with confidence.
LUMBAR_SPINE = Code("122496007", "SCT", "Lumbar spine")

#: label -> (category, property type, laterality modifier or None).
LABEL_CODES: dict[Label, tuple[Code, Code, Code | None]] = {
    Label.VERTEBRAL_BODY: (ANATOMICAL_STRUCTURE, VERTEBRAL_BODY, None),
    Label.DISC: (ANATOMICAL_STRUCTURE, DISC_GENERIC, None),
    Label.POSTERIOR_ELEMENTS: (ANATOMICAL_STRUCTURE, POSTERIOR_ELEMENTS, None),
    Label.DURAL_SAC: (ANATOMICAL_STRUCTURE, DURAL_SAC, None),
    Label.EPIDURAL_SPACE: (ANATOMICAL_STRUCTURE, EPIDURAL_SPACE, None),
    Label.PSOAS_LEFT: (ANATOMICAL_STRUCTURE, ILIOPSOAS, LEFT),
    Label.PSOAS_RIGHT: (ANATOMICAL_STRUCTURE, ILIOPSOAS, RIGHT),
    Label.ERECTOR_SPINAE_LEFT: (ANATOMICAL_STRUCTURE, ERECTOR_SPINAE, LEFT),
    Label.ERECTOR_SPINAE_RIGHT: (ANATOMICAL_STRUCTURE, ERECTOR_SPINAE, RIGHT),
    Label.MULTIFIDUS_LEFT: (ANATOMICAL_STRUCTURE, MULTIFIDUS, LEFT),
    Label.MULTIFIDUS_RIGHT: (ANATOMICAL_STRUCTURE, MULTIFIDUS, RIGHT),
    Label.SUBCUTANEOUS_FAT: (TISSUE, SUBCUTANEOUS_FAT, None),
}

# --- Algorithm identification (TID 4019) ----------------------------------------------------
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence  # DCM 123110

# --- TID 1500 -----------------------------------------------------------------------------
#: CID 100 has no lumbar-spine MR procedure; "MRI unspecified body region" is the verified fit.
PROCEDURE_REPORTED = codes.LN.MRIUnspecifiedBodyRegion  # LN 25056-3
AREA = codes.SCT.Area  # SCT 42798000
FAT_FRACTION = codes.DCM.FatFraction  # DCM 129100
T2_SIGNAL = codes.DCM.T2WeightedMRSignalIntensity  # DCM 110805
MEAN = Code("373098007", "SCT", "Mean")  # CID 7464 derivation
FCSA = private("FCSA", "Functional (lean muscle) cross-sectional area")
SI_RATIO_TO_FAT = private("SIRATIO", "Signal intensity ratio to subcutaneous fat")
OUTLINE_CONTRAST = private("OUTLINECON", "Outline contrast to the surroundings (KS distance)")
CANAL_AREA = private("CANALCSA", "Spinal canal area (dural sac and epidural space)")
DSCA = private("DSCA", "Dural sac cross-sectional area")
LEVEL_CONFIDENCE = private("LEVELCONF", "Level naming confidence")
GRADE_CONFIDENCE = private("GRADECONF", "Stenosis grading confidence")
ROOTLETS_PROBABILITY = private("ROOTPROB", "Probability of rootlets (cauda equina)")
#: TID 1500 row 12: the report's own qualitative evaluations (the DCMR concept name).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: TID 1500 row 14 (TEXT): one plausibility warning of the analysis (``results.json`` flags).
PLAUSIBILITY_WARNING = private("PLAUSWARN", "Plausibility warning of the analysis")
#: AI segmentation, averaged over the level's disc slices; FCSA by Otsu threshold in the ROI
#: (bounded by the subcutaneous fat intensity), fat fraction = (CSA - FCSA) / CSA.
MEASUREMENT_METHOD = private("SEGMEAN", "AI segmentation, disc-slice mean, Otsu fat threshold")
ASYMMETRY: dict[str, Code] = {
    "psoas": private("ASYM-PSOAS", "Psoas FCSA asymmetry"),
    "erector_spinae": private("ASYM-ES", "Erector spinae FCSA asymmetry"),
    "multifidus": private("ASYM-MF", "Multifidus FCSA asymmetry"),
}

# Qualitative evaluations
SEVERITY = Code("246112005", "SCT", "Severity")
SEVERITY_VALUES: dict[str, Code] = {
    "normal/mild": codes.SCT.Mild,  # SCT 255604002 (CID 3832)
    "moderate": Code("6736007", "SCT", "Moderate"),
    "severe": Code("24484000", "SCT", "Severe"),
}
NORMAL = codes.SCT.Normal  # SCT 17621005, used when Schizas A and DSCA normal
SCHIZAS_GRADE = private("SCHIZAS", "Schizas grade of central canal stenosis")
SCHIZAS_VALUES: dict[str, Code] = {
    "A": private("SCHIZAS-A", "Schizas A: no or minor stenosis"),
    "B": private("SCHIZAS-B", "Schizas B: moderate stenosis"),
    "C": private("SCHIZAS-C", "Schizas C: severe stenosis"),
    "D": private("SCHIZAS-D", "Schizas D: extreme stenosis"),
}
DSCA_GRADE = private("DSCAGRADE", "Dural sac area grade (heuristic)")
DSCA_VALUES: dict[str, Code] = {
    "normal": private("DSCA-N", "DSCA >= 100 mm2: normal or mild"),
    "relative": private("DSCA-R", "DSCA 75-100 mm2: relative stenosis"),
    "absolute": private("DSCA-A", "DSCA < 75 mm2: absolute stenosis"),
}
CANAL_CONTENT = private("CANALCONT", "Content of the dural sac at the level")
CANAL_CONTENT_VALUES: dict[str, Code] = {
    "rootlets": private("ROOTLETS", "Rootlets (cauda equina)"),
    "cord": private("CORD", "Spinal cord or conus medullaris"),
}
KJAER_GRADE = private("KJAER", "Kjaer fat infiltration grade")
KJAER_VALUES: dict[int, Code] = {
    0: private("KJAER-0", "Kjaer 0: fat below 10 %"),
    1: private("KJAER-1", "Kjaer 1: fat 10-50 %"),
    2: private("KJAER-2", "Kjaer 2: fat above 50 %"),
}

# Units (UCUM)
UNIT_MM2 = Code("mm2", "UCUM", "square millimeter")
UNIT_PERCENT = Code("%", "UCUM", "percent")
UNIT_ONE = Code("1", "UCUM", "no units")
UNIT_ARBITRARY = Code("[arb'U]", "UCUM", "arbitrary unit")
UNIT_RATIO = Code("{ratio}", "UCUM", "ratio")

#: Structure key (results.json) -> the label whose segment a measurement group refers to.
STRUCTURE_LABEL: dict[str, Label] = {
    "vertebral_body": Label.VERTEBRAL_BODY,
    "disc": Label.DISC,
    "posterior_elements": Label.POSTERIOR_ELEMENTS,
    "dural_sac": Label.DURAL_SAC,
    "psoas_left": Label.PSOAS_LEFT,
    "psoas_right": Label.PSOAS_RIGHT,
    "erector_spinae_left": Label.ERECTOR_SPINAE_LEFT,
    "erector_spinae_right": Label.ERECTOR_SPINAE_RIGHT,
    "multifidus_left": Label.MULTIFIDUS_LEFT,
    "multifidus_right": Label.MULTIFIDUS_RIGHT,
    "subcutaneous_fat": Label.SUBCUTANEOUS_FAT,
}


def disc_code(level: str | None) -> Code:
    """The disc property type for a level name, generic when the level is not named."""
    if level is None:
        return DISC_GENERIC
    return DISC_BY_LEVEL.get(level, DISC_GENERIC)


def level_site(level: str | None) -> Code:
    """Finding site for a level: its standard level code, else the lumbar spine."""
    if level is None:
        return LUMBAR_SPINE
    return LEVEL_SITE.get(level, LUMBAR_SPINE)


def all_private_codes() -> list[Code]:
    """Every ``99LUMBAR`` concept (for the documentation and its test)."""
    found: list[Code] = []
    for value in globals().values():
        items = value.values() if isinstance(value, dict) else [value]
        for item in items:
            if isinstance(item, Code) and item.scheme_designator == PRIVATE_SCHEME:
                if item not in found:
                    found.append(item)
    return found

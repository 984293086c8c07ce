"""Synthetic axial lumbar MR slices with exact ground truth (label maps first, images second).

Public API::

    subject = sample_subject(rng, stenosis="random", levels=("L3-L4", "L4-L5", "L5-S1"))
    s = render_slice(subject, "L4-L5", kind="disc", mode="realistic", rng=rng)
    s.image, s.labels, s.pixel_spacing, s.truth, s.rootlet_mask, s.canal_centre_px

See ``docs/phantom.md`` for the anatomy, the Schizas construction and the truth keys.
"""

from ai.phantom.anatomy import DEFAULT_LEVELS, Ellipse, LevelAnatomy, Subject, sample_subject
from ai.phantom.pathology import SCHIZAS, STENOSIS_CHOICES, StenosisParams
from ai.phantom.render import KINDS, MODES, PhantomSlice, dsca_grade, render_slice, structure_areas
from ai.phantom.tissues import TISSUE_TO_LABEL, Tissue

__all__ = [
    "DEFAULT_LEVELS",
    "KINDS",
    "MODES",
    "SCHIZAS",
    "STENOSIS_CHOICES",
    "TISSUE_TO_LABEL",
    "Ellipse",
    "LevelAnatomy",
    "PhantomSlice",
    "StenosisParams",
    "Subject",
    "Tissue",
    "dsca_grade",
    "render_slice",
    "sample_subject",
    "structure_areas",
]

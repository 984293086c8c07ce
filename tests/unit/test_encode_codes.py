"""Every standard code the encoders write matches pydicom's PS3.16 dictionary."""

from __future__ import annotations

from pydicom.sr._concepts_dict import concepts
from pydicom.sr.coding import Code

from ai.labels import LEVEL_NAMES, Label
from node.encode import codes

#: Standard codes that pydicom does not carry, with the source named in clinical-spec.md.
# UMLS C0034375 "Qualitative Evaluations" is TID 1500 row 12's concept name (DCMTK's
# CODE_UMLS_QualitativeEvaluations) but not in pydicom's concept dictionary.
NOT_IN_PYDICOM = {"3572006", "68455001", "5709001", "C0034375"}


def _all_codes() -> list[Code]:
    out: list[Code] = []
    for value in vars(codes).values():
        items = value.values() if isinstance(value, dict) else [value]
        for item in items:
            if isinstance(item, Code):
                out.append(item)
            elif isinstance(item, tuple):
                out.extend(x for x in item if isinstance(x, Code))
    return out


def test_standard_codes_exist_in_pydicom() -> None:
    index = {(scheme, code) for scheme, d in concepts.items() for entry in d.values() for code in entry}
    for code in _all_codes():
        if code.scheme_designator in (codes.PRIVATE_SCHEME, "UCUM") or code.value in NOT_IN_PYDICOM:
            continue
        assert (code.scheme_designator, code.value) in index, code


def test_meanings_fit_and_private_values_are_unique() -> None:
    for code in _all_codes():
        assert 0 < len(code.meaning) <= 64, code
        assert len(code.value) <= 16, code
    private = codes.all_private_codes()
    assert len({c.value for c in private}) == len(private)
    assert {c.scheme_designator for c in private} == {"99LUMBAR"}


def test_every_label_and_level_is_coded() -> None:
    assert set(codes.LABEL_CODES) == set(Label) - {Label.BACKGROUND}
    assert set(codes.DISC_BY_LEVEL) == set(LEVEL_NAMES) == set(codes.LEVEL_SITE)
    assert codes.level_site(None) == codes.LUMBAR_SPINE
    assert codes.disc_code(None) == codes.DISC_GENERIC
    assert codes.LEVEL_SITE["L1-L2"].value == "243920003"
    assert codes.LEVEL_SITE["L2-L3"].value == "243921004"

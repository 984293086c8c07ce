"""Lumbar spine MR analysis: arrays in, masks, measurements and grades out.

This package knows numpy, torch and geometry. It never imports ``node`` and never
writes DICOM: the node turns DICOM into :class:`ai.volume.Volume` objects and turns
:class:`ai.results.SeriesResult` objects back into DICOM.
"""

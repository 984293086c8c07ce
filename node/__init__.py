"""lumbar-node: the DICOM side (receiving, storage, scheduling, encoding, export, CLI).

``node`` turns DICOM into :class:`ai.volume.Volume` objects for ``ai`` and turns
``ai`` result objects into DICOM. Data flows one way::

    C-STORE -> receiver -> spool (durable) -> series assembly -> routing -> jobs
            -> ai analysis -> encode (SEG, SR, overlay) -> outbox (durable) -> export
"""

__version__ = "0.1.0"

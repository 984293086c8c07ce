"""The node's error hierarchy: one root, subclasses only where a caller acts differently."""


class NodeError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration is invalid; the message names the offending key."""


class InvalidInstance(NodeError):
    """A received or read DICOM instance cannot be accepted (reason in the message)."""


class PeerUnavailable(NodeError):
    """A remote DICOM peer could not be reached or dropped the association."""


class InferenceFailed(NodeError):
    """The analysis of a series failed (reason in the message)."""


class OutOfResources(NodeError):
    """Local resources (disk space, limits) do not allow the operation now."""

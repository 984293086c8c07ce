"""The root of the errors ``ai`` raises about what it was given (weights, cards, data folders).

Why a root of its own: the command line reports these as one line naming the problem (as it
does the node's :class:`node.errors.NodeError`), while any other exception stays a traceback
because it is a bug. Importing this module costs nothing (no torch).
"""


class InputError(ValueError):
    """Weights, a model card or a data folder cannot be used (the message says why)."""

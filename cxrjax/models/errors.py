"""The error for a weights file or artifact that cannot be used as it is."""

from cxrjax.errors import InputError


class WeightsError(InputError):
    """Bad weights input: the message names the file and tensor and what is wrong."""

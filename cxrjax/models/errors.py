"""The error for a weights file or artifact that cannot be used as it is."""


class WeightsError(ValueError):
    """Bad weights input: the message names the file and tensor and what is wrong."""

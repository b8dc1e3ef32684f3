"""The one exception type streamfold raises for bad input."""


class StreamfoldError(Exception):
    """Bad input or an impossible request: the message is one line naming the file or tensor.

    The CLI prints it as ``streamfold: error: <message>`` and exits with status 2. The source
    checkpoint is never modified and no output is left behind when it is raised.
    """

"""The exception types streamfold raises: bad input, and "already a FlashNorm checkpoint"."""


class StreamfoldError(Exception):
    """Bad input or an impossible request: the message is one line naming the file or tensor.

    The CLI prints it as ``streamfold: error: <message>`` and exits with status 2. The source
    checkpoint is never modified and no output is left behind when it is raised.
    """


class AlreadyFlashNorm(StreamfoldError):
    """SRC is already a FlashNorm checkpoint and the request would change nothing; nothing was written.

    ``state`` is its :class:`streamfold.planning.detect.FlashNormState` (mode, version, how it was recognized,
    each foldable norm). The CLI prints the one-line message and exits with status 4
    (``EXIT_ALREADY_FLASHNORM``). A subclass of StreamfoldError, so code that treats any refusal as
    "no output" keeps working; catch it first to tell "already done" from bad input.
    """

    def __init__(self, message: str, state) -> None:
        super().__init__(message)
        self.state = state


EXIT_ALREADY_FLASHNORM = 4  # CLI exit status for AlreadyFlashNorm

"""The engine's one error type: its message is shown to the user as is, so it names the cause."""


class MergeError(Exception):
    pass

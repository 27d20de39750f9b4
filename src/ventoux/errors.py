"""The one error type users see: a sentence naming the culprit and the fix."""


class VentouxError(Exception):
    """A user-facing failure (bad file, bad tensor, bad parameter, prompt that cannot fit).

    The CLI prints str(error) on one line and exits non-zero; no traceback.
    """


class EngineError(VentouxError):
    """The engine failed while running this request (a failed step, or logits with no distribution in them)."""

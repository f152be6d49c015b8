class DsdmError(Exception):
    """A user-facing error: one line that names the fix."""

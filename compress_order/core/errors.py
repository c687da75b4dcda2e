"""Errors the command line reports as one line on stderr with exit code 2 (no traceback)."""


class UserError(Exception):
    """Bad input: a config value, a name, a path. The message names the problem and the valid choices."""


class InvariantError(RuntimeError):
    """A compression stage broke a constraint of an earlier stage (or its own). Always a bug, never a warning."""


def choices(valid) -> str:
    """Format a sorted list of valid choices for an error message."""
    return ", ".join(sorted(str(v) for v in valid))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, carrying what was finished (a KeyboardInterrupt, so nothing on the way catches it)."""


def brief(e: Exception, limit: int = 120) -> str:
    """An exception as a short clause for a one-line error."""
    text = " ".join(str(e).split())
    text = text.split(". ")[0].rstrip(".")  # libraries append advice that does not apply here
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__

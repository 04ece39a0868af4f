"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero;
Serve maps them to 4xx JSON responses."""


class DermaidError(Exception):
    """Bad input or a misfit the user can fix: the message names the file/row/key and the problem."""

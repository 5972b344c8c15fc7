"""The one error an action fails with on the client, shared by every agent module.

It lives on its own so that the modules that run commands (``processes``,
``supervisor``) and the ones that install packages (``installers``) can raise
the same error without importing each other; the agent turns it into the
``failed`` result the relay shows.
"""

from __future__ import annotations


class InstallError(Exception):
    """An action failed on this client; ``message`` is what the relay shows.

    ``exit_code`` is the installer's exit code when a command ran, else ``None``.
    """

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

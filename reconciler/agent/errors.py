"""The errors an action ends with on the client, shared by every agent module.

They live on their own so that the modules that run commands (``processes``,
``supervisor``) and the ones that install packages (``installers``) can raise
the same error without importing each other. The agent turns
:class:`InstallError` into the ``failed`` result the relay shows, and
:class:`ArtifactUnavailable` into ``notAttempted``: nothing ran, so the relay
sends the same attempt again later instead of using one up.
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


class ArtifactUnavailable(InstallError):
    """The artifact could not be downloaded from the relay (unreachable, HTTP error, cut connection): nothing ran."""

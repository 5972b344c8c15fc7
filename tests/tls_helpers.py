"""Throw-away certificate authorities and certificates for TLS tests: the demo's own :class:`CA`."""

from reconciler.commands.demo_pki import CA, Issued

__all__ = ["CA", "Issued"]

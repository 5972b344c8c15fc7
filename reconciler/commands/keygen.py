"""``reconciler keygen``: make the Ed25519 key pair HQ signs manifests with (README, "The chain of trust")."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reconciler.signing import write_key_pair


def main(args: argparse.Namespace) -> int:
    private = Path(args.out)
    try:
        public, kid = write_key_pair(private, force=args.force)
    except (OSError, ValueError) as e:
        print(f"reconciler keygen: {e}", file=sys.stderr)
        return 2
    print(f"private key: {private} (keep it on HQ only: reconciler hq --signing-key {private})")
    print(f"public key:  {public} (give it to every agent: reconciler agent --trust-key {public})")
    print(f"key id:      {kid}")
    return 0

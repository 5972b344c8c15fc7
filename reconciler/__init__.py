"""reconciler: GitOps software distribution for fleets behind a hierarchy of relays.

Git holds the desired state (package and job specs on ``main``); HQ accepts
valid commits, relays plan and serve their clients, agents install, and every
reconciler writes its status back to git on a ref of its own.
"""

__version__ = "0.1.0"

"""The trainer's two failure kinds, so the protocol layer never classifies errors by message.

    ValueError
     └── UserError     bad input from the client: shapes, ids, unknown loss, missing input,
          │            incompatible checkpoint; maps to {"error": …, "category": "user"}
          └── DiskFullError  a save hit a full disk: fixed by freeing space, not by a new trainer
    RuntimeError
     └── ServerError   an internal failure of the trainer; maps to {"category": "server"}

Messages name the offending field (and datum index or path) so a user can fix the request.
"""

from __future__ import annotations


class UserError(ValueError):
    """The request is invalid; the message names the field. The model state is unchanged."""


class ServerError(RuntimeError):
    """The trainer failed internally; the request itself may have been valid."""


class DiskFullError(UserError):
    """A save found the disk full. Reported with `category: "user"`: it is not a lost trainer,
    and a new trainer would fail the same way until someone frees space."""

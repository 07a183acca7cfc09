"""What one token may make the server keep, so memory follows configuration, not clients.

A token's share is the set of runs its run-name globs match (with no tokens configured,
every caller shares one), so usage is recounted from the runs themselves after a restart
and needs no owner column. Scopes that overlap (``shared-*`` on two tokens) count those
runs for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from raresignal.server.serving.validation import RequestError


@dataclass(frozen=True)
class Quotas:
    """Per-token limits; each field's name is its ``raresignal server`` setting."""

    max_runs_per_token: int = 1000  # runs kept, active and finished
    max_open_runs_per_token: int = 100  # runs active at once
    max_series_per_token: int = 40_000  # series across all of the token's runs
    max_senders_per_token: int = 100_000  # sender ids across all of the token's runs
    max_run_metadata_bytes: int = 64 * 1024  # UTF-8 bytes of a run's config and tags

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def setting_name(quota: str) -> str:
    """How an operator changes ``quota``: its flag and its environment variable."""
    return f"--{quota.replace('_', '-')} or RARESIGNAL_{quota.upper()}"


def exhausted(quota: str, limit: int, what: str) -> RequestError:
    """RESOURCE_EXHAUSTED naming the quota, its value and the setting that raises it."""
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{what}, beyond the quota {quota} of {limit} (an operator changes "
                        f"it with {setting_name(quota)})")


def metadata_bytes(config: dict[str, str], tags: dict[str, str]) -> int:
    """The bytes a run's config and tags take: every key and value, UTF-8 encoded."""
    return sum(len(key.encode()) + len(value.encode())
               for entries in (config, tags) for key, value in entries.items())

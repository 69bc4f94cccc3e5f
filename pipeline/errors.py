"""User-facing errors: one clear paragraph and an exit status, never a traceback.

A leaf: it imports nothing of the pipeline. pipeline/cli.py turns them into that paragraph and status."""

from __future__ import annotations

# EX_TEMPFAIL (sysexits.h): the job can go on as it is once the cause has passed (a lost peer, a shard
# server down); the Kubernetes Job's podFailurePolicy retries it, and fails fast on the codes of bugs.
EX_TEMPFAIL = 75


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, corrupt file).

    The message names the thing that is wrong and what to do about it.
    """

    exit_code = 1
    label = "error"
    # Raised alike on every rank of a multi-process run (a config error, an agreed decision): only the
    # main process prints it. An instance may say so too (pipeline/distributed/agreement.py).
    shared = False


class ConfigError(UserError):
    exit_code = 2
    shared = True


class DeviceError(ConfigError):
    """A config that this machine's devices cannot run: other machines of the job may differ."""

    shared = False


class DataError(UserError):
    exit_code = 1

"""One exception root for the project.

The split follows h11: a *local* error is something this process was asked to do that is
wrong (bad input from the operator, a model directory that does not verify); a *remote* error
is something a peer sent us that is wrong. The CLI turns any ``MeshError`` into a one-line
message and a non-zero exit, never a traceback.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error meshllm raises on purpose."""

    exit_code = 1


class UserError(MeshError):
    """Bad input from the person running a command (exit code 2)."""

    exit_code = 2


class ModelError(UserError):
    """A model directory is missing, corrupt, unverifiable or unsupported."""


class ConfigError(UserError):
    """A configuration or testbed file is malformed."""


class SamplingError(UserError):
    """Invalid sampling parameters."""


class ContextLengthError(UserError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""


class CapacityError(MeshError):
    """No room: KV slots or the KV byte budget are exhausted."""


class PlanError(MeshError):
    """A plan is invalid, or no plan can be made."""


class DoesNotFit(PlanError):
    """The model fits nowhere under the given devices and memory limits (Table IV's OOM)."""


class ProtocolError(MeshError):
    """Root of wire and control-plane protocol errors."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something malformed, oversized, unauthenticated or of an unknown type."""

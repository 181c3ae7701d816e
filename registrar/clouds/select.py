"""The backend a config names: `[cloud] type`, "eucalyptus" (the default) or "openstack"."""

from __future__ import annotations

from registrar.clouds import Backend
from registrar.config import Config, OpenStackConfig


def backend_for(config: Config, arch: str = "x86_64") -> Backend:
    """The cloud backend of a loaded config."""
    # Imported here: each backend pulls in its cloud SDK, which the other does not need.
    if isinstance(config.require_cloud(), OpenStackConfig):
        from registrar.clouds.openstack import OpenStack

        return OpenStack.from_config(config)
    from registrar.clouds.eucalyptus import Eucalyptus

    return Eucalyptus.from_config(config, arch)

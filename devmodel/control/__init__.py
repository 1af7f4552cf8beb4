"""The control interface: a JSON-lines protocol on a UNIX socket for a running model.

See :mod:`devmodel.control.protocol` for the wire format, :mod:`.server` for the
listening side (commands are registered by the layers that implement them) and
:mod:`.client` for the Python client the ``devmodel stats|trace|inject`` commands use.
"""

from devmodel.control.client import ControlClient, ControlError
from devmodel.control.protocol import Param
from devmodel.control.server import ControlServer

__all__ = ["ControlClient", "ControlError", "ControlServer", "Param"]

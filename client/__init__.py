"""The hq client that BitBake's runqueue embeds.

``create_client(address)`` returns a synchronous client with the method names, argument
order and return shapes of BitBake's ``hashserv`` client. It imports only the standard
library and pyzmq. Every call has a deadline; transport trouble (no broker, a silent one,
no workers, a garbled reply) raises ``ConnectionError``, which BitBake catches before falling
back to the taskhash. A refusal by the server (for example "Invalid unihash") raises
:class:`InvokeError`, as BitBake's client raises ``bb.asyncrpc.InvokeError``.
"""

from .client import DEFAULT_TIMEOUT_S, Client, InvokeError, ServerError, create_client

__all__ = ["Client", "InvokeError", "ServerError", "create_client", "DEFAULT_TIMEOUT_S"]

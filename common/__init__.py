"""metafleet.common: the meta-learning core shared by devices, the server and simulations.

Nothing here imports metafleet.client or metafleet.server; only `records` imports flwr.
"""

from metafleet.common.errors import ConfigError, DataError, MetafleetError

__all__ = ["ConfigError", "DataError", "MetafleetError"]

"""meshllm: serve one large language model across the heterogeneous devices of a LAN."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

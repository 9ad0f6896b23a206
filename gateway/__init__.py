"""gateway: an ASGI reverse proxy that puts JWT authentication in front of legacy web apps."""

__version__ = "0.1.0"

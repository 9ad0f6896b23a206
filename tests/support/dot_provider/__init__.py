"""A real OAuth 2.0 / OpenID provider built from django-oauth-toolkit, for the opaque-token tests.

Its access tokens are opaque (random strings in its database), its refresh tokens rotate with reuse
protection, and it publishes RFC 7662 introspection, OIDC discovery, JWKS and userinfo under ``/o/``.
``python -m support.dot_provider --port P`` migrates a fresh sqlite database (``DOT_DIR``), registers the
gateway's client and a user, and serves the project under uvicorn. ``/_test/...`` lets the test expire
tokens, take the introspection endpoint down and read what the token endpoint was asked.
"""

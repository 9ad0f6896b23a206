"""``python -m gateway.demo.idp --port N``: serve the demo IdP under uvicorn (``--help`` lists the flags)."""

from __future__ import annotations

import argparse

from gateway.demo.idp.app import create_idp_app
from gateway.demo.idp.settings import IdPSettings


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.idp", description="A rotating demo IdP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--algorithm", choices=["HS256", "RS256"], default="HS256")
    parser.add_argument("--secret", help="HS256 shared secret")
    parser.add_argument("--access-ttl", type=int, default=300)
    parser.add_argument("--issuer", help="default: http://HOST:PORT, so OIDC discovery URLs resolve")
    parser.add_argument("--audience", default=IdPSettings.audience, help='"" for tokens without aud')
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to sleep before answering refreshes")
    parser.add_argument("--public-key-out", metavar="PATH", help="write the RS256 public key (PEM) here")
    parser.add_argument(
        "--reuse-window", type=float, default=0.0, help="seconds the previous refresh token stays redeemable"
    )
    parser.add_argument(
        "--ignore-revoke-used", action="store_true", help="revoking an already used token leaves its family alone"
    )
    parser.add_argument(
        "--reuse-keeps-family", action="store_true", help="a reused token is refused without revoking its family"
    )
    parser.add_argument("--clock-skew", type=float, default=0.0, help="seconds added to iat/nbf/exp of issued tokens")
    parser.add_argument(
        "--redirect-uri", action="append", default=[], help="register an OIDC redirect URI (repeatable; none: loopback)"
    )
    parser.add_argument("--ssl-certfile", metavar="PATH", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", metavar="PATH", help="the certificate's private key (PEM)")
    return parser


def settings_from(args: argparse.Namespace) -> IdPSettings:
    """The settings the parsed flags ask for."""
    # OIDC Discovery §4.3: the issuer is the URL the provider is reached at.
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    host = f"[{host}]" if ":" in host else host
    return IdPSettings(
        issuer=args.issuer or f"{'https' if args.ssl_certfile else 'http'}://{host}:{args.port}",
        audience=args.audience or None,
        algorithm=args.algorithm,
        hs_secret=args.secret or IdPSettings.hs_secret,
        access_ttl=args.access_ttl,
        latency=args.latency,
        redirect_uris=args.redirect_uri,
        reuse_window=args.reuse_window,
        revoke_used=not args.ignore_revoke_used,
        reuse_revokes_family=not args.reuse_keeps_family,
        clock_skew=args.clock_skew,
    )


def main(argv: list[str] | None = None) -> None:
    """Serve the IdP under uvicorn: ``python -m gateway.demo.idp --port N``."""
    import uvicorn

    args = parser().parse_args(argv)
    settings = settings_from(args)
    if args.public_key_out:
        with open(args.public_key_out, "w") as f:
            f.write(settings.public_pem())
    # A short graceful shutdown: a "timeout" failure leaves requests sleeping for an hour. No proxy
    # headers: scope["client"] must be the real peer (redeem_then_reset finds the socket by it).
    uvicorn.run(
        create_idp_app(settings),
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=1,
        proxy_headers=False,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )


if __name__ == "__main__":
    main()

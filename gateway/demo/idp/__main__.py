"""``python -m gateway.demo.idp``: serve the demo IdP under uvicorn."""

from gateway.demo.idp.provider import main

if __name__ == "__main__":
    main()

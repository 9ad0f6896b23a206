"""A minimal Django project that trusts the gateway's identity headers, as docs/recipes.md#django says.

Run as ``python -m support.django_app --port N`` (with tests/ on ``PYTHONPATH`` and ``DJANGO_APP_DIR``
naming a directory for its sqlite database): it migrates, then serves its ASGI app under uvicorn.
tests/integration/test_django_browser.py puts it behind ``gateway serve``.
"""

"""ASGI entry point of mysite: Django for the site, the Ozwell API under /v1, and the lifespan protocol answered
(Django's handler rejects it), so the server starts the API before the first request and closes its pools at the end.

    cd examples/django_project
    export OZWELL_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')
    uvicorn mysite.asgi:application --lifespan on
"""

import os

from django.conf import settings
from django.core.asgi import get_asgi_application

from ozwell_asgi import OzwellAPI
from ozwell_asgi.django import asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django_app = get_asgi_application()  # sets Django up, so settings are readable from here on

ozwell = OzwellAPI(key_store=settings.OZWELL_STORE_URL, secret=settings.OZWELL_SECRET)
application = asgi_application(django_app, ozwell, prefix="/v1")

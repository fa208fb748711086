"""The site's own pages: plain Django views, next to the API that asgi.py mounts under /v1."""

from django.http import HttpRequest, JsonResponse


def home(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"site": "mysite", "framework": "django", "api": request.build_absolute_uri("/v1")})


async def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})

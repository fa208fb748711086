"""The site's URLs. /v1 is not here: asgi.py sends it to the Ozwell API before Django sees it."""

from django.urls import path

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("health", views.health, name="health"),
]

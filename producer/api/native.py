"""The native API under /v1: routes are added here."""

from fastapi import APIRouter

router = APIRouter()

"""A1111-compatible API under /sdapi/v1: routes are added here."""

from fastapi import APIRouter

router = APIRouter()

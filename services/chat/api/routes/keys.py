"""Model settings and the session's keys: read them, change them (a supplied key is checked first),
remove a key. A key is never echoed: only its hint."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

import providers
from schemas.events import ModelId, Provider
from services.chat.api.deps import Key, Settings, Who, Wired, keep_keys
from services.chat.key_session import KeyRing
from services.shared.edge import error_responses

router = APIRouter()


class SettingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: Provider
    # Also a URL path segment at Gemini: only the characters a model id has (DESIGN "Bounds of input").
    model: ModelId
    use_own_key: bool = False
    # Never echoed back, logged or stored; kept only sealed in the session cookie once checked.
    api_key: str | None = Field(default=None, max_length=1024, repr=False)
    # BYOK on and no usable key: run chat on platform credits (True) or refuse it (False, the default);
    # absent = keep the current choice.
    fallback_to_platform: bool | None = None


@router.get("/api/model-settings", responses=error_responses(401, 503))
async def model_settings(who: Who, ring: Key, w: Wired) -> dict[str, Any]:
    return (await w.service.view(who, ring)).as_dict()


@router.delete("/api/keys/{provider}", responses=error_responses(401, 422, 503))
async def remove_key(
    provider: Provider, who: Who, ring: Key, w: Wired, settings: Settings, response: Response
) -> dict[str, Any]:
    """Remove this session's key of `provider`: revoked on the server, gone from the cookie."""
    removed = await w.service.remove_key(who, provider)
    view = await w.service.view(who, {p: k for p, k in ring.items() if p is not provider})
    keep_keys(response, settings, w, who, {p: held.key for p, held in view.keys.items()})
    name = providers.of(provider).name
    message = (
        f"Your {name} key was removed from this session; a saved copy of it no longer works here."
        if removed
        else f"There was no {name} key in this session."
    )
    return {"removed": bool(removed), "message": message, "settings": view.as_dict()}


# 400 is the settings answer itself, with `accepted: false`: the key's check refused it.
@router.post(
    "/settings/model",
    responses={
        400: {
            "description": "The key was refused by its check; nothing changed",
            "content": {"application/json": {"schema": {"type": "object", "required": ["accepted", "message"]}}},
        },
        **error_responses(401, 409, 413, 422, 503),
    },
)
async def update_settings(
    body: SettingsIn, who: Who, ring: Key, w: Wired, settings: Settings, response: Response
) -> dict[str, Any]:
    change = await w.service.update_settings(
        who, ring, body.provider, body.model, body.use_own_key, body.api_key, body.fallback_to_platform
    )
    if change.discard_key:
        new_ring: KeyRing = {}
    elif change.keep_key is not None:
        new_ring = {**ring, change.keep_key.provider: change.keep_key}
    else:
        new_ring = ring
    if not change.accepted:
        response.status_code = 400
    view = await w.service.view(who, new_ring)
    if change.discard_key or change.keep_key is not None or len(view.keys) != len(ring):
        keep_keys(response, settings, w, who, {p: held.key for p, held in view.keys.items()})
    answer: dict[str, Any] = {
        "accepted": change.accepted,
        "message": change.message,
        "settings": view.as_dict(),
        "key_check": None,
    }
    if change.check is not None:
        check = change.check.model_dump(mode="json")
        # The check's own fields at the top level too (status, key_hint, ...); the message is the
        # change's, which also says when the earlier key stays in use.
        answer = {**check, **answer, "key_check": check, "message": change.message or change.check.message}
    return answer

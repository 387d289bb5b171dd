"""Why the chat service will not carry out a request, each with a sentence the user can act on and the
HTTP status the edge answers it with."""

from __future__ import annotations

from typing import Any


class ChatRefused(Exception):
    """A request the service will not carry out, with a sentence the user can act on."""

    code = "refused"
    status = 400

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message, self.details = message, details


class PaymentRequired(ChatRefused):
    """A platform call the balance cannot pay for, or a model with no platform price."""

    code = "payment_required"
    status = 402


class OwnKeyMissing(ChatRefused):
    code = "own_key_missing"
    status = 409


class PlatformKeyMissing(ChatRefused):
    code = "platform_key_missing"
    status = 503


class BalanceUnknown(ChatRefused):
    code = "credits_unavailable"
    status = 503


class ProviderFailed(ChatRefused):
    """The provider refused or failed the call; nothing is billed (the event says `failed`)."""

    code = "provider_error"
    status = 502


class SettingsChanged(ChatRefused):
    """The page showed another route for the call than the settings now give (changed in another tab,
    or by another client): nothing is asked or charged on a route the user was not shown."""

    code = "settings_changed"
    status = 409


class ModelNotFound(ChatRefused):
    code = "model_not_found"
    status = 404


class InvalidRequest(ChatRefused):
    code = "invalid_request"
    status = 422

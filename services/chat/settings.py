"""Settings of the chat service (environment variables, local defaults that make `make run` work)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from providers import PlatformKeySettings
from schemas.events import MODEL_ID_PATTERN, Feature, Provider
from services.shared.settings import CommonSettings, HttpSettings

FEATURE_MODEL_PATTERN = "^(" + "|".join(p.value for p in Provider) + "):" + MODEL_ID_PATTERN.strip("^$") + "$"


class ChatSettings(CommonSettings, HttpSettings, PlatformKeySettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)
    # Outside development none may keep its default (the platform keys' defaults are the simulator's
    # dummies: set the real key, or an empty value for a provider the platform does not offer).
    SECRETS: ClassVar[tuple[str, ...]] = (*CommonSettings.SECRETS, *HttpSettings.SECRETS, *PlatformKeySettings.SECRETS)

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, validation_alias=AliasChoices("chat_port", "http_port"))

    # Dev sign-in on the page (POST /auth/dev-login): only for local runs, the demo and tests
    # (env CHAT_DEV_LOGIN or DEV_LOGIN).
    dev_login: bool = Field(default=False, validation_alias=AliasChoices("chat_dev_login", "dev_login"))
    # Plan granted (idempotently) to a user on dev sign-in, so a fresh local user can chat at once;
    # empty = no grant.
    dev_login_grant_plan: str = "free"
    # A sign-in lasts `session_ttl_s`; its cookie's token only `session_token_ttl_s`, renewed by the
    # page (GET /api/me) once older than `session_renew_after_s`, so a copied token soon stops working
    # even where a sign-out could not reach it. Sign-outs are read from the database every
    # `session_refresh_s` (services/shared/sessions.py).
    session_ttl_s: int = 12 * 3600
    session_token_ttl_s: int = 1800
    session_renew_after_s: int = 300
    session_refresh_s: float = 1.0

    # Where the credit service answers balance queries and places admission holds.
    credits_url: str = "http://127.0.0.1:8001"
    credits_timeout_s: float = 5.0
    # AES-GCM secret of the key cookie; unset = derived from AUTH_JWT_SECRET (HKDF, own label).
    key_cookie_secret: str | None = Field(default=None, min_length=16)
    # How long a sealed key stays usable: the session, at most this long.
    key_ttl_s: int = 8 * 3600
    # Browsers treat http://localhost and 127.0.0.1 as secure contexts, so Secure cookies work locally.
    cookie_secure: bool = True

    # The platform's own keys (env OPENAI_API_KEY, ...) come from each provider module
    # (`PlatformKeySettings`): dummies the local simulator accepts by default, so `make run` works on a
    # fresh machine; production sets the real keys with the real base URLs.

    key_check_timeout_s: float = 15.0
    provider_timeout_s: float = 60.0
    # Key records (hints, never keys) are deleted this long after their key expired, checked this often.
    key_record_retention_s: float = 86_400.0
    key_record_purge_every_s: float = 3_600.0
    # Calls in flight to providers at once (real calls take seconds, so this caps calls per second).
    provider_max_connections: int = 256
    default_provider: Provider = Provider.OPENAI
    default_model: str = "gpt-4o-mini"
    # The platform's model for each always-platform feature, as "provider:model" (env DEEP_ANALYSIS_MODEL,
    # ...). These features never run on the model the user chose.
    deep_analysis_model: str = Field(default="openai:gpt-4.1", pattern=FEATURE_MODEL_PATTERN)
    code_fix_model: str = Field(default="openai:gpt-4.1-mini", pattern=FEATURE_MODEL_PATTERN)
    code_canvas_model: str = Field(default="openai:gpt-4.1-mini", pattern=FEATURE_MODEL_PATTERN)

    # Outbox relay.
    relay_batch: int = 500
    relay_idle_poll_s: float = 0.5
    # How long the relay waits, once woken, for more events to send with the first (a batch per round).
    # Every round costs the billing pipeline about the same whatever it carries (a relay transaction,
    # a Kafka produce, a fetch, a ledger transaction, an offset commit, an outcome relay round), so at
    # real rates the rounds, not the events, set its CPU: at 25 calls/s the credit service, Kafka and
    # PostgreSQL spent 6.6 ms per call with 50 ms and 3.6 ms with 250 ms; at 100 calls/s 2.4 and 1.4
    # (issue 22). A decision then lands within about a quarter of a second of the call's end; the page
    # reads the balance 0.8 s after an answer, and a running call's hold counts against it meanwhile.
    relay_linger_s: float = Field(default=0.25, ge=0, le=5)
    db_pool_size: int = 10

    def feature_models(self) -> dict[Feature, tuple[Provider, str]]:
        """Where the always-platform features run: (provider, model) for each."""
        chosen = {
            Feature.DEEP_ANALYSIS: self.deep_analysis_model,
            Feature.CODE_FIX: self.code_fix_model,
            Feature.CODE_CANVAS: self.code_canvas_model,
        }
        return {f: (Provider(v.split(":", 1)[0]), v.split(":", 1)[1]) for f, v in chosen.items()}

    outbox_stale_margin_s: float = 30.0
    # The call lifecycle (DESIGN "The call lifecycle"): a call runs at most `call_max_s`; this
    # instance's lease lasts `lease_s` and is renewed every `lease_renew_s`; a call's answer is kept
    # `answer_kept_s` for retries, its billing `call_kept_s`; at shutdown running calls get
    # `shutdown_grace_s` to end.
    call_max_s: float = 600.0
    lease_s: float = 30.0
    lease_renew_s: float = 5.0
    answer_kept_s: float = 900.0
    call_kept_s: float = 86_400.0
    call_purge_every_s: float = 60.0
    shutdown_grace_s: float = 10.0
    provider_connect_timeout_s: float = 10.0
    # A stream that sends nothing for this long has stalled: the call ends as a timeout (never billed).
    stream_idle_timeout_s: float = 120.0

    @property
    def outbox_stale_after_s(self) -> float:
        """A call row written before instances had leases (migration 0015), still in flight after this
        long, died with its process: its event is published as failed."""
        return self.provider_timeout_s + self.outbox_stale_margin_s

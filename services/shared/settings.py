"""Settings every service reads from the environment, with local defaults that make `make run` work."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import topics

DEFAULT_DATABASE_URL = "postgresql://byok:byok@127.0.0.1:55432/byok"


class Deployment(BaseSettings):
    """Where a service runs (env `BYOK_ENV`). Anything but local development must set every secret:
    `make run`/`make up`, docker-compose and the tests set `BYOK_ENV=development`."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")
    byok_env: Literal["development", "production"] = "production"


class DefaultSecret(SystemExit):
    """A service was started outside local development with a secret still at its default."""


def refuse_default_secrets(service: str, *checks: BaseSettings | tuple[BaseSettings, tuple[str, ...]]) -> None:
    """Stop a service that would run outside development on a secret published in the repository.

    Each settings class lists its secrets in `SECRETS` (field names), or a check names the fields
    itself as `(settings, names)`; a field still equal to its default is named by its environment
    variable in the refusal.
    """
    if Deployment().byok_env == "development":
        return
    left = []
    for check in checks:
        s, names = check if isinstance(check, tuple) else (check, getattr(check, "SECRETS", ()))
        prefix = (s.model_config.get("env_prefix") or "").upper()
        for name in names:
            field = type(s).model_fields[name]
            if getattr(s, name) == field.get_default(call_default_factory=True):
                left.append(prefix + name.upper())
    if left:
        raise DefaultSecret(
            f"{service} refuses to start: {', '.join(left)} still {'has' if len(left) == 1 else 'have'} the "
            "default value published in the repository. Set " + (" and ".join(left)) + " to this deployment's "
            "own value (for local development only, set BYOK_ENV=development instead)."
        )


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore")
    # Secrets that must not keep their default outside development (see `refuse_default_secrets`).
    SECRETS: ClassVar[tuple[str, ...]] = ("database_url",)

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    # Prepended to every topic name; lets tests and parallel stacks share one broker.
    topic_prefix: str = ""
    database_url: str = DEFAULT_DATABASE_URL
    # PostgreSQL schema holding this deployment's tables (tests get one each); None = the default.
    database_schema: str | None = None
    log_level: str = "INFO"
    log_json: bool = False

    def topic(self, name: str) -> str:
        return self.topic_prefix + name

    @property
    def model_call_completed_topic(self) -> str:
        return self.topic(topics.MODEL_CALL_COMPLETED)

    @property
    def credit_ledger_topic(self) -> str:
        return self.topic(topics.CREDIT_LEDGER)

    @property
    def key_check_requests_topic(self) -> str:
        return self.topic(topics.KEY_CHECK_REQUESTS)

    @property
    def key_check_replies_topic(self) -> str:
        return self.topic(topics.KEY_CHECK_REPLIES)


class HttpSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")
    SECRETS: ClassVar[tuple[str, ...]] = ("auth_jwt_secret",)
    auth_jwt_secret: str = Field(default="dev-only-secret-change-me-32-bytes!!", min_length=16)
    # Bodies larger than this are refused (413) before authentication or parsing (env HTTP_MAX_BODY_BYTES).
    http_max_body_bytes: int = Field(default=64 * 1024, ge=1024)

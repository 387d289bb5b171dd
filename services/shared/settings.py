"""Settings every service reads from the environment, with local defaults that make `make run` work."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import topics

DEFAULT_DATABASE_URL = "postgresql://byok:byok@127.0.0.1:55432/byok"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore")

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
    auth_jwt_secret: str = Field(default="dev-only-secret-change-me-32-bytes!!", min_length=16)

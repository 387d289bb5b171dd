"""Key validation: immediate, helpful checks of a user's provider key over Kafka request/reply.

- The chat side asks through `services.chat.key_check_client.KeyCheckRequester` (seal, publish, await the
  reply, time out); the request headers are named there too, so neither service imports the other.
- `services.shared.sealing`: `KeySealer` / `KeyOpener` and `SealingSettings` (`KEY_SEAL_*` env), the
  sealed box that keeps keys out of Kafka's log in the clear; two key ids at once for rotation.
- The worker (`python -m services.validation`): `worker.ValidationWorker` (Kafka) -> `handler`
  (one record -> reply / dead letter) -> `service.KeyCheckService` (shape, HMAC-fingerprint cache,
  per-user limit) -> `checks.KeyChecker` (the provider's model list, through `services.shared.provider_http`).
  Wired in `bootstrap.build`; settings in `settings.ValidationSettings`.
"""

-- A provider is one module (issue 23): the chat's tables no longer restate the provider list. The
-- CHECKs of 0003 (chat_model_settings) and 0008 (chat_session_keys) named the four providers, so a
-- fifth needed a migration besides its module. What reaches these columns has passed the
-- `schemas.events.Provider` enum at the edge (the settings and key routes validate it); the database
-- keeps only a bound on the value's shape.
ALTER TABLE chat_model_settings DROP CONSTRAINT chat_model_settings_provider_check;
ALTER TABLE chat_model_settings
    ADD CONSTRAINT chat_model_settings_provider_shape CHECK (provider ~ '^[a-z][a-z0-9_]{0,39}$');

ALTER TABLE chat_session_keys DROP CONSTRAINT chat_session_keys_provider_check;
ALTER TABLE chat_session_keys
    ADD CONSTRAINT chat_session_keys_provider_shape CHECK (provider ~ '^[a-z][a-z0-9_]{0,39}$');

-- Sessions that end on the server (issue 21): a signed token stays valid until it expires, so signing
-- out must be recorded where every instance of every service can see it. A sign-out revokes its
-- session id; "sign out everywhere" refuses every token of the user issued before that moment.
-- Never a token: only its session id (random, not a secret on its own) and the user.
CREATE TABLE auth_revoked_sessions (
    session_id  text PRIMARY KEY CHECK (length(session_id) BETWEEN 1 AND 200),
    user_id     text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 200),
    revoked_at  timestamptz NOT NULL DEFAULT now(),
    -- Once every token of the session has expired the row says nothing more and may go.
    forget_after timestamptz NOT NULL
);
CREATE INDEX auth_revoked_sessions_revoked_at_idx ON auth_revoked_sessions (revoked_at);

CREATE TABLE auth_signed_out_everywhere (
    user_id     text PRIMARY KEY CHECK (length(user_id) BETWEEN 1 AND 200),
    not_before  timestamptz NOT NULL,  -- tokens issued before this are refused
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX auth_signed_out_everywhere_updated_at_idx ON auth_signed_out_everywhere (updated_at);

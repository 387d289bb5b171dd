"""One router per topic: the page and health, sign-in, settings and keys, account, calls, and the
OpenAI-compatible gateway."""

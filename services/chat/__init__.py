"""The chat service: identity, BYOK session keys, model calls with the right key, the settings page.

Its whole story lives here:
  settings.py    environment settings
  identity.py    who is calling (JWT from a bearer header or the session cookie)
  key_session.py the user's keys, one per provider, sealed for the session only (AES-GCM cookie)
  balances.py    the balance, asked of the credit service (adapter)
  usage.py       the usage history, read from the ledger through the credit service (adapter)
  outbox.py      ModelCallCompleted events: written with the call, relayed to Kafka
  store.py       per-user model settings and session-key records in PostgreSQL (never the key)
  service.py     the rules: where each feature runs (`route`), when a call is refused, what it is billed
  app.py         HTTP routes and the page (entry points: translate, call the service)
  catalog.py     the models the page offers, with their platform prices
  tokens.py      `byok-token`: a signed token for local use and tests
  bootstrap.py   the composition root (the model call itself is `providers.chat_completion`)
"""

"""Billing: the price lists, pricing, the credit policy and the credit errors.

One package that the chat service (what a call will cost), the credit service (what an event owes)
and finance (what the ledger should hold) all decide with, so they cannot disagree. It depends on
`schemas/` only and does no I/O; the import rule in pyproject.toml keeps it that way.
"""

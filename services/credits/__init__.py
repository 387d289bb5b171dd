"""Credit service: applies the credit policy to `model_call_completed` and keeps the ledger."""

"""Finance: replays `model_call_completed` and reconciles it against the credit ledger.

`python -m services.finance reconcile|repair|replay ...` (or the `byok-finance` console script).
The story of the folder: `settings.py` (environment), `window.py` and `differences.py` (the domain:
which events a period holds, what counts as a difference, what corrects it), `assessment.py` (one
Kafka record -> what the credit policy says it owes), `event_log.py` and `ledger.py` (the Kafka and
PostgreSQL adapters), `reconciliation.py` (the use cases), `report.py` and `cli.py` (the edge).
"""

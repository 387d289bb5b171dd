"""Plumbing shared by the services (settings, database, Kafka, logging). No business rules here."""

"""The append-only results store: one JSON line a record, locked and fsync'd, never rewritten."""

"""The read side: ordered consumers of the event log folded into SQLite read models."""

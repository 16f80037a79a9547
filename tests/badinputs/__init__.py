"""The bad-input corpus (issue 14)."""

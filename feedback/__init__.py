"""Feedback: round-trips candidate rankings through Argilla (issue 4)."""

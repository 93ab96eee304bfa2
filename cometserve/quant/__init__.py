"""Offline quantization (FMPQ). Nothing on the serving path imports this package."""

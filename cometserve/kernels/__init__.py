"""Device code and its pure-torch reference (ref.py). Imports nothing from the package but scheme.py."""

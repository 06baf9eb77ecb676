"""Scripts that answered settled questions, kept to re-run them (see README.md here)."""

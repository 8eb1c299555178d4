"""cliptagd: a folder-watching photo auto-tagging daemon (OpenCLIP, zero-shot, SQLite)."""

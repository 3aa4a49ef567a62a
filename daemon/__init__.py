"""The inbox daemon: intake (watchdog), the SQLite ledger and the worker (see README)."""

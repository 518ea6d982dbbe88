"""Replicated broker state: the Raft log (pysyncobj), RocksDB, and the apply step."""

"""Data plane: shard format, object storage, and the exact-epoch streaming reader."""

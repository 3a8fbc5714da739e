"""Data plane: shard format, media decoding (videos, frames + audio -> clips; shared by the
sharders and prediction), the AVQA question tokenizer, object storage, and the exact-epoch
streaming reader."""

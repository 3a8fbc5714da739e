"""Dataset -> WebDataset shard tools: musicavqa, ave, synth, validate."""

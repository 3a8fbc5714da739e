"""Task metrics that need a whole evaluation split: retrieval ranks and caption scores."""

"""Training data: image-caption folders, tar shards, the procedural toy world."""

"""The frozen text towers: CLIP and T5 in the Hugging Face layout, one encoder for both, the embedding cache."""

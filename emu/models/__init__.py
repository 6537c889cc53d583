"""The networks: shared layers, attention (and the fused kernel), the U-Net, the autoencoder, the perceptual loss, FLOP counts."""

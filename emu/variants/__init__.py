"""The other architectures: the Imagen-like pixel cascade, the Muse-like masked transformer, Kandinsky (prior, decoder, masks), and Stable Diffusion's published U-Net and VAE."""

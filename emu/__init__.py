"""emu: a readable reference implementation of the Emu text-to-image recipe.

Pipeline: autoencoder -> latent diffusion pretraining on a large "haystack" ->
quality-tuning on a few photogenic "needles" -> sampling -> pairwise A/B evaluation.
"""


class EmuError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint).

    Scripts catch it at the top and print its message as one line, so the message must name
    the file and the problem.
    """

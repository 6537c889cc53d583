"""emu: a readable reference implementation of the Emu text-to-image recipe.

Pipeline: autoencoder -> latent diffusion pretraining on a large "haystack" ->
quality-tuning on a few photogenic "needles" -> sampling -> pairwise A/B evaluation.

The package, grouped by the parts of the system; imports run one way, from the assembly down:

    checkpoint.py   atomic checkpoints, safetensors files
    models/         the networks: layers, attention (+ the fused kernel), U-Net, autoencoder, VQ tokenizer
    text/           the frozen text towers: CLIP, T5, the Hugging Face layout, the embedding cache
    datasets/       image-caption folders, tar shards, the toy world
    diffusion.py    the DDPM maths and samplers
    training/       the loop's parts, distributed training, FSDP
    curation/       the curation funnel: automatic filters, human stages
    evaluation/     judges, pairwise statistics, the rating study and page, metrics, charts
    variants/       the pixel cascade, the Muse-like model, Kandinsky, Stable Diffusion's published U-Net and VAE
    arch.py         what differs by --arch
    pipeline.py     first stage + text towers + model = text to image, from a checkpoint
"""


class EmuError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint).

    Scripts catch it at the top and print its message as one line, so the message must name
    the file and the problem.
    """

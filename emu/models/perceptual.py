"""LPIPS-style perceptual distance (Zhang et al., 2018), an optional term of the autoencoder loss.

Two images are passed through the convolutional part of VGG16; at the five ReLU outputs that end
its five stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) the features are normalised to unit
length along the channels, their squared difference is weighted per channel by a 1x1 "lin" layer,
averaged over space, and the five numbers are summed. An L1 loss alone is satisfied by a blurry
average; a distance in feature space also asks for the edges and textures to match.

Weights are never downloaded: `PerceptualLoss.from_file(path)` reads one local safetensors file
with these keys (and ignores any others, such as VGG's classifier):

    features.{i}.weight, features.{i}.bias   the 13 convolutions, numbered as in torchvision's
                                             vgg16().features: i in 0 2 5 7 10 12 14 17 19 21 24 26 28
    lin{k}.weight                            k = 0..4, shape (1, C_k, 1, 1), C = 64 128 256 512 512

To make one from the public weights: take torchvision's VGG16 state dict keys `features.*` as
they are, and rename LPIPS's `lin{k}.model.1.weight` to `lin{k}.weight`.
"""
import torch
import torch.nn as nn

from emu.checkpoint import load_state_dict_checked, load_weights

# VGG16's convolutional stack: output channels per 3x3 convolution, "M" for a 2x2 max-pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices (in the Sequential built from VGG16_LAYERS) of the ReLUs whose outputs are compared.
TAPS = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's input normalisation for images in [-1, 1]: maps them to the ImageNet statistics VGG expects.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class PerceptualLoss(nn.Module):
    """LPIPS distance between two batches of images; frozen (it is a loss, never trained)."""

    def __init__(self):
        super().__init__()
        layers, ch = [], 3
        for spec in VGG16_LAYERS:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(ch, spec, 3, padding=1), nn.ReLU()]
                ch = spec
        self.features = nn.Sequential(*layers)  # indices match torchvision's vgg16().features
        for k, c in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{k}", nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path):
        """Load the weights from a local safetensors file in the layout of the module docstring.

        Raises EmuError naming the file if it is missing or unreadable, or lacks a key, or a
        tensor has the wrong shape.
        """
        model = cls()
        state_dict = load_weights(path)
        own = model.state_dict()
        load_state_dict_checked(model, {k: v for k, v in state_dict.items() if k in own}, path)
        return model

    def vgg_features(self, x):
        """(B, 3, H, W) in [-1, 1] -> the five tapped ReLU outputs, (B, C_k, H / 2^k, W / 2^k)."""
        h = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                taps.append(h)
        return taps

    def forward(self, x, y):
        """:param x, y: (B, 3, H, W) images in [-1, 1]. :return: (B,) distances, 0 for identical images."""
        distance = torch.zeros(x.shape[0], device=x.device)
        for k, (fx, fy) in enumerate(zip(self.vgg_features(x), self.vgg_features(y))):
            fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
            fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            weighted = getattr(self, f"lin{k}")((fx - fy).pow(2))  # (B, 1, H_k, W_k)
            distance = distance + weighted.mean(dim=(1, 2, 3))
        return distance

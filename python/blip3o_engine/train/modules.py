"""Training-only networks of the demo recipe; neither ships in the checkpoint.

- `LatentEncoder`: the encoder half of the VAE. The checkpoint layout holds only the decoder (what
  inference runs); this small patch encoder is trained beside it to give the decoder its latents.
- `FeatureEncoder`: the stand-in for BLIP3-o's EVA-CLIP tower, whose features are the DiT's targets.
  A small ViT over 8×8-pixel patches whose 8×8 token grid is the released model's 64-token grid,
  trained with a CLIP-style objective against the captions and through the pixel decoder (so that
  its features carry what the decoder needs to redraw the image), then frozen for stage (c).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def images_to_tensor(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], the VAE's pixel range."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class LatentEncoder(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] -> diagonal Gaussian posterior over latents [B, C, H/f, W/f]."""

    def __init__(self, latent_channels: int, factor: int, width: int = 64) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, factor, stride=factor)  # one token per latent cell
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, 2 * latent_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(self.patch(x))
        h = h + F.silu(self.mix(h))
        mean, logvar = self.out(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class FeatureEncoder(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] -> CLIP-like features [B, grid², dim], row-major tokens.

    Patchify (one token per grid cell) + learned positions + pre-norm transformer layers, then a
    LayerNorm without affine, so every token has zero mean and unit variance: the scale the DiT's
    flow matching (noise ~ N(0, I)) expects of its targets. `embed_text` gives the caption side
    of the CLIP-style loss (one learned vector per caption).
    """

    def __init__(self, dim: int, grid: int = 8, image_size: int = 64, width: int = 96, layers: int = 2,
                 heads: int = 4, num_captions: int = 12) -> None:
        super().__init__()
        patch = image_size // grid
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(grid * grid, width) * 0.02)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers)])
        self.proj = nn.Linear(width, dim)
        self.captions = nn.Embedding(num_captions, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # [B, grid², width]
        for block in self.blocks:
            h = block(h)
        return F.layer_norm(self.proj(h), (self.proj.out_features,))  # [B, grid², dim]

    def clip_logits(self, feats: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
        """Cosine similarity of the mean-pooled features [B, dim] to every caption: [B, num_captions]."""
        pooled = F.normalize(feats.mean(dim=1), dim=-1)
        return pooled @ F.normalize(self.captions.weight, dim=-1).T / temperature

"""Stage (b), the pixel side: VAE, CLIP-feature encoder, and the diffusion decoder (UNet).

1. The VAE: the checkpoint's `AutoencoderKL` decoder with a small patch encoder beside it, trained to
   reconstruct images (L1 + L2, a light KL). Its latent scale gives `scaling_factor`.
2. The feature encoder (the stand-in for EVA-CLIP): a CLIP-style loss against the 12 captions makes
   its mean-pooled features name the shape, and a reconstruction loss (each token predicts the VAE
   latent of its cell through a linear head) makes its grid carry the picture. Then it is frozen.
3. The UNet: the epsilon loss of the checkpoint's EulerDiscrete schedule (scaled-linear betas, 1000
   train steps) on the VAE latents, conditioned as inference conditions it (the 64 features by
   cross-attention, their mean as SDXL's pooled "text_embeds", the size ids of the native size).
   10% of the conditions are dropped to the features of an empty picture: the decoder's CFG null at
   inference is the stage-1 features of " ", which stage (c) teaches to be exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EulerSchedulerConfig
from ..models.unet import UNet2DConditional, sdxl_time_ids
from ..models.vae import VAEDecoder
from ..sampling.euler_discrete import _train_sigmas
from . import shapes
from .common import EMA, LossLog, Optimizer, progress_bar
from .modules import FeatureEncoder, LatentEncoder, images_to_tensor

KL_WEIGHT = 1e-4  # light: the latent only has to stay smooth and bounded for the UNet
CONDITION_DROPOUT = 0.1
# Gaussian noise added to the features the UNet is conditioned on: the DiT's samples are never exact,
# and a decoder that only ever saw exact features would draw their errors.
FEATURE_NOISE = 0.2


def shape_batch(n: int, generator: torch.Generator) -> tuple[shapes.ShapeSpecs, torch.Tensor]:
    """n random shape images as VAE input [n, 3, 64, 64] in [-1, 1], with their specs."""
    specs = shapes.sample_specs(n, generator)
    return specs, images_to_tensor(shapes.render(specs))


def class_index(specs: shapes.ShapeSpecs) -> torch.Tensor:
    """Index of each image's caption in `shapes.all_classes()` (colours outer)."""
    return specs.colour * len(shapes.SHAPES) + specs.shape


# ------------------------------------------------------------------------------------------------
# 1. VAE


def train_vae(vae: VAEDecoder, encoder: LatentEncoder, steps: int, batch_size: int, lr: float,
              generator: torch.Generator, log: LossLog, progress: bool = True) -> float:
    """Train decoder + encoder as a KL autoencoder; returns the scaling_factor (1 / latent std)."""
    params = [*vae.parameters(), *encoder.parameters()]
    optimizer = Optimizer(params, lr, steps, clip_norm=1.0)
    with progress_bar(steps, "(b) VAE", progress) as bar:
        for step in range(steps):
            _, x = shape_batch(batch_size, generator)
            mean, logvar = encoder(x)  # [B, 4, 8, 8] each
            z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
            recon = vae(z)  # [B, 3, 64, 64]
            rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
            loss = rec + KL_WEIGHT * kl
            optimizer.step(loss)
            log.add("b_vae", step, reconstruction=rec.item(), kl=kl.item())
            bar.set_postfix(rec=f"{log.final('b_vae', 'reconstruction', 20):.4f}", refresh=False)
            bar.update(1)
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        _, x = shape_batch(512, generator)
        return 1.0 / encoder(x)[0].std().item()


# ------------------------------------------------------------------------------------------------
# 2. Feature encoder


def train_feature_encoder(encoder: FeatureEncoder, latent_encoder: LatentEncoder, scaling: float, steps: int,
                          batch_size: int, lr: float, generator: torch.Generator, log: LossLog,
                          progress: bool = True) -> None:
    """CLIP-style caption loss + latent reconstruction through a linear head (discarded after)."""
    latent_channels = latent_encoder.out.out_channels // 2
    head = nn.Linear(encoder.proj.out_features, latent_channels)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = Optimizer(params, lr, steps)
    with progress_bar(steps, "(b) CLIP-feature encoder", progress) as bar:
        for step in range(steps):
            specs, x = shape_batch(batch_size, generator)
            with torch.no_grad():
                target = latent_encoder(x)[0] * scaling  # [B, 4, 8, 8]
            feats = encoder(x)  # [B, 64, C]
            clip = F.cross_entropy(encoder.clip_logits(feats), class_index(specs))
            pred = head(feats).transpose(1, 2).reshape(target.shape)  # token n = cell (n // 8, n % 8)
            rec = (pred - target).pow(2).mean()
            loss = clip + rec
            optimizer.step(loss)
            log.add("b_encoder", step, clip=clip.item(), latent=rec.item())
            bar.set_postfix(clip=f"{log.final('b_encoder', 'clip', 20):.3f}",
                            latent=f"{log.final('b_encoder', 'latent', 20):.3f}", refresh=False)
            bar.update(1)
    for p in encoder.parameters():
        p.requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# The encoded data set stages (b3) and (c) train on


@dataclass
class EncodedShapes:
    """A fixed set of rendered shapes, encoded once by the frozen encoders."""

    latent_mean: torch.Tensor  # [N, 4, 8, 8], already times scaling_factor
    latent_std: torch.Tensor  # [N, 4, 8, 8], likewise
    features: torch.Tensor  # [N, 64, C] CLIP-like features (the DiT's targets)
    classes: torch.Tensor  # [N] index into shapes.all_classes()
    null_features: torch.Tensor  # [64, C] features of the empty picture

    def __len__(self) -> int:
        return self.classes.shape[0]


@torch.no_grad()
def encode_shapes(n: int, latent_encoder: LatentEncoder, feature_encoder: FeatureEncoder, scaling: float,
                  generator: torch.Generator, chunk: int = 512) -> EncodedShapes:
    means, stds, feats, classes = [], [], [], []
    for start in range(0, n, chunk):
        specs, x = shape_batch(min(chunk, n - start), generator)
        mean, logvar = latent_encoder(x)
        means.append(mean * scaling)
        stds.append((0.5 * logvar).exp() * scaling)
        feats.append(feature_encoder(x))
        classes.append(class_index(specs))
    null = feature_encoder(images_to_tensor(shapes.blank(1)))[0]
    return EncodedShapes(torch.cat(means), torch.cat(stds), torch.cat(feats), torch.cat(classes), null)


# ------------------------------------------------------------------------------------------------
# 3. UNet


def alphas_cumprod(cfg: EulerSchedulerConfig) -> torch.Tensor:
    """ᾱ_t [T] of the decoder's training schedule, from the very sigmas the sampler uses
    (σ_t² = (1 − ᾱ_t) / ᾱ_t), so training and the EulerDiscrete sampler share one schedule."""
    sigmas = torch.from_numpy(_train_sigmas(cfg)).double()
    return (1.0 / (1.0 + sigmas**2)).float()


def train_unet(unet: UNet2DConditional, data: EncodedShapes, scheduler: EulerSchedulerConfig, image_size: int,
               steps: int, batch_size: int, lr: float, ema_decay: float, generator: torch.Generator,
               log: LossLog, progress: bool = True) -> None:
    """Epsilon-prediction training; the UNet ends holding its EMA weights."""
    optimizer = Optimizer(unet.parameters(), lr, steps, clip_norm=1.0)
    ema = EMA(unet, ema_decay)
    ac = alphas_cumprod(scheduler)  # [T]
    time_ids = sdxl_time_ids(image_size, image_size, batch_size, torch.float32)  # [B, 6]
    unet.train()
    with progress_bar(steps, "(b) UNet decoder", progress) as bar:
        for step in range(steps):
            idx = torch.randint(len(data), (batch_size,), generator=generator)
            latents = data.latent_mean[idx] + data.latent_std[idx] * torch.randn(data.latent_std[idx].shape,
                                                                                 generator=generator)
            cond = data.features[idx]  # [B, 64, C]
            drop = torch.rand(batch_size, generator=generator) < CONDITION_DROPOUT
            cond = torch.where(drop[:, None, None], data.null_features.expand_as(cond), cond)
            cond = cond + FEATURE_NOISE * torch.randn(cond.shape, generator=generator)
            t = torch.randint(scheduler.num_train_timesteps, (batch_size,), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            a = ac[t][:, None, None, None]
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            eps = unet(noisy, t.float(), cond, cond.mean(dim=1), time_ids)
            loss = (eps - noise).pow(2).mean()
            optimizer.step(loss)
            ema.update(unet, step)
            log.add("b_unet", step, epsilon_mse=loss.item())
            bar.set_postfix(mse=f"{log.final('b_unet', 'epsilon_mse', 50):.4f}", refresh=False)
            bar.update(1)
    ema.copy_to(unet)
    unet.eval().requires_grad_(False)

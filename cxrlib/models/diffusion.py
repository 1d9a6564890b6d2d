"""Class-conditional diffusion models of chest X-rays, built from Hugging Face ``diffusers`` parts.

"This X-Ray Does Not Exist" (2024) synthesises chest X-rays with a latent diffusion model.
Here the same family is assembled from ``diffusers`` building blocks, nothing hand-written:

- the denoiser is a :class:`diffusers.UNet2DModel` with a class embedding for
  ``normal`` / ``pneumonia`` / ``covid`` plus one *null* class; training replaces the label
  by the null class with probability ``cond_drop_prob`` (label dropout), so one network
  predicts both the conditional and the unconditional noise, which classifier-free
  guidance (Ho & Salimans 2022) mixes at sampling time;
- :class:`diffusers.DDPMScheduler` adds noise during training, :class:`diffusers.DDIMScheduler`
  removes it in a few deterministic steps when sampling;
- the latent variant (``latent=True``, the ``full`` profile's) runs the same denoiser on the
  latents of a small :class:`diffusers.AutoencoderKL` the project trains itself on the
  train split; the pixel-space model is the CPU default.

Images are ``(N, H, W)`` ``uint8`` (0..255) outside and ``(N, 1, H, W)`` float in [-1, 1]
inside the model. A :class:`DiffusionModel` holds the denoiser, the optional autoencoder
and its :class:`DiffusionConfig`; :meth:`DiffusionModel.sample` draws seeded images,
:meth:`DiffusionModel.inpaint` fills a masked region (RePaint-style, Lugmayr et al. 2022),
:meth:`DiffusionModel.save_pretrained` / :meth:`DiffusionModel.from_pretrained` write and
read the ``diffusers`` folder layout (``unet/``, ``vae/``, ``scheduler/``), so a model
from the Hugging Face hub loads the same way as one trained here.

Sizes (``image_size=32``, ``layers_per_block=1``, no attention):

=====================  ==========
block_out_channels     parameters
=====================  ==========
(16, 32, 64)           0.62 M
(32, 64, 64)           1.05 M
(64, 128, 256, 256)    ~14 M
=====================  ==========
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrlib.settings import from_mapping, setting

#: Conditioning classes, in embedding order (the null class comes after them).
CLASS_NAMES: tuple[str, ...] = ("normal", "pneumonia", "covid")
#: File in a saved model folder with the :class:`DiffusionConfig` (besides diffusers' own configs).
CONFIG_FILE = "cxrlib_diffusion.json"


@dataclass
class DiffusionConfig:
    """Settings of a :class:`DiffusionModel` (saved with every checkpoint and model folder).

    - ``image_size``: side of the square images the model makes (pixels).
    - ``class_names``: conditioning classes; the embedding has one more row, the null class.
    - ``block_out_channels``: denoiser channels per resolution level (each level after the
      first halves the side); ``layers_per_block`` ResNet blocks per level.
    - ``attention``: self-attention at the lowest resolution level (better global layout,
      slower on a CPU).
    - ``norm_num_groups``: GroupNorm groups (must divide every channel count).
    - ``num_train_timesteps``, ``beta_schedule`` (``"squaredcos_cap_v2"``: the cosine
      schedule, kinder to small images than ``"linear"``), ``prediction_type``
      (``"v_prediction"`` or ``"epsilon"``): the noise process, shared by the DDPM
      (training) and DDIM (sampling) schedulers. ``v_prediction`` (Salimans & Ho 2022) is
      the default because sampling starts at the last training step, where the cosine
      schedule leaves almost no signal (``alphas_cumprod[-1]`` ~ 1e-9): an epsilon model's
      image estimate there is ``(x - sqrt(1 - a) eps) / sqrt(a)``, so any error in ``eps`` is
      multiplied by ~2e4, clipped to a saturated +-1 pattern and carried on as if it were
      image content (a fifth of the samples of a short CPU run came out as pure noise);
      ``v`` predicts the image itself at that step (see :func:`x0_error_gain`).
    - ``latent``: denoise the latents of an :class:`~diffusers.AutoencoderKL` instead of pixels;
      ``vae_block_out_channels`` (each level after the first halves the side, so
      ``(32, 64, 64)`` maps 64 px to 16 px latents), ``latent_channels``, ``vae_scaling_factor``
      (latents are multiplied by it before diffusion; set from the training latents' standard
      deviation by :func:`cxrlib.train.diffusion.train_diffusion`).
    """

    image_size: int = setting(32, "image side in pixels")
    class_names: tuple[str, ...] = setting(CLASS_NAMES, "conditioning classes (manifest labels), in embedding order")
    block_out_channels: tuple[int, ...] = setting((32, 64, 64), "denoiser channels per level",
                                                  aliases=("--channels",))
    layers_per_block: int = setting(1, "ResNet blocks per denoiser level")
    attention: bool = setting(False, "self-attention at the lowest resolution level")
    norm_num_groups: int = setting(8, "GroupNorm groups (must divide every channel count)")
    num_train_timesteps: int = setting(1000, "steps of the noise process")
    beta_schedule: str = setting("squaredcos_cap_v2", "noise schedule (diffusers name)")
    prediction_type: str = setting("v_prediction", "what the denoiser predicts: the velocity v (stable at the "
                                   "noisiest step) or the noise", choices=("v_prediction", "epsilon"))
    latent: bool = setting(False, "latent diffusion with a trained AutoencoderKL")
    latent_channels: int = setting(4, "channels of the autoencoder's latents")
    vae_block_out_channels: tuple[int, ...] = setting((32, 64, 64), "autoencoder channels per level")
    vae_scaling_factor: float = setting(1.0, "latent scale (set from the training latents)")

    def __post_init__(self) -> None:
        self.class_names = tuple(str(name) for name in self.class_names)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.vae_block_out_channels = tuple(int(c) for c in self.vae_block_out_channels)
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be distinct and non-empty, got {self.class_names}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        for name, channels in (("block_out_channels", self.block_out_channels),
                               ("vae_block_out_channels", self.vae_block_out_channels)):
            bad = [c for c in channels if c < 1 or c % self.norm_num_groups]
            if not channels or bad:
                raise ValueError(f"{name} {channels}: every entry must be a positive multiple of "
                                 f"norm_num_groups={self.norm_num_groups}")
        side = self.sample_size
        if side % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"the denoiser's input side {side} is not divisible by "
                             f"2**{len(self.block_out_channels) - 1} (one halving per level after the first)")
        if self.latent and self.image_size % self.latent_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by the autoencoder's "
                             f"down-sampling factor {self.latent_factor}")

    @property
    def null_class(self) -> int:
        """Index of the null (unconditional) class embedding."""
        return len(self.class_names)

    @property
    def latent_factor(self) -> int:
        """How much the autoencoder shrinks each side (1 for the pixel model)."""
        return 2 ** (len(self.vae_block_out_channels) - 1) if self.latent else 1

    @property
    def sample_size(self) -> int:
        """Side of what the denoiser sees: the image, or its latent."""
        return self.image_size // self.latent_factor

    @property
    def sample_channels(self) -> int:
        return self.latent_channels if self.latent else 1

    def class_index(self, labels: Sequence[str | int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Class names or indices -> ``(N,)`` int64 indices (``None`` / ``"null"`` -> the null class)."""
        if torch.is_tensor(labels):
            return labels.long()
        index = {name: i for i, name in enumerate(self.class_names)}
        out = []
        for label in list(labels):
            if isinstance(label, int | np.integer):
                value = int(label)
                if not 0 <= value <= self.null_class:
                    raise ValueError(f"class index {value} outside 0..{self.null_class}")
                out.append(value)
            elif label is None or label == "null":
                out.append(self.null_class)
            elif str(label) in index:
                out.append(index[str(label)])
            else:
                raise ValueError(f"unknown class {label!r}; the model knows {list(self.class_names)}")
        return torch.tensor(out, dtype=torch.long)



def build_unet(config: DiffusionConfig) -> nn.Module:
    """The class-conditional denoiser: a ``diffusers.UNet2DModel`` with ``len(class_names) + 1``
    class embeddings (the last is the null class of classifier-free guidance)."""
    from diffusers import UNet2DModel

    levels = len(config.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if config.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=config.sample_size, in_channels=config.sample_channels, out_channels=config.sample_channels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=config.norm_num_groups,
        add_attention=config.attention, attention_head_dim=8, num_class_embeds=config.null_class + 1,
    )


def build_vae(config: DiffusionConfig) -> nn.Module:
    """A small ``diffusers.AutoencoderKL`` for one-channel images (the latent variant's)."""
    from diffusers import AutoencoderKL

    levels = len(config.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=config.vae_block_out_channels,
        layers_per_block=1, latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
        sample_size=config.image_size, scaling_factor=config.vae_scaling_factor,
    )


def _scheduler_kwargs(config: DiffusionConfig) -> dict[str, Any]:
    return dict(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                prediction_type=config.prediction_type, clip_sample=not config.latent)


def training_scheduler(config: DiffusionConfig):
    """The ``diffusers.DDPMScheduler`` that noises training images."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_scheduler_kwargs(config))


def sampling_scheduler(config: DiffusionConfig):
    """The ``diffusers.DDIMScheduler`` that samples in a few steps (same noise process).

    ``timestep_spacing="trailing"`` starts from the last training step, so few-step sampling
    begins at pure noise (Lin et al. 2024)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_scheduler_kwargs(config), timestep_spacing="trailing")


def x0_error_gain(config: DiffusionConfig, timestep: int) -> float:
    """How much an error in the denoiser's output grows in its estimate of the clean image at ``timestep``.

    DDIM turns the network's output into an image estimate before every step. With
    ``a = alphas_cumprod[timestep]``, an output error ``d`` becomes an image error
    ``d * sqrt(1 - a) / sqrt(a)`` for epsilon prediction and ``d * sqrt(1 - a)`` (never more
    than ``d``) for v prediction. Returns that factor (a float >= 0).
    """
    if not 0 <= int(timestep) < config.num_train_timesteps:
        raise ValueError(f"timestep {timestep} outside 0..{config.num_train_timesteps - 1}")
    alpha = float(training_scheduler(config).alphas_cumprod[int(timestep)])
    noise_scale = math.sqrt(max(1.0 - alpha, 0.0))
    if config.prediction_type == "epsilon":
        return noise_scale / math.sqrt(alpha) if alpha > 0 else math.inf
    return noise_scale


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` uint8 (0..255) -> ``(N, 1, H, W)`` float32 in [-1, 1]."""
    tensor = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if tensor.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {tuple(tensor.shape)}")
    return tensor[:, None].float().div(127.5).sub(1.0)


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` float in about [-1, 1] -> ``(N, H, W)`` uint8 (channels averaged)."""
    images = samples.detach().float().mean(dim=1).clamp(-1, 1).add(1.0).mul(127.5)
    return images.round().to(torch.uint8).cpu().numpy()


class DiffusionModel(nn.Module):
    """Denoiser (+ autoencoder for the latent variant) and the config that built them.

    ``unet``: a ``UNet2DModel``; ``vae``: an ``AutoencoderKL`` or ``None`` (pixel model).
    ``DiffusionModel(config)`` builds fresh networks.
    """

    def __init__(self, config: DiffusionConfig | None = None, *, unet: nn.Module | None = None,
                 vae: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config or DiffusionConfig()
        self.unet = unet if unet is not None else build_unet(self.config)
        if self.config.latent:
            self.vae = vae if vae is not None else build_vae(self.config)
        else:
            self.vae = None
        self.conditional = getattr(self.unet.config, "num_class_embeds", None) is not None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------ latents

    def encode(self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """``(N, 1, H, W)`` in [-1, 1] -> what the denoiser sees (the images themselves, or
        scaled autoencoder latents ``(N, latent_channels, H/f, W/f)``; the mean unless ``sample``)."""
        if self.vae is None:
            return images
        dist = self.vae.encode(images).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return latents * self.config.vae_scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: ``(N, 1, H, W)`` in about [-1, 1]."""
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.config.vae_scaling_factor).sample

    # ------------------------------------------------------------------ denoising

    def _labels(self, labels: Sequence[str | int] | torch.Tensor | None, n: int) -> torch.Tensor | None:
        if not self.conditional:
            return None
        if labels is None:
            return torch.full((n,), self.config.null_class, dtype=torch.long, device=self.device)
        return self.config.class_index(labels).to(self.device)

    def predict(self, x: torch.Tensor, t: torch.Tensor | int, labels: torch.Tensor | None,
                guidance_scale: float = 1.0) -> torch.Tensor:
        """The denoiser's output at step ``t``, with classifier-free guidance.

        ``guidance_scale`` ``w``: ``uncond + w * (cond - uncond)``; 1 is the plain conditional
        prediction (one network pass), 0 the unconditional one, > 1 pushes samples towards
        their class at some cost in variety.
        """
        timesteps = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x))
        if labels is None or guidance_scale == 1.0:
            return self.unet(x, timesteps, class_labels=labels).sample
        null = torch.full_like(labels, self.config.null_class)
        if guidance_scale == 0.0:
            return self.unet(x, timesteps, class_labels=null).sample
        both = self.unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                         class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        shape = (n, self.config.sample_channels, self.config.sample_size, self.config.sample_size)
        return torch.randn(shape, generator=generator).to(self.device)

    @torch.no_grad()
    def sample(self, labels: Sequence[str | int] | torch.Tensor | None, *, n: int | None = None,
               num_inference_steps: int = 25, guidance_scale: float = 2.0, seed: int = 0,
               batch_size: int = 64, eta: float = 0.0) -> np.ndarray:
        """Draw images with DDIM: ``(N, image_size, image_size)`` uint8.

        ``labels``: one class name (or index) per image; ``None`` with ``n`` draws ``n``
        unconditional images. The starting noise of batch ``b`` comes from a generator seeded
        with ``(seed, b)``, so the same call gives the same images on any machine with the
        same PyTorch, whatever else ran before. ``eta=0``: deterministic DDIM.
        """
        if labels is None:
            if n is None:
                raise ValueError("give labels, or n for unconditional samples")
            labels_t = None
            count = int(n)
        else:
            labels_t = self.config.class_index(labels) if self.conditional else None
            count = len(labels) if not torch.is_tensor(labels) else int(labels.shape[0])
        was_training = self.training
        self.eval()
        out = []
        for batch, start in enumerate(range(0, count, batch_size)):
            size = min(batch_size, count - start)
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), batch])
                                                          .generate_state(1)[0]))
            batch_labels = (self._labels(labels_t[start:start + size], size) if labels_t is not None
                            else self._labels(None, size))
            scheduler = sampling_scheduler(self.config)
            scheduler.set_timesteps(num_inference_steps)
            x = self._noise(size, generator) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                model_output = self.predict(x, t, batch_labels, guidance_scale)
                x = scheduler.step(model_output, t, x, eta=eta, generator=generator).prev_sample
            out.append(to_uint8(self.decode(x)))
        self.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, self.config.image_size, self.config.image_size), np.uint8)

    @torch.no_grad()
    def inpaint(self, images: np.ndarray, masks: np.ndarray, labels: Sequence[str | int] | None = None, *,
                num_inference_steps: int = 25, guidance_scale: float = 1.0, resample: int = 2, seed: int = 0,
                batch_size: int = 32) -> np.ndarray:
        """Fill ``masks`` (True = unknown, to be replaced) of ``images`` with the model (RePaint-style).

        ``images``: ``(N, S, S)`` uint8 at the model's ``image_size``; ``masks``: ``(N, S, S)``
        bool. At each DDIM step the known region is replaced by the original noised to that
        step (``DDPMScheduler.add_noise``), so the model only invents the masked pixels and
        must make them agree with their surroundings; ``resample`` > 1 re-noises each step
        back ``resample - 1`` times and denoises it again (RePaint's resampling, which
        harmonises the two regions). ``labels``: conditioning class per image (``None``: the
        null class). Returns ``(N, S, S)`` uint8; pixels outside the masks are the originals.
        The latent variant works on the mask shrunk to the latent grid (any latent cell
        touching the mask is unknown).
        """
        images = np.asarray(images)
        masks = np.asarray(masks, dtype=bool)
        side = self.config.image_size
        if images.ndim != 3 or images.shape[1:] != (side, side) or masks.shape != images.shape:
            raise ValueError(f"images and masks must be (N, {side}, {side}) (the model's image_size), got "
                             f"{images.shape} and {masks.shape}")
        was_training = self.training
        self.eval()
        noiser = training_scheduler(self.config)
        alphas = noiser.alphas_cumprod.to(torch.float64)
        out = []
        for batch, start in enumerate(range(0, len(images), batch_size)):
            stop = min(start + batch_size, len(images))
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), batch, 7])
                                                          .generate_state(1)[0]))
            pixels = to_model_range(images[start:stop]).to(self.device)
            known_clean = self.encode(pixels)
            unknown = torch.from_numpy(masks[start:stop])[:, None].float()
            if self.config.latent:
                unknown = (nn.functional.max_pool2d(unknown, self.config.latent_factor) > 0).float()
            unknown = unknown.to(self.device)
            batch_labels = self._labels(None if labels is None else list(labels)[start:stop], stop - start)
            scheduler = sampling_scheduler(self.config)
            scheduler.set_timesteps(num_inference_steps)
            steps = list(scheduler.timesteps)
            x = self._noise(stop - start, generator)
            for index, t in enumerate(steps):
                previous = steps[index + 1] if index + 1 < len(steps) else None
                for repeat in range(max(int(resample), 1)):
                    noise = torch.randn(known_clean.shape, generator=generator).to(self.device)
                    known_t = noiser.add_noise(known_clean, noise, t.reshape(1).to(self.device))
                    x = unknown * x + (1.0 - unknown) * known_t
                    model_output = self.predict(x, t, batch_labels, guidance_scale)
                    x_prev = scheduler.step(model_output, t, x, eta=0.0).prev_sample
                    if repeat + 1 < max(int(resample), 1) and previous is not None:
                        # back from step `previous` to step t: q(x_t | x_prev) of the DDPM process
                        ratio = float(alphas[int(t)] / alphas[int(previous)])
                        fresh = torch.randn(x.shape, generator=generator).to(self.device)
                        x = math.sqrt(ratio) * x_prev + math.sqrt(1.0 - ratio) * fresh
                    else:
                        x = x_prev
            x = unknown * x + (1.0 - unknown) * known_clean
            filled = to_uint8(self.decode(x))
            original = images[start:stop]
            out.append(np.where(masks[start:stop], filled, original))
        self.train(was_training)
        return np.concatenate(out) if out else images.copy()

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the ``diffusers`` layout: ``unet/``, ``vae/`` (latent variant), ``scheduler/`` (DDIM)
        and ``cxrlib_diffusion.json`` (this config). Read back with :meth:`from_pretrained`."""
        from cxrlib.runs import write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        sampling_scheduler(self.config).save_pretrained(folder / "scheduler")
        write_json(folder / CONFIG_FILE, asdict(self.config))
        return folder

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, local_files_only: bool = True,
                        class_names: Sequence[str] | None = None) -> DiffusionModel:
        """Load a model folder written by :meth:`save_pretrained`, or a hub id / folder in the
        ``diffusers`` layout (``unet/`` subfolder or a bare UNet2DModel folder).

        ``local_files_only=True`` (the default) never touches the network: a hub id must
        already be in the Hugging Face cache. When it is not (or the machine is offline) the
        ``OSError`` says what was looked for and how to get it. Models without a class
        embedding load as unconditional models; RGB models' samples are averaged to grey.
        ``class_names`` overrides the saved ones (for hub models without a cxrlib config).
        """
        from diffusers import AutoencoderKL, UNet2DModel

        source = str(name_or_path)
        folder = Path(source).expanduser()
        is_local = folder.is_dir()
        looks_like_path = Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
        if not is_local and looks_like_path:
            raise FileNotFoundError(f"diffusion model folder {source} does not exist")

        def load(model_cls: Any, subfolder: str | None) -> Any:
            where = str(folder) if is_local else source
            return model_cls.from_pretrained(where, subfolder=subfolder, local_files_only=local_files_only)

        try:
            has_sub = (folder / "unet").is_dir() if is_local else True
            try:
                unet = load(UNet2DModel, "unet" if has_sub else None)
            except OSError:
                if is_local:
                    raise
                unet = load(UNet2DModel, None)  # a hub repo that is just a UNet
        except (OSError, ValueError) as exc:
            hint = ("it is not a local folder and not in the Hugging Face cache"
                    + (" (local_files_only=True: nothing is downloaded)" if local_files_only
                       else " and could not be downloaded (offline?)"))
            raise OSError(
                f"cannot load diffusion model {source!r}: {hint}. Pass a folder written by "
                "DiffusionModel.save_pretrained, or download the hub model on a machine with internet "
                f"(`huggingface-cli download {source}`) and copy the cache (HF_HOME), or call with "
                f"local_files_only=False where the hub is reachable. Cause: {type(exc).__name__}: {exc}"
            ) from exc
        saved = folder / CONFIG_FILE if is_local else None
        if saved is not None and saved.is_file():
            config = from_mapping(DiffusionConfig, json.loads(saved.read_text()), strict=False)
        else:
            names = tuple(class_names) if class_names else CLASS_NAMES
            config = DiffusionConfig(image_size=int(unet.config.sample_size if isinstance(unet.config.sample_size, int)
                                                    else unet.config.sample_size[0]),
                                     class_names=names, block_out_channels=tuple(unet.config.block_out_channels),
                                     layers_per_block=unet.config.layers_per_block,
                                     norm_num_groups=unet.config.norm_num_groups,
                                     prediction_type=_saved_prediction_type(folder if is_local else source,
                                                                            local_files_only))
        if class_names is not None:
            config = replace(config, class_names=tuple(class_names))
        vae = load(AutoencoderKL, "vae") if config.latent else None
        model = cls(config, unet=unet, vae=vae)
        return model.eval()


def _saved_prediction_type(where: str | os.PathLike, local_files_only: bool) -> str:
    """The ``prediction_type`` of a diffusers folder's ``scheduler/`` config; ``"epsilon"`` (what
    diffusers assumes, and most hub models use) when there is none or it names another one."""
    from diffusers import DDIMScheduler

    try:
        saved = DDIMScheduler.load_config(str(where), subfolder="scheduler", local_files_only=local_files_only)
    except (OSError, ValueError):
        return "epsilon"
    value = saved.get("prediction_type", "epsilon")
    return value if value in ("epsilon", "v_prediction") else "epsilon"


@dataclass
class SampleSpec:
    """How many images of each class :func:`sample_per_class` draws, and how."""

    per_class: dict[str, int] = field(default_factory=lambda: {name: 16 for name in CLASS_NAMES})
    num_inference_steps: int = 25
    guidance_scale: float = 2.0
    seed: int = 0


def sample_per_class(model: DiffusionModel, spec: SampleSpec, *, batch_size: int = 64
                     ) -> tuple[np.ndarray, list[str]]:
    """Seeded samples of every class in ``spec.per_class``: ``(images (N, S, S) uint8, labels)``.

    Each class draws from its own seed (``(spec.seed, class index)``), so adding a class or
    changing another class's count leaves a class's images unchanged.
    """
    images, labels = [], []
    for name, count in spec.per_class.items():
        if count <= 0:
            continue
        class_seed = int(np.random.SeedSequence([int(spec.seed), model.config.class_names.index(name)])
                         .generate_state(1)[0])
        images.append(model.sample([name] * int(count), num_inference_steps=spec.num_inference_steps,
                                   guidance_scale=spec.guidance_scale, seed=class_seed, batch_size=batch_size))
        labels += [name] * int(count)
    side = model.config.image_size
    return (np.concatenate(images) if images else np.zeros((0, side, side), np.uint8)), labels

"""AutoencoderKL-style spectral VAE with an L2 head on the latent grid.

Encoder: conv_in (C -> channels[0]) -> per level ResNet blocks (+ attention where the
spatial size is in ``attn_resolutions``) and a stride-2 downsample between levels -> middle
(ResNet, attention, ResNet) -> GroupNorm, activation, conv to 2 x latent (mean, logvar) ->
1x1 quant conv. The decoder mirrors it (nearest upsample + conv). The L2 head is a stack of
1x1 convolutions on the latent grid fed the same latent sample that is decoded.

Viewing geometry (``model.geometry``): the shards' ``geo`` member (latitude, longitude,
solar and viewing zenith angle per pixel) becomes GEOMETRY_FEATURES (cos SZA, cos VZA and
2 / geometric air-mass factor, each in (0, 1]), fed as extra input channels of the encoder
('encoder'), averaged over each latent cell and appended to the head's input ('head'), or
both ('both'). 'none' (the research model) ignores it. The decoder reconstructs the
spectrum only.

Spectral input (``model.spectral_input``): 'zscore' (the research model) feeds the encoder the
normalised radiance x = (log I - mean_c) / std_c as it is. 'highpass' feeds it, per pixel,
the log radiance's departure from the mean spectrum, log I - mean_c = x std_c, split into a
polynomial in wavelength of degree ``highpass_degree`` (its coefficients: brightness and
broad-band shape) and the residual (differential structure: trace-gas absorption, as a
DOAS fit sees it); both are divided by per-channel scales measured on the first training
batch (``init_spectral_scales``), so the residual's small differential features are on the
scale of the inputs. Together they hold exactly what x holds; the decoder still
reconstructs x. The channel std, wavelengths and scales are buffers (saved, exported).

Slant columns (``model.slant_columns``): per pixel, the DOAS slant columns of NO2, O3, HCHO
and O2-O2 fitted by least squares in the operational retrievals' three windows
(``data_prep.physics.slant_column_operator``, 12 numbers), a fixed linear map of the log
radiance built once from laboratory cross-sections (``model.xsec_dir``) at the shards'
wavelengths. Each is centred and scaled on the first training batch. They put the weak
differential absorption of NO2 and HCHO, which lies in the radiance covariance's
low-variance directions, on the scale of the other inputs: 'encoder' (extra input
channels), 'head' (averaged per latent cell, appended to the head's input), 'both' or
'none' (the research model). With the geometry also in the head, the head further gets
each column times 2 / geometric air-mass factor (a vertical column is a slant column over
the air-mass factor), so that this first retrieval step is linear for it. The map, centre
and scales are buffers (saved, exported).

Everything the loss needs, including the learned reconstruction log-variance, comes out
of ``forward``: under ZeRO-3 parameters are only whole inside the forward pass.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}
GEOMETRY_FEATURES = ("cos_sza", "cos_vza", "inverse_geometric_amf")
FEATURE_ROUTES = ("none", "encoder", "head", "both")  # model.geometry, model.slant_columns
SPECTRAL_INPUTS = ("zscore", "highpass")
N_SLANT_COLUMNS = 12  # data_prep.physics.slant_column_operator: 3 windows x 4 absorbers
MIN_COS = 0.05  # zenith angles beyond ~87 degrees count as 87 (as train.evaluate's ridge)


def geometry_features(geo: torch.Tensor) -> torch.Tensor:
    """Viewing-geometry features from the shards' geo member.

    geo: (B, 4, H, W) latitude, longitude, solar zenith angle, viewing zenith angle
    (degrees; the order of ``data_prep.samples.GEO_ORDER``). Returns (B, 3, H, W) float32:
    cos SZA, cos VZA and 2 / (1/cos SZA + 1/cos VZA), the inverse of the geometric air-mass
    factor scaled to 1 at nadir with the sun overhead; cosines clipped below at 0.05. A
    pixel with invalid geolocation (non-finite angles) gets 0 for all three."""
    if geo.ndim != 4 or geo.shape[1] != 4:
        raise ValueError(f"geo must be (B, 4, H, W) [lat, lon, sza, vza], got {tuple(geo.shape)}")
    ang = torch.deg2rad(geo[:, 2:4].float())
    cos = torch.cos(ang).clamp(min=MIN_COS)
    inv_amf = 2.0 / (1.0 / cos[:, :1] + 1.0 / cos[:, 1:])
    feats = torch.cat([cos, inv_amf], 1)
    ok = torch.isfinite(ang).all(1, keepdim=True)
    return torch.where(ok, feats, torch.zeros_like(feats))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, eps: float, act: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.act = ACTIVATIONS[act]()
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H x W positions."""

    def __init__(self, ch: int, heads: int, groups: int, eps: float):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention: {ch} channels not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        # (B, C, H, W) -> (B, heads, HW, C/heads)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)
                   for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj(o)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch, cfg):
    layers = [ResnetBlock(ch, ch, cfg.norm_groups, cfg.norm_eps, cfg.activation)]
    if cfg.mid_attention:
        layers.append(AttnBlock(ch, cfg.attn_heads, cfg.norm_groups, cfg.norm_eps))
    layers.append(ResnetBlock(ch, ch, cfg.norm_groups, cfg.norm_eps, cfg.activation))
    return nn.Sequential(*layers)


def _levels(widths: list[int], size: int, cfg, resample, factor: float):
    """ResNet blocks per level (+ attention at listed sizes), a resampling layer between
    levels. Returns (the stack, its output width)."""
    blocks: list[nn.Module] = []
    cin = widths[0]
    for i, cout in enumerate(widths):
        for _ in range(cfg.num_res_blocks):
            blocks.append(ResnetBlock(cin, cout, cfg.norm_groups, cfg.norm_eps, cfg.activation))
            cin = cout
            if size in cfg.attn_resolutions:
                blocks.append(AttnBlock(cout, cfg.attn_heads, cfg.norm_groups, cfg.norm_eps))
        if i < len(widths) - 1:
            blocks.append(resample(cout))
            size = int(size * factor)
    return nn.Sequential(*blocks), cin


class _Float32Buffers(nn.Module):
    """A fixed spectral transform whose buffers stay float32 under a module-wide cast.

    DeepSpeed's bf16 engine (and ``module.bfloat16()`` / ``.half()``) casts every floating
    buffer; a bf16 wavelength grid (8-bit mantissa: 2 nm steps at 400 nm) or channel std
    would distort the small differential structure these transforms exist to expose.
    ``_apply`` keeps the float32 values and follows only device moves. The transforms
    compute in float32 and return the dtype of their input, also inside an autocast region
    (``train.predict`` on a GPU, Accelerate's mixed precision), which would otherwise run
    their matrix products in bf16: calls run with autocast off."""

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        if not torch.amp.is_autocast_available(x.device.type):  # e.g. 'meta' (FLOP counts)
            return super().__call__(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return super().__call__(x, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        kept = {n: b for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for n, b in kept.items():
            new = self._buffers[n]
            if new.dtype != b.dtype:
                self._buffers[n] = b.to(device=new.device)
        return self


class SpectralHighPass(_Float32Buffers):
    """x (B, C, H, W) z-scores -> (B, C + D + 1, H, W): residual of log I - mean_c after a
    least-squares polynomial of degree D in wavelength, then the D + 1 coefficients, each
    divided by its scale. Buffers: std (C,), wavelength (C,) nm, scale (C + D + 1,)."""

    def __init__(self, channels: int, degree: int):
        super().__init__()
        self.degree = degree
        self.register_buffer("std", torch.ones(channels))
        self.register_buffer("wavelength", torch.linspace(290.0, 490.0, channels))
        self.register_buffer("scale", torch.ones(channels + degree + 1))

    def basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V (C, D+1) Legendre-like powers of wavelength scaled to [-1, 1], its pseudo-
        inverse (D+1, C)), in float64 then cast to float32."""
        w = self.wavelength.double()
        t = 2 * (w - w.min()) / (w.max() - w.min()).clamp(min=1e-9) - 1
        v = torch.stack([t ** k for k in range(self.degree + 1)], 1)
        return v.float(), torch.linalg.pinv(v).float()

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() * self.std.float()[None, :, None, None]  # log I - mean, (B, C, H, W)
        v, vinv = self.basis()
        coef = torch.einsum("kc,bchw->bkhw", vinv, y)
        resid = y - torch.einsum("ck,bkhw->bchw", v, coef)
        return torch.cat([resid, coef], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw(x) / self.scale[None, :, None, None]).to(x.dtype)

    @property
    def out_channels(self) -> int:
        return self.scale.shape[0]

    @torch.no_grad()
    def init_scales(self, std: torch.Tensor, wavelength: torch.Tensor, x: torch.Tensor) -> None:
        """Set the channel std and wavelengths (the shards' stats) and the scales: the std of
        each output over the pixels of ``x`` (B, C, H, W), floored at 1e-6."""
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype))
        self.wavelength.copy_(torch.as_tensor(wavelength, dtype=self.wavelength.dtype))
        r = self.raw(x.float())
        self.scale.copy_(r.transpose(0, 1).reshape(r.shape[1], -1).std(1).clamp(min=1e-6))


class SlantColumnFit(_Float32Buffers):
    """x (B, C, H, W) z-scores -> (B, K, H, W) DOAS slant columns, centred and scaled.

    raw: ``operator @ (x * std)`` per pixel, i.e. the operator of
    ``data_prep.physics.slant_column_operator`` applied to log I - mean_c (molecules/cm^2,
    up to a constant per column); out: (raw - offset) / scale. Buffers: std (C,), operator
    (K, C), offset (K,), scale (K,); all zero-effect (operator 0) until
    :meth:`init_operator`."""

    def __init__(self, channels: int, n_columns: int = N_SLANT_COLUMNS):
        super().__init__()
        self.register_buffer("std", torch.ones(channels))
        self.register_buffer("operator", torch.zeros(n_columns, channels))
        self.register_buffer("offset", torch.zeros(n_columns))
        self.register_buffer("scale", torch.ones(n_columns))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() * self.std.float()[None, :, None, None]
        return torch.einsum("kc,bchw->bkhw", self.operator, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = (self.raw(x) - self.offset[None, :, None, None]) / self.scale[None, :, None, None]
        return f.to(x.dtype)

    @property
    def out_channels(self) -> int:
        return self.operator.shape[0]

    @torch.no_grad()
    def init_operator(self, std: torch.Tensor, operator: torch.Tensor, x: torch.Tensor) -> None:
        """Set the channel std (the shards' stats), the (K, C) operator and, from the pixels
        of ``x`` (B, C, H, W), each column's mean (offset) and std (scale, floored so that
        an all-zero row stays 0). Raises ValueError for an operator of the wrong shape."""
        op = torch.as_tensor(operator, dtype=torch.float64)
        if tuple(op.shape) != tuple(self.operator.shape):
            raise ValueError(f"slant-column operator {tuple(op.shape)}, model expects "
                             f"{tuple(self.operator.shape)}")
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype))
        # float64 for the statistics: the raw columns are ~1e16-1e19 molecules/cm^2
        y = x.double() * self.std.double()[None, :, None, None]
        r = torch.einsum("kc,bchw->bkhw", op, y).transpose(0, 1).reshape(op.shape[0], -1)
        self.operator.copy_(op.float())
        self.offset.copy_(r.mean(1).float())
        sd = r.std(1)
        self.scale.copy_(torch.where(sd > 0, sd, torch.ones_like(sd)).float())


def slant_column_operator_for(cfg, wavelength_nm) -> np.ndarray:
    """The (12, C) float64 operator of ``data_prep.physics.slant_column_operator`` for a
    model section ``cfg``: cross-sections from ``cfg.xsec_dir`` ('analytic': the built-in
    shapes), convolved with a Gaussian slit of ``cfg.slit_fwhm_nm``, at ``wavelength_nm``
    (C,) (the shards' stats). Raises FileNotFoundError naming a folder without known
    cross-section files, ValueError for a grid a window cannot be fitted on."""
    from data_prep import physics

    if cfg.xsec_dir == "analytic":
        spectra = physics.Spectra.analytic()
    elif not os.path.isdir(str(cfg.xsec_dir)):
        raise FileNotFoundError(f"model.xsec_dir={cfg.xsec_dir!r} is not a folder of "
                                "cross-section files (or 'analytic')")
    else:
        spectra = physics.Spectra.from_dir(cfg.xsec_dir)
    op, names = physics.slant_column_operator(spectra, np.asarray(wavelength_nm), cfg.slit_fwhm_nm)
    if op.shape[0] != N_SLANT_COLUMNS:
        raise ValueError(f"slant-column operator has {op.shape[0]} rows ({names}), the model "
                         f"{N_SLANT_COLUMNS}")
    return op


class Encoder(nn.Module):
    def __init__(self, cfg, in_channels: int | None = None):
        super().__init__()
        ch = cfg.channels
        cin = cfg.in_channels if in_channels is None else in_channels
        self.conv_in = nn.Conv2d(cin, ch[0], 3, padding=1)
        self.down, cin = _levels(ch, cfg.tile_size, cfg, Downsample, 0.5)
        self.mid = _mid(cin, cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.act = ACTIVATIONS[cfg.activation]()
        zc = 2 * cfg.latent_channels if cfg.double_z else cfg.latent_channels
        self.conv_out = nn.Conv2d(cin, zc, 3, padding=1)

    def forward(self, x):
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(self.act(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch = list(reversed(cfg.channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = _mid(ch[0], cfg)
        self.up, cin = _levels(ch, cfg.tile_size // 2 ** (len(ch) - 1), cfg, Upsample, 2.0)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.act = ACTIVATIONS[cfg.activation]()
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(self.act(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor, logvar_min: float, logvar_max: float,
                 deterministic: bool = False):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(logvar_min, logvar_max)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.deterministic:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over (C, H, W), in fp32."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        m, lv = self.mean.float(), self.logvar.float()
        return 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).sum(dim=(1, 2, 3))


class L2Head(nn.Module):
    """1x1-conv MLP on the latent grid: latent -> hidden... -> products."""

    def __init__(self, cfg, extra_in: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        cin = cfg.latent_channels + extra_in
        for h in cfg.head_hidden:
            layers += [nn.Conv2d(cin, h, 1), ACTIVATIONS[cfg.activation]()]
            cin = h
        layers.append(nn.Conv2d(cin, cfg.head_outputs, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def _route(cfg, key: str) -> tuple[bool, bool]:
    """(to the encoder, to the head) for a FEATURE_ROUTES option of the model section
    (absent: 'none'). Raises ValueError naming the key for another value."""
    value = getattr(cfg, key, "none")
    if value not in FEATURE_ROUTES:
        raise ValueError(f"model.{key}={value!r}: must be one of {FEATURE_ROUTES}")
    return value in ("encoder", "both"), value in ("head", "both")


class TempoVAE(nn.Module):
    def __init__(self, cfg, logvar_init: float = 6.0, learn_logvar: bool = True):
        super().__init__()
        self.cfg = cfg
        self.geometry_in_encoder, self.geometry_in_head = _route(cfg, "geometry")
        self.latent_factor = 2 ** (len(cfg.channels) - 1)
        n_geo = len(GEOMETRY_FEATURES)
        self.slant_in_encoder, self.slant_in_head = _route(cfg, "slant_columns")
        self.slant = (SlantColumnFit(cfg.in_channels)
                      if self.slant_in_encoder or self.slant_in_head else None)
        n_slant = self.slant.out_channels if self.slant is not None else 0
        spectral = getattr(cfg, "spectral_input", "zscore")
        if spectral not in SPECTRAL_INPUTS:
            raise ValueError(f"model.spectral_input={spectral!r}: must be one of {SPECTRAL_INPUTS}")
        self.highpass = (SpectralHighPass(cfg.in_channels, cfg.highpass_degree)
                         if spectral == "highpass" else None)
        n_in = self.highpass.out_channels if self.highpass is not None else cfg.in_channels
        self.encoder = Encoder(cfg, n_in + (n_geo if self.geometry_in_encoder else 0)
                               + (n_slant if self.slant_in_encoder else 0))
        self.decoder = Decoder(cfg)
        zc = 2 * cfg.latent_channels if cfg.double_z else cfg.latent_channels
        self.quant_conv = nn.Conv2d(zc, zc, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        # with geometry and slant columns both in the head, it also gets their product: the
        # vertical column of a geometric air-mass factor (VCD = SCD / AMF), linear for the head
        self.vertical_columns_in_head = self.geometry_in_head and self.slant_in_head
        self.head = L2Head(cfg, (n_geo if self.geometry_in_head else 0)
                           + (n_slant if self.slant_in_head else 0)
                           + (n_slant if self.vertical_columns_in_head else 0))
        # shape (1,), not a 0-dim scalar: DeepSpeed cannot flatten 0-dim bf16 parameters
        self.logvar = nn.Parameter(torch.full((1,), float(logvar_init)),
                                   requires_grad=learn_logvar)

    @property
    def uses_geometry(self) -> bool:
        return self.geometry_in_encoder or self.geometry_in_head

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the weights (bf16 under DeepSpeed's bf16 engine): inputs of any
        float dtype are cast to it inside the model, after the float32 spectral transform."""
        return self.encoder.conv_in.weight.dtype

    def _geometry(self, x: torch.Tensor, geo: torch.Tensor | None) -> torch.Tensor | None:
        if not self.uses_geometry:
            return None
        if geo is None:
            raise ValueError(f"model.geometry={self.cfg.geometry!r}: forward needs geo, the "
                             "(B, 4, H, W) geo member of the samples")
        if geo.shape[0] != x.shape[0] or geo.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"geo {tuple(geo.shape)} does not match the tiles {tuple(x.shape)}")
        return geometry_features(geo).to(self.compute_dtype)

    def encode(self, x: torch.Tensor, geo: torch.Tensor | None = None) -> DiagonalGaussian:
        """q(z|x); ``geo`` (B, 4, H, W) is required when model.geometry feeds the encoder."""
        enc_extra, _ = self._side_inputs(x, geo)
        return self._posterior(self.quant_conv(self.encoder(self._encoder_input(x, enc_extra))))

    def _side_inputs(self, x: torch.Tensor, geo: torch.Tensor | None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-pixel features beside the spectrum, in ``compute_dtype``: (those for the
        encoder, those for the head), each (B, n, H, W) or None; the geometry features
        first, then the slant columns (computed in float32), then for the head, when both
        reach it, the slant columns times 2 / geometric AMF (``vertical_columns_in_head``)."""
        g = self._geometry(x, geo)
        s = self.slant(x.float()).to(self.compute_dtype) if self.slant is not None else None
        enc = [t for t, on in ((g, self.geometry_in_encoder), (s, self.slant_in_encoder)) if on]
        head = [t for t, on in ((g, self.geometry_in_head), (s, self.slant_in_head)) if on]
        if self.vertical_columns_in_head:
            head.append(s * g[:, 2:3])  # slant column x 2 / geometric AMF
        return (torch.cat(enc, 1) if enc else None), (torch.cat(head, 1) if head else None)

    def _encoder_input(self, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """The encoder's input in ``compute_dtype``: the spectral transform runs in float32
        on the z-scores (float16 as in the shards, or float32), then the cast; ``extra``
        (the encoder part of ``_side_inputs``) is appended."""
        xin = (self.highpass(x.float()) if self.highpass is not None else x) \
            .to(self.compute_dtype)
        return torch.cat([xin, extra], 1) if extra is not None else xin

    def init_spectral_scales(self, std, wavelength, x: torch.Tensor) -> None:
        """model.spectral_input='highpass': set the channel std and wavelengths (nm) from the
        shards' stats.json and the input scales from a batch x (B, C, H, W); no-op else."""
        if self.highpass is not None:
            self.highpass.init_scales(std, wavelength, x)

    def init_slant_columns(self, std, operator, x: torch.Tensor) -> None:
        """model.slant_columns: set the channel std (stats.json), the (12, C) operator of
        ``data_prep.physics.slant_column_operator`` and the columns' centre and scale from a
        batch x (B, C, H, W); no-op when slant columns are off."""
        if self.slant is not None:
            self.slant.init_operator(std, operator, x)

    def _posterior(self, moments: torch.Tensor) -> DiagonalGaussian:
        if not self.cfg.double_z:
            return DiagonalGaussian(torch.cat([moments, moments], 1), 0, 0, deterministic=True)
        return DiagonalGaussian(moments, self.cfg.logvar_min, self.cfg.logvar_max)

    def predict_l2(self, z: torch.Tensor, head_features: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Head output (B, 4, h, w) in model space from latents z (B, Z, h, w) and, when
        geometry or slant columns feed the head, their per-pixel features (B, n, H, W) (the
        head part of ``_side_inputs``), averaged over each latent cell."""
        if head_features is not None:
            f = self.latent_factor
            z = torch.cat([z, F.avg_pool2d(head_features, f) if f > 1 else head_features], 1)
        return self.head(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None,
                geo: torch.Tensor | None = None) -> dict:
        """x (B, C, H, W) normalised radiance; geo (B, 4, H, W) the samples' geo member,
        required when model.geometry is not 'none' (ValueError otherwise). ``moments`` is
        the encoder's output (B, 2Z, h, w), the tensor every term's gradient enters the
        encoder through (see train.losses.encoder_gradient_shares)."""
        enc_extra, head_extra = self._side_inputs(x, geo)
        moments = self.quant_conv(self.encoder(self._encoder_input(x, enc_extra)))
        post = self._posterior(moments)
        z = post.sample(generator) if sample else post.mode()
        return {
            "recon": self.decode(z),  # (B, C, H, W)
            "l2_pred": self.predict_l2(z, head_extra),  # (B, 4, h, w) latent grid, same z as decoded
            "moments": moments,
            "mean": post.mean, "logvar": post.logvar,
            "kl": post.kl(),  # (B,)
            "rec_logvar": self.logvar[0] * torch.ones((), device=x.device),
        }


def build_model(cfg, loss_cfg=None) -> TempoVAE:
    """The model from the ``model`` section (and the loss's log-variance settings)."""
    if loss_cfg is None:
        return TempoVAE(cfg)
    return TempoVAE(cfg, loss_cfg.logvar_init, loss_cfg.learn_logvar)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_pretrained(path: str, device: str | torch.device = "cpu",
                    verify: bool = True) -> TempoVAE:
    """A model folder written by ``python -m train.export``, ready for inference.

    Returns the TempoVAE in eval mode, fp32, on ``device``, with ``model.pretrained``
    (``train.export.PretrainedInfo``): radiance normalisation (``l1_mean``, ``l1_std``),
    the L2 transforms (``transform.inverse``: head output -> physical units), the tile and
    read options of the training shards and the export metadata. Needs neither DeepSpeed
    nor the run folder. ``verify`` checks the weights' SHA-256 against export.json.

    Raises ``train.export.ExportError`` naming the file for a missing or damaged file or
    stats that do not match the model's channel count.
    """
    from train.export import ExportError, read_model_folder

    pre, state = read_model_folder(path, verify)
    model = build_model(pre.cfg.model, pre.cfg.loss)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path}: weights do not fit its config.yaml ({e})") from None
    model.pretrained = pre
    return model.to(device).eval()

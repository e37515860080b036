"""Small images for TensorBoard, drawn with numpy only (no plotting library)."""

from __future__ import annotations

import numpy as np
import torch


def spectra_image(x: torch.Tensor, recon: torch.Tensor, pixels: int = 3,
                  height: int = 96) -> torch.Tensor:
    """(3, pixels*height, C) RGB: input spectra (white) and reconstructions (red) for a few
    pixels of one tile (x, recon: (C, H, W), normalised units)."""
    c, h, w = x.shape
    img = np.zeros((3, pixels * height, c), np.float32)
    coords = [(h // 4, w // 4), (h // 2, w // 2), (3 * h // 4, 3 * w // 4)][:pixels]
    for i, (r, q) in enumerate(coords):
        a, b = x[:, r, q].numpy(), recon[:, r, q].numpy()
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        scale = (height - 2) / max(hi - lo, 1e-6)
        for series, colour in ((a, (1.0, 1.0, 1.0)), (b, (1.0, 0.2, 0.2))):
            ys = (i + 1) * height - 1 - np.round((series - lo) * scale).astype(int)
            for ch, val in enumerate(colour):
                img[ch, ys, np.arange(c)] = val
    return torch.from_numpy(img)


def _scale(a: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((a - lo) / max(hi - lo, 1e-12)).clamp(0, 1).nan_to_num(0.0)


def l2_maps_image(target: torch.Tensor, pred: torch.Tensor, zoom: int = 4) -> torch.Tensor:
    """(1, 4*H', 2*W') grey image: per product (rows) the target pooled to the prediction
    grid (left, NaN black) and the prediction (right), each scaled to the target's range."""
    k, h, w = pred.shape
    f = target.shape[-1] // w
    t = target.reshape(k, h, f, w, f).float()
    valid = torch.isfinite(t)
    t = torch.where(valid, t, 0).sum((2, 4)) / valid.sum((2, 4)).clamp(min=1)
    t[valid.sum((2, 4)) == 0] = float("nan")
    rows = []
    for i in range(k):
        tv = t[i][torch.isfinite(t[i])]
        lo, hi = (float(tv.min()), float(tv.max())) if tv.numel() else (0.0, 1.0)
        rows.append(torch.cat([_scale(t[i], lo, hi), _scale(pred[i].float(), lo, hi)], dim=1))
    img = torch.cat(rows, dim=0)
    img = img.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
    return img[None]

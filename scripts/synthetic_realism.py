"""Synthetic radiance against real TROPOMI radiance, per 5-nm band from 305 to 400 nm.

Synthesizes one small granule (with the real cross-sections and solar spectrum of the
reference folder, and with the built-in analytic ones), keeps the pixels whose geometry
resembles the TROPOMI reference scene (viewing zenith < 30 deg, solar zenith < 50 deg),
divides every spectrum by cos(SZA), and prints mean synthetic / mean TROPOMI per band.
The TROPOMI file is the nadir row of a clean Pacific sector (lat -5..5, lon 180..220) on
2023-06-08 at the 13:30 overpass, SZA 31.7 deg (declination 22.9 deg, hour angle 22.5 deg).
Also prints the mean synthetic radiance below 314 nm and the retrieval precisions of the
truth file (photon-noise bound of the spectra, data_prep.physics.retrieval_precision).

    python scripts/synthetic_realism.py --reference-dir ../shared/reference_data
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

import netCDF4
import numpy as np

from data_prep import synthesize, tempo
from data_prep.util import HelpFormatter

TROPOMI_FILE = "tropomi_band3_reference_radiance_20230608.nc"
TROPOMI_SZA = 31.7
AVOGADRO = 6.02214e23


def tropomi(ref_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(wavelength nm, radiance / cos(SZA) in photons s^-1 cm^-2 nm^-1 sr^-1), nadir row."""
    with netCDF4.Dataset(os.path.join(ref_dir, TROPOMI_FILE)) as d:
        d.set_auto_mask(False)
        row = d["reference_radiance"].shape[0] // 2
        wl = d["reference_wavelength"][row].astype(float)
        rad = d["reference_radiance"][row].astype(float) * AVOGADRO / 1e4  # mol m-2 -> cm-2
    return wl, rad / np.cos(np.radians(TROPOMI_SZA))


def synthetic(out: str, xsec_dir: str | None, channels: int) -> tuple[np.ndarray, np.ndarray,
                                                                        str]:
    args = [out, "--granules", "1", "--mirror-steps", "8", "--xtrack", "16",
            "--channels", str(channels)]
    if xsec_dir:
        args += ["--xsec-dir", xsec_dir]
    synthesize.main(args)
    g = tempo.read_l1(glob.glob(os.path.join(out, "TEMPO_RAD_*.nc"))[0])
    sel = (g.vza < 30) & (g.sza < 50)
    spec = np.nanmean((g.radiance / np.cos(np.radians(g.sza))[..., None])[sel], axis=0)
    return g.wavelength.mean(axis=0), spec, glob.glob(os.path.join(out, "truth", "*.nc"))[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--reference-dir", default=os.path.join("..", "shared", "reference_data"),
                   help="folder holding the TROPOMI reference radiance and cross-sections")
    p.add_argument("--channels", type=int, default=1028)
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.reference_dir, TROPOMI_FILE)):
        print(f"error: {TROPOMI_FILE} not in {args.reference_dir}", file=sys.stderr)
        return 2
    twl, trad = tropomi(args.reference_dir)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, xsec in (("files", args.reference_dir), ("analytic", None)):
            wl, spec, truth = synthetic(os.path.join(tmp, name), xsec, args.channels)
            rows[name] = {lo: spec[(wl >= lo) & (wl < lo + 5)].mean()
                          / trad[(twl >= lo) & (twl < lo + 5)].mean() for lo in range(305, 400, 5)}
            rows[name]["uv"] = spec[wl < 314].mean()
            with netCDF4.Dataset(truth) as t:
                rows[name]["prec"] = {k: float(np.median(t[f"precision_{k}"][:]))
                                      for k in ("NO2", "HCHO", "O3TOT", "CLDO4")}
    print("synthetic / TROPOMI mean radiance per band (radiance / cos SZA; synthetic pixels "
          "with VZA < 30, SZA < 50)")
    print(f"{'band nm':>9} {'real spectra':>13} {'analytic':>9}")
    for lo in range(305, 400, 5):
        print(f"{lo:>4}-{lo + 5:<4} {rows['files'][lo]:>13.2f} {rows['analytic'][lo]:>9.2f}")
    for name in ("files", "analytic"):
        r = [rows[name][lo] for lo in range(305, 400, 5)]
        print(f"{name}: ratio range {min(r):.2f}..{max(r):.2f}; mean radiance below 314 nm "
              f"{rows[name]['uv']:.3g}; median retrieval precision "
              + ", ".join(f"{k} {v:.3g}" for k, v in rows[name]["prec"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

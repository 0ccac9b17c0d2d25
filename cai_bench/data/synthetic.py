"""Seeded, vectorised synthetic SDSS-like galaxies with the shapes, dtypes and value ranges of the real data.

Per galaxy: a spectroscopic redshift drawn like the SDSS main sample; an absolute magnitude such that the
apparent r magnitude lies in the main-sample range (r < 17.77); ugriz colours that depend on galaxy type and
get redder with redshift; a Sersic light profile (size from luminosity and angular-diameter distance, index,
axis ratio, angle) rendered in 5 bands with a colour gradient, blurred by a per-band Gaussian PSF and covered
by sky and source noise. Images are in nanomaggies, sky-subtracted, centre 32x32 of a larger render.

Determinism: object ``i`` is drawn from the random stream of ``(GENERATOR_VERSION, seed, i // BLOCK)``, so the
same seed gives the same galaxies whatever the partitioning, and any range of objects can be generated alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

GENERATOR_VERSION = 1
BLOCK = 512
BANDS = ("u", "g", "r", "i", "z")
IMAGE_SIZE = 32
PAD = 8  # rendered beyond the crop so the PSF brings in light from just outside it
RENDER = IMAGE_SIZE + 2 * PAD
PIXEL_ARCSEC = 0.396  # SDSS imaging camera
Z_MIN, Z_MAX = 0.01, 0.55
R_LIMIT = 17.77  # SDSS main galaxy sample, Petrosian r
R_BRIGHT = 13.0
H0, OMEGA_M = 70.0, 0.3
C_KM_S = 299_792.458

# Colour model: (u-g, g-r, r-i, i-z) = base + slope * z, per galaxy type (red/early, blue/late).
_COLOUR_BASE = {"red": (1.75, 0.74, 0.38, 0.30), "blue": (1.25, 0.45, 0.28, 0.20)}
_COLOUR_SLOPE = {"red": (1.0, 1.0, 0.45, 0.25), "blue": (0.7, 0.9, 0.35, 0.25)}
_COLOUR_SCATTER = (0.12, 0.05, 0.03, 0.04)
_MAG_ERROR = (0.05, 0.01, 0.01, 0.01, 0.03)
# Bluer bands are larger for late types (star-forming discs), nearly flat for early types.
_SIZE_GRADIENT = {"red": (0.05, 0.02, 0.0, -0.01, -0.02), "blue": (0.15, 0.08, 0.0, -0.04, -0.08)}
_PSF_BAND_FACTOR = np.array([1.12, 1.06, 1.0, 0.97, 0.97], dtype=np.float32)
# Sky noise per pixel (nanomaggies) and source-noise factor (nanomaggy per unit flux), per band.
_SKY_SIGMA = np.array([0.09, 0.025, 0.035, 0.05, 0.16], dtype=np.float32)
_SOURCE_NOISE = np.array([0.010, 0.004, 0.005, 0.006, 0.020], dtype=np.float32)


@dataclass
class GalaxyBatch:
    images: np.ndarray  # float32 [N, 5, 32, 32]
    magnitudes: np.ndarray  # float64 [N, 5]
    redshift: np.ndarray  # float32 [N]
    object_id: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.redshift)


@lru_cache(maxsize=1)
def _distance_table() -> tuple[np.ndarray, np.ndarray]:
    """Comoving distance (Mpc) on a redshift grid, flat LCDM, by the trapezoid rule."""
    z = np.linspace(0.0, 1.0, 4001)
    inv_e = 1.0 / np.sqrt(OMEGA_M * (1 + z) ** 3 + (1 - OMEGA_M))
    steps = 0.5 * (inv_e[1:] + inv_e[:-1]) * np.diff(z)
    comoving = (C_KM_S / H0) * np.concatenate(([0.0], np.cumsum(steps)))
    return z, comoving


@lru_cache(maxsize=1)
def _redshift_inverse_cdf() -> tuple[np.ndarray, np.ndarray]:
    """p(z) ~ z^2 exp(-(z/z0)^1.5) on [0.01, 0.55], z0 set so that the peak is near z = 0.1."""
    z0 = 0.1 / (2 / 1.5) ** (1 / 1.5)
    z = np.linspace(Z_MIN, Z_MAX, 4096)
    pdf = z**2 * np.exp(-((z / z0) ** 1.5))
    cdf = np.concatenate(([0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(z))))
    return cdf / cdf[-1], z


def sample_redshift(rng: np.random.Generator, n: int) -> np.ndarray:
    cdf, z = _redshift_inverse_cdf()
    return np.interp(rng.random(n), cdf, z)


def _truncated_logistic(rng: np.random.Generator, mu, scale, lo, hi) -> np.ndarray:
    """Inverse-CDF draw from a logistic distribution cut to [lo, hi] (a closed-form stand-in for a normal)."""

    def cdf(x):
        return 1.0 / (1.0 + np.exp(-(x - mu) / scale))

    u = cdf(lo) + rng.random(np.shape(lo)) * (cdf(hi) - cdf(lo))
    u = np.clip(u, 1e-12, 1 - 1e-12)
    return mu + scale * np.log(u / (1 - u))


def _sersic_b(n: np.ndarray) -> np.ndarray:
    """b_n such that r_e encloses half the light (Ciotti & Bertin 1999 expansion)."""
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2)


def _draw_block(seed: int, block: int) -> GalaxyBatch:
    rng = np.random.default_rng([GENERATOR_VERSION, seed, block])
    n = BLOCK
    z = sample_redshift(rng, n)
    red = rng.random(n) < np.clip(0.3 + 0.9 * z, 0.0, 0.85)  # magnitude-limited samples redden with z

    zg, comoving = _distance_table()
    d_c = np.interp(z, zg, comoving)
    d_lum, d_ang = d_c * (1 + z), d_c / (1 + z)
    distance_modulus = 5 * np.log10(d_lum * 1e6 / 10)

    # Absolute magnitude limited so that the apparent r lies in the main-sample range.
    m_hi = R_LIMIT - distance_modulus
    m_lo = np.minimum(np.maximum(R_BRIGHT - distance_modulus, -25.0), m_hi - 0.05)
    absolute_r = _truncated_logistic(rng, np.where(red, -21.2, -20.6), 0.5, m_lo, m_hi)
    r_mag = absolute_r + distance_modulus

    base = np.where(red[:, None], _COLOUR_BASE["red"], _COLOUR_BASE["blue"])
    slope = np.where(red[:, None], _COLOUR_SLOPE["red"], _COLOUR_SLOPE["blue"])
    colours = base + slope * z[:, None] + rng.normal(0.0, _COLOUR_SCATTER, (n, 4))
    u_g, g_r, r_i, i_z = colours.T
    g_mag = r_mag + g_r
    i_mag = r_mag - r_i
    true_mags = np.stack([g_mag + u_g, g_mag, r_mag, i_mag, i_mag - i_z], axis=1)
    magnitudes = true_mags + rng.normal(0.0, _MAG_ERROR, (n, 5))

    # Structure: half-light size from luminosity, Sersic index and axis ratio from type.
    log_re_kpc = 0.55 - 0.15 * (absolute_r + 21.0) - 0.1 * red + rng.normal(0.0, 0.15, n)
    kpc_per_arcsec = d_ang * 1e3 * math.pi / 648_000
    re_px = np.clip(10**log_re_kpc / kpc_per_arcsec / PIXEL_ARCSEC, 0.8, 25.0)
    sersic_n = np.where(red, np.clip(rng.normal(4.0, 0.6, n), 2.0, 6.0), np.clip(rng.normal(1.0, 0.25, n), 0.5, 2.0))
    axis_ratio = np.where(red, rng.uniform(0.55, 1.0, n), rng.uniform(0.2, 1.0, n))
    angle = rng.uniform(0.0, math.pi, n)
    centre = rng.normal(0.0, 0.4, (n, 2)) + (RENDER - 1) / 2
    gradient = np.where(red[:, None], _SIZE_GRADIENT["red"], _SIZE_GRADIENT["blue"])
    re_band = (re_px[:, None] * (1 + gradient)).astype(np.float32)  # [n, 5]
    seeing_arcsec = np.clip(rng.normal(1.35, 0.2, n), 0.9, 2.2).astype(np.float32)
    psf_sigma = seeing_arcsec[:, None] * _PSF_BAND_FACTOR / 2.3548 / PIXEL_ARCSEC  # [n, 5] pixels

    images = _render(re_band, sersic_n, axis_ratio, angle, centre, true_mags, psf_sigma)
    variance = _SKY_SIGMA[None, :, None, None] ** 2 + np.maximum(images, 0) * _SOURCE_NOISE[None, :, None, None]
    images += rng.standard_normal(images.shape, dtype=np.float32) * np.sqrt(variance)

    ids = np.arange(block * BLOCK, (block + 1) * BLOCK, dtype=np.int64)
    return GalaxyBatch(images, magnitudes.astype(np.float64), z.astype(np.float32), ids)


def _render(re_band, sersic_n, axis_ratio, angle, centre, true_mags, psf_sigma) -> np.ndarray:
    n = len(sersic_n)
    f32 = np.float32
    coords = np.arange(RENDER, dtype=f32)
    dx = coords[None, None, :] - centre[:, 0, None, None].astype(f32)  # [n, 1, W]
    dy = coords[None, :, None] - centre[:, 1, None, None].astype(f32)  # [n, H, 1]
    cos, sin = np.cos(angle).astype(f32)[:, None, None], np.sin(angle).astype(f32)[:, None, None]
    major = dx * cos + dy * sin
    minor = (dy * cos - dx * sin) / axis_ratio.astype(f32)[:, None, None]
    radius = np.sqrt(major**2 + minor**2)[:, None]  # [n, 1, H, W]

    inv_n = (1 / sersic_n).astype(f32)[:, None, None, None]
    b = _sersic_b(sersic_n).astype(f32)[:, None, None, None]
    # In place on the one [n, 5, H, W] array: fresh 20 MB temporaries per step cost more than the maths.
    profile = radius / re_band[:, :, None, None]
    np.power(profile, inv_n, out=profile)
    profile -= 1
    profile *= -b
    # Light below e^-40 of the half-light level is set to exactly zero: such values would otherwise make float32
    # denormals in the products below, and x86 computes with denormals many times slower.
    negligible = profile < -40
    np.exp(profile, out=profile)
    np.putmask(profile, negligible, 0)
    # Flux per band (nanomaggies) spread over the rendered region.
    flux = (10 ** ((22.5 - true_mags) / 2.5)).astype(f32)
    profile *= (flux / profile.sum(axis=(2, 3)))[:, :, None, None]

    # The Gaussian PSF is separable: blurred = K @ profile @ K^T, with K [32 out x 48 in] per object and band,
    # which also crops to the centre and, unlike an FFT, wraps no light around the edges.
    offsets = (np.arange(PAD, PAD + IMAGE_SIZE, dtype=f32)[:, None] - coords[None, :])[None, None]  # [1,1,32,W]
    two_var = (2 * psf_sigma.astype(f32) ** 2)[:, :, None, None]
    exponent = -(offsets**2) / two_var
    kernel = np.where(exponent < -27, 0, np.exp(np.maximum(exponent, -27)))  # zero, not denormal, far out
    whole_line = np.arange(-RENDER, RENDER + 1, dtype=f32)[None, None, None, :]
    kernel /= np.exp(-(whole_line**2) / two_var).sum(axis=3, keepdims=True)
    blurred = np.matmul(np.matmul(kernel, profile), kernel.transpose(0, 1, 3, 2))
    assert blurred.shape == (n, 5, IMAGE_SIZE, IMAGE_SIZE)
    return np.ascontiguousarray(blurred, dtype=f32)


def generate(seed: int, start: int, stop: int) -> GalaxyBatch:
    """Galaxies ``start`` .. ``stop - 1`` of the data set drawn from ``seed``."""
    if not 0 <= start < stop:
        raise ValueError(f"bad object range {start}..{stop}")
    pieces = []
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        drawn = _cached_block(seed, block)
        lo, hi = max(start - block * BLOCK, 0), min(stop - block * BLOCK, BLOCK)
        pieces.append([drawn.images[lo:hi], drawn.magnitudes[lo:hi], drawn.redshift[lo:hi], drawn.object_id[lo:hi]])
    return GalaxyBatch(*(np.concatenate(column) for column in zip(*pieces, strict=True)))


# Consecutive partitions share their boundary block; keeping the last two drawn avoids drawing it twice.
_cached_block = lru_cache(maxsize=2)(_draw_block)

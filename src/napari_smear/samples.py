"""Sample data: a synthetic Wright-Giemsa smear with ground truth, and real BCCD fields.

Core module: no napari, no Qt.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = [
    "BCCD_BASE_URL",
    "BCCD_SHA256",
    "synthetic_smear",
    "eyepiece_photo",
    "fetch_bccd_sample",
]

#: Where :func:`fetch_bccd_sample` downloads from (the public BCCD_Dataset repository).
BCCD_BASE_URL = "https://raw.githubusercontent.com/Shenggan/BCCD_Dataset/master/BCCD/JPEGImages/"

#: Pinned sha256 of the BCCD fields :func:`fetch_bccd_sample` may download.
BCCD_SHA256 = {
    "BloodImage_00000": "e1dcc488889acba247a895df7be839e514850030217b4025048619f664fd4cb3",
    "BloodImage_00001": "791ac5f11494bb9c0ce39080d25fc97731f7584a6df99fac2555a3d1613dfe9a",
    "BloodImage_00002": "5d2b7aec254e54424feccff89587d81439005e78bb107840c2aa7535bfaf6fb6",
    "BloodImage_00003": "3098554473a0058685116a6229494d2e960603eec8e949a80baafc24766e8492",
}

#: Environment variable that overrides the download cache directory.
CACHE_ENV = "NAPARI_SMEAR_CACHE"

# Colours of a Wright-Giemsa smear under bright-field (RGB, as they appear on the glass).
BACKGROUND_RGB = (225.0, 215.0, 215.0)
RBC_RGB = (200.0, 120.0, 120.0)
RBC_PALLOR_RGB = (220.0, 178.0, 178.0)
WBC_CYTOPLASM_RGB = {
    "neutrophil": (205.0, 188.0, 218.0),  # pale lilac, fine granules
    "lymphocyte": (175.0, 180.0, 222.0),  # light sky-blue rim
}
NUCLEUS_RGB = (90.0, 40.0, 120.0)
PLATELET_RGB = (145.0, 90.0, 165.0)

# The first two are the WBC subtypes the generator draws, cycling so both appear.
_WBC_SUBTYPES = ("neutrophil", "lymphocyte")


def synthetic_smear(
    shape: tuple[int, int] = (480, 640),
    *,
    rbc_diameter_px: float = 40.0,
    n_rbc: int | None = None,
    n_wbc: int = 2,
    n_platelets: int = 6,
    seed: int = 0,
    overlap: bool = True,
) -> tuple[np.ndarray, dict]:
    """Draw a synthetic Wright-Giemsa blood smear field with its ground truth.

    Red cells are pink-red discs (slightly elliptic, size jitter) with a paler centre
    (central pallor); white cells are 1.6-2 red-cell diameters wide with a light
    purple-blue cytoplasm and a dark purple nucleus, lobed (2-4 overlapping blobs) for
    neutrophils and round for lymphocytes; platelets are small purple dots. Cells absorb
    light multiplicatively, so overlapping cells are darker where they overlap. A mild
    illumination gradient, a Gaussian blur (sigma 1) and noise finish the field.

    Parameters
    ----------
    shape : (int, int)
        Height and width in pixels.
    rbc_diameter_px : float
        Mean red-cell diameter in pixels (sets the scale of everything).
    n_rbc : int, optional
        Number of red cells. Default: enough to cover about 30% of the field.
    n_wbc : int
        Number of white cells; subtypes alternate neutrophil, lymphocyte, ...
    n_platelets : int
        Number of platelets.
    seed : int
        Seed of the :class:`numpy.random.Generator`; the same arguments give the same
        image and truth.
    overlap : bool
        If True, about 12% of the red cells are drawn as touching/overlapping pairs.

    Returns
    -------
    rgb : numpy.ndarray
        (H, W, 3) uint8 image.
    truth : dict
        ``labels`` (H, W) uint32 instance ids (0 background; where cells overlap the
        one drawn on top owns the pixel), ``nuclei`` (H, W) uint32 (nucleus pixels of
        each white cell carrying its id), ``cell_types`` {id: "wbc" | "rbc" |
        "platelet"}, ``wbc_types`` {id: "neutrophil" | "lymphocyte"},
        ``overlapping_pairs`` list of (id, id) red-cell pairs drawn overlapping, and
        ``rbc_diameter_px``.

    Raises
    ------
    ValueError
        For a bad shape or count, or when the requested cells do not fit the field.
    """
    from scipy import ndimage

    height, width = _check_shape(shape)
    diameter = float(rbc_diameter_px)
    if not np.isfinite(diameter) or diameter < 6.0:
        raise ValueError(f"rbc_diameter_px must be at least 6, got {rbc_diameter_px}")
    for name, value in (("n_wbc", n_wbc), ("n_platelets", n_platelets)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    radius = diameter / 2.0
    if n_rbc is None:
        n_rbc = int(round(0.30 * height * width / (math.pi * radius**2)))
    if int(n_rbc) != n_rbc or n_rbc < 0:
        raise ValueError(f"n_rbc must be a non-negative integer, got {n_rbc!r}")
    n_rbc, n_wbc, n_platelets = int(n_rbc), int(n_wbc), int(n_platelets)

    rng = np.random.default_rng(seed)
    placer = _DiscPlacer(height, width, rng)
    cells: list[dict] = []

    # White cells first: they are big and must fit whole.
    for index in range(n_wbc):
        subtype = _WBC_SUBTYPES[index % len(_WBC_SUBTYPES)]
        factor = rng.uniform(1.8, 2.0) if subtype == "neutrophil" else rng.uniform(1.6, 1.7)
        cell_radius = radius * factor
        center = placer.place(cell_radius, margin=cell_radius + 2.0, gap=3.0)
        if center is None:
            raise ValueError(
                f"could not fit {n_wbc} white cells of ~{2 * cell_radius:.0f} px into a "
                f"{height} x {width} field; use a larger shape or fewer cells"
            )
        cells.append(_wbc_spec(center, cell_radius, subtype, rng))

    for _ in range(n_platelets):
        cell_radius = radius * 0.25 * rng.uniform(0.8, 1.2)  # ~0.25 RBC diameters
        center = placer.place(cell_radius, margin=cell_radius + 1.0, gap=3.0)
        if center is None:
            raise ValueError(
                f"could not fit {n_platelets} platelets into the field; use fewer cells"
            )
        cells.append(_platelet_spec(center, cell_radius, rng))

    n_pairs = int(round(0.06 * n_rbc)) if overlap and n_rbc >= 2 else 0
    pairs: list[tuple[int, int]] = []
    rbc_placed = 0
    for _ in range(n_pairs):
        first_radius, second_radius = (radius * rng.uniform(0.92, 1.08) for _ in range(2))
        first = placer.place(first_radius, margin=first_radius + 1.0, gap=3.0)
        if first is None:
            break
        second = placer.place_partner(first, first_radius, second_radius, gap=3.0)
        if second is None:
            placer.forget_last()
            break
        cells.append(_rbc_spec(first, first_radius, rng))
        cells.append(_rbc_spec(second, second_radius, rng))
        pairs.append((len(cells) - 1, len(cells)))  # 1-based ids of the two
        rbc_placed += 2
    while rbc_placed < n_rbc:
        cell_radius = radius * rng.uniform(0.92, 1.08)
        # Centres may lie near the border (cells cut by it), as on a real field.
        center = placer.place(cell_radius, margin=0.2 * cell_radius, gap=2.0)
        if center is None:
            raise ValueError(
                f"could only fit {rbc_placed} of {n_rbc} red cells of ~{diameter:.0f} px "
                f"into a {height} x {width} field without overlaps; lower n_rbc"
            )
        cells.append(_rbc_spec(center, cell_radius, rng))
        rbc_placed += 1

    # Render: each cell multiplies the light by its transmittance (Beer-Lambert), drawn
    # bottom to top: red cells, platelets, white cells.
    background = np.asarray(BACKGROUND_RGB, np.float32)
    transmittance = np.ones((height, width, 3), np.float32)
    labels = np.zeros((height, width), np.uint32)
    nuclei = np.zeros((height, width), np.uint32)
    draw_order = {"rbc": 0, "platelet": 1, "wbc": 2}
    ids = sorted(range(1, len(cells) + 1), key=lambda i: draw_order[cells[i - 1]["type"]])
    for cell_id in ids:
        _draw_cell(cells[cell_id - 1], cell_id, background, transmittance, labels, nuclei)

    image = background * transmittance
    # Mild illumination gradient (+-4%) in a random direction.
    angle = rng.uniform(0.0, 2.0 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (math.cos(angle) * (xx / width - 0.5) + math.sin(angle) * (yy / height - 0.5)) * 2
    image *= (1.0 + 0.04 * ramp)[..., None]
    image = ndimage.gaussian_filter(image, sigma=(1.0, 1.0, 0.0))
    image += rng.normal(0.0, 2.5, image.shape).astype(np.float32)
    rgb = np.clip(np.round(image), 0, 255).astype(np.uint8)

    truth = {
        "labels": labels,
        "nuclei": nuclei,
        "cell_types": {i: cells[i - 1]["type"] for i in range(1, len(cells) + 1)},
        "wbc_types": {
            i: cells[i - 1]["subtype"]
            for i in range(1, len(cells) + 1)
            if cells[i - 1]["type"] == "wbc"
        },
        "overlapping_pairs": pairs,
        "rbc_diameter_px": diameter,
    }
    return rgb, truth


def eyepiece_photo(
    image: np.ndarray, *, radius: float = 0.55, fade: float = 0.0, vignette: float = 0.0, frame: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A field as a phone photographs it through a microscope eyepiece: a round view
    in a black frame, for testing and benchmarking on real fields.

    Parameters
    ----------
    image : (H, W, 3) uint8
        The field.
    radius : float
        Radius of the view as a share of the image's short side (0.55: the view is cut
        by the long sides, as a phone's wider frame usually shows it).
    fade : float
        Width of the rim over which the light falls to black, as a share of the radius
        (0: a sharp field stop).
    vignette : float
        Light lost at the radius inside the view (the lens darkens towards the rim,
        in proportion to the squared distance from the centre).
    frame : bool
        Black out everything beyond the radius (False: the vignetting alone, over the
        whole image, as a camera lens without an eyepiece gives it).
    seed : int
        Seed of the sensor noise in the black.

    Returns
    -------
    photo : (H, W, 3) uint8
    radial : (H, W) float
        Each pixel's distance from the centre as a share of the view's radius (the
        view is ``radial < 1``).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    radial = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) / (radius * min(h, w))
    if not frame:
        light = np.ones((h, w))
    elif fade > 0:
        t = np.clip((1 - radial) / fade, 0, 1)
        light = t * t * (3 - 2 * t)
    else:
        light = (radial < 1).astype(np.float64)
    light = light * np.clip(1 - vignette * radial**2, 0, 1)
    noise = np.random.default_rng(seed).integers(0, 10, image.shape) * (frame & (light[..., None] < 0.5))
    photo = np.clip(image * light[..., None] + noise, 0, 255).astype(np.uint8)
    return photo, radial


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (height, width), got {shape!r}") from None
    if height < 16 or width < 16 or (height, width) != tuple(shape):
        raise ValueError(f"shape must be two integers >= 16, got {shape!r}")
    return height, width


class _DiscPlacer:
    """Random sequential placement of discs that keep a gap to each other."""

    def __init__(self, height: int, width: int, rng: np.random.Generator, attempts: int = 400):
        self.height, self.width, self.rng, self.attempts = height, width, rng, attempts
        self.centers: list[tuple[float, float]] = []
        self.radii: list[float] = []

    def _fits(self, y: float, x: float, radius: float, gap: float, ignore: int = -1) -> bool:
        if not self.centers:
            return True
        centers = np.asarray(self.centers)
        distance = np.hypot(centers[:, 0] - y, centers[:, 1] - x)
        needed = np.asarray(self.radii) + radius + gap
        if ignore >= 0:
            needed[ignore] = 0.0
        return bool(np.all(distance >= needed))

    def place(self, radius: float, *, margin: float, gap: float) -> tuple[float, float] | None:
        low_y, high_y = margin, self.height - margin
        low_x, high_x = margin, self.width - margin
        if high_y <= low_y or high_x <= low_x:
            return None
        for _ in range(self.attempts):
            y, x = self.rng.uniform(low_y, high_y), self.rng.uniform(low_x, high_x)
            if self._fits(y, x, radius, gap):
                self.centers.append((y, x))
                self.radii.append(radius)
                return y, x
        return None

    def place_partner(
        self, first: tuple[float, float], first_radius: float, radius: float, *, gap: float
    ) -> tuple[float, float] | None:
        """A disc overlapping ``first`` (the last placed) by 5-22% of the radii sum."""
        for _ in range(self.attempts // 4):
            angle = self.rng.uniform(0.0, 2.0 * math.pi)
            distance = self.rng.uniform(0.78, 0.95) * (first_radius + radius)
            y = first[0] + distance * math.sin(angle)
            x = first[1] + distance * math.cos(angle)
            inside = radius + 1.0 <= y <= self.height - radius - 1.0 and (
                radius + 1.0 <= x <= self.width - radius - 1.0
            )
            if inside and self._fits(y, x, radius, gap, ignore=len(self.centers) - 1):
                self.centers.append((y, x))
                self.radii.append(radius)
                return y, x
        return None

    def forget_last(self) -> None:
        self.centers.pop()
        self.radii.pop()


def _jitter_color(rgb: tuple[float, float, float], rng: np.random.Generator, amount: float):
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount), 0, 255)


def _rbc_spec(center, radius, rng) -> dict:
    aspect = rng.uniform(0.88, 1.0)
    return {
        "type": "rbc",
        "subtype": None,
        "center": center,
        "radii": (radius * math.sqrt(aspect), radius / math.sqrt(aspect)),  # same area
        "angle": rng.uniform(0.0, math.pi),
        "color": _jitter_color(RBC_RGB, rng, 8.0),
        "pallor_color": _jitter_color(RBC_PALLOR_RGB, rng, 6.0),
        "pallor": rng.uniform(0.38, 0.5),  # pallor radius as a fraction of the cell's
    }


def _platelet_spec(center, radius, rng) -> dict:
    aspect = rng.uniform(0.7, 1.0)
    return {
        "type": "platelet",
        "subtype": None,
        "center": center,
        "radii": (radius * aspect, radius),
        "angle": rng.uniform(0.0, math.pi),
        "color": _jitter_color(PLATELET_RGB, rng, 10.0),
    }


def _wbc_spec(center, radius, subtype, rng) -> dict:
    aspect = rng.uniform(0.92, 1.0)
    if subtype == "neutrophil":
        n_lobes = int(rng.integers(2, 5))
        step = math.radians(rng.uniform(65.0, 80.0))
        start = rng.uniform(0.0, 2.0 * math.pi)
        arc = 0.42 * radius
        lobes = [
            (
                arc * math.sin(start + k * step),
                arc * math.cos(start + k * step),
                0.32 * radius * rng.uniform(0.9, 1.1),
            )
            for k in range(n_lobes)
        ]
    else:
        offset = 0.08 * radius
        angle = rng.uniform(0.0, 2.0 * math.pi)
        lobes = [(offset * math.sin(angle), offset * math.cos(angle), 0.76 * radius)]
    return {
        "type": "wbc",
        "subtype": subtype,
        "center": center,
        "radii": (radius * aspect, radius),
        "angle": rng.uniform(0.0, math.pi),
        "color": _jitter_color(WBC_CYTOPLASM_RGB[subtype], rng, 6.0),
        "nucleus_color": _jitter_color(NUCLEUS_RGB, rng, 8.0),
        "lobes": lobes,  # (dy, dx, radius) relative to the cell centre
    }


def _draw_cell(cell, cell_id, background, transmittance, labels, nuclei) -> None:
    height, width = labels.shape
    cy, cx = cell["center"]
    ry, rx = cell["radii"]
    reach = max(ry, rx) + 3.0
    y0, y1 = max(int(cy - reach), 0), min(int(math.ceil(cy + reach)) + 1, height)
    x0, x1 = max(int(cx - reach), 0), min(int(math.ceil(cx + reach)) + 1, width)
    if y1 <= y0 or x1 <= x0:
        return
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy -= cy
    dx -= cx
    cos, sin = math.cos(cell["angle"]), math.sin(cell["angle"])
    u, v = cos * dy + sin * dx, -sin * dy + cos * dx
    rho = np.sqrt((u / ry) ** 2 + (v / rx) ** 2)  # 1 on the outline
    # Anti-aliased coverage: signed distance to the outline in pixels, +-0.5 ramp.
    coverage = np.clip((1.0 - rho) * 0.5 * (ry + rx) + 0.5, 0.0, 1.0)

    color = np.broadcast_to(cell["color"], rho.shape + (3,)).astype(np.float32)
    nucleus = None
    if cell["type"] == "rbc":
        pallor = np.clip(1.0 - (rho / cell["pallor"]) ** 2, 0.0, 1.0)[..., None]
        rim = np.exp(-(((rho - 0.85) / 0.12) ** 2))[..., None]  # thicker, darker rim
        color = color * (1.0 - 0.85 * pallor) + cell["pallor_color"] * 0.85 * pallor
        color = color * (1.0 - 0.06 * rim)
    elif cell["type"] == "wbc":
        nucleus = np.zeros(rho.shape, np.float32)
        for ly, lx, lr in cell["lobes"]:
            distance = np.hypot(dy - ly, dx - lx)
            nucleus = np.maximum(nucleus, np.clip(lr - distance + 0.5, 0.0, 1.0))
        color = color * (1.0 - nucleus[..., None]) + cell["nucleus_color"] * nucleus[..., None]

    cell_transmittance = np.clip(color / background, 1e-3, 1.0)
    transmittance[y0:y1, x0:x1] *= cell_transmittance ** coverage[..., None]
    inside = coverage >= 0.5
    labels[y0:y1, x0:x1][inside] = cell_id
    if nucleus is not None:
        nuclei[y0:y1, x0:x1][inside & (nucleus >= 0.5)] = cell_id


# where the offline sample is, for a GUI user and for a script
_SYNTHETIC_SAMPLE_WAYS = (
    "in napari File > Open Sample > napari-smear > Synthetic smear (offline); "
    "in a script napari_smear.samples.synthetic_smear()"
)


def fetch_bccd_sample(name: str = "BloodImage_00000") -> Path:
    """Download (once) a BCCD blood-smear field and return its local path.

    The file is checked against a pinned sha256 (:data:`BCCD_SHA256`) and cached in
    the user cache directory (``$NAPARI_SMEAR_CACHE`` if set); later calls work offline.

    Parameters
    ----------
    name : str
        A key of :data:`BCCD_SHA256`, e.g. ``"BloodImage_00000"`` (a 640 x 480 JPEG).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        For a name without a pinned hash.
    RuntimeError
        When the download fails (no network?) or the file does not match its hash.
    """
    import pooch

    if name not in BCCD_SHA256:
        raise ValueError(
            f"no pinned BCCD sample named {name!r}; available: {', '.join(sorted(BCCD_SHA256))}"
        )
    fetcher = pooch.create(
        path=pooch.os_cache("napari-smear") / "bccd",
        base_url=BCCD_BASE_URL,
        registry={f"{key}.jpg": f"sha256:{value}" for key, value in BCCD_SHA256.items()},
        env=CACHE_ENV,
    )
    try:
        return Path(fetcher.fetch(f"{name}.jpg"))
    except ValueError as exc:  # pooch's hash mismatch
        raise RuntimeError(
            f"the downloaded BCCD sample {name!r} does not match its pinned sha256 "
            f"({exc}); use the synthetic sample instead: {_SYNTHETIC_SAMPLE_WAYS}"
        ) from exc
    except Exception as exc:  # requests' ConnectionError, HTTPError, timeouts, OSError
        raise RuntimeError(
            f"could not download the BCCD sample {name!r} (no network?): "
            f"{type(exc).__name__}: {exc}. Use the synthetic sample instead: {_SYNTHETIC_SAMPLE_WAYS}"
        ) from exc


"""The tissue painter: synthetic, SICAPv2-like 512x512 patches of the kit's four classes.

Eosin-pink stroma and haematoxylin-purple nuclei, with one texture per class:

- NC: a few large round glands, white lumen lined by a ring of nuclei;
- G3: many small, densely packed round glands with small lumens;
- G4: fused irregular cribriform masses (large blobs pierced by several small holes);
- G5: sheets of isolated scattered nuclei, no lumens;
- no label: stroma only.

It also holds the kit's classes and its random streams: each image (and each table, and the
names) draws from its own generator ``rng(split, index)``, derived from one fixed seed, so a
patch is the same whatever else is drawn. Geometry is expressed for 512 px and scaled, so a
patch can be drawn smaller (pre-training images, tests) with the same look.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("NC", "G3", "G4", "G5")
PATCH_SIZE = 512

SEED = 20_240_601
# split ids used to derive independent per-image random streams
SPLIT_IDS = {"train": 1, "test": 2, "pretrain": 3, "names": 4, "tables": 5}


def rng(split: str, index: int, extra: int = 0) -> np.random.Generator:
    """The random stream of image ``index`` of ``split`` (a key of ``SPLIT_IDS``)."""
    return np.random.default_rng([SEED, SPLIT_IDS[split], index, extra])


def _clip_colour(c) -> tuple[int, int, int]:
    c = np.clip(np.rint(c), 0, 255).astype(int)
    return int(c[0]), int(c[1]), int(c[2])


class _Painter:
    """Draws one tissue-like patch of side ``size``; geometry is expressed for 512 px."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.rng = rng
        self.size = size
        self.s = size / PATCH_SIZE
        u = rng.uniform
        # per-image stain jitter
        self.eosin = np.array([230.0, 158.0, 198.0]) + rng.normal(0, 1, 3) * [7, 14, 10]
        self.hema = np.array([78.0, 44.0, 128.0]) + rng.normal(0, 1, 3) * [14, 10, 16]
        mix = u(0.12, 0.30)
        self.cyto = self.eosin * (1 - mix) + self.hema * mix + rng.normal(0, 4, 3)
        self.lumen = np.array([246.0, 240.0, 246.0]) + rng.normal(0, 3, 3)
        self.img = self._background()
        self.draw = ImageDraw.Draw(self.img)

    # -- primitives -------------------------------------------------------------------
    def _background(self) -> Image.Image:
        rng = self.rng
        low = rng.normal(0, 1, (6, 6, 1)) * 9 + rng.normal(0, 1, (6, 6, 3)) * 4
        arr = np.clip(self.eosin + low, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB").resize((self.size, self.size), Image.BILINEAR)
        return img

    def ellipse(self, cx, cy, rx, ry, fill) -> None:
        self.draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_clip_colour(fill))

    def nucleus(self, cx, cy, r=None) -> None:
        rng, s = self.rng, self.s
        r = (r if r is not None else rng.uniform(3.5, 6.0)) * s
        r = max(r, 0.6)
        asp = rng.uniform(0.7, 1.3)
        self.ellipse(cx, cy, r * asp, r / asp, self.hema + rng.normal(0, 9))

    def fibres(self, n: int) -> None:
        rng, s = self.rng, self.s
        for _ in range(n):
            x0, y0 = rng.uniform(0, self.size, 2)
            ang = rng.uniform(0, math.pi)
            length = rng.uniform(80, 260) * s
            x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
            shade = self.eosin + rng.normal(0, 1) * 14 + [-6, -14, -6]
            self.draw.line([x0, y0, x1, y1], fill=_clip_colour(shade),
                           width=max(1, int(round(rng.uniform(1.5, 4.5) * s))))

    def stray_nuclei(self, n: int) -> None:
        rng = self.rng
        for _ in range(n):
            self.nucleus(*rng.uniform(0, self.size, 2), r=rng.uniform(2.5, 4.5))

    def _place(self, radii, min_gap: float, tries: int) -> list[tuple[float, float, float]]:
        """Rejection-sample non-overlapping centres for the given radii (may spill off-image)."""
        rng, placed = self.rng, []
        margin = 0.25 * self.size
        for r in radii:
            for _ in range(tries):
                x, y = rng.uniform(-margin * 0.3, self.size + margin * 0.3, 2)
                if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + min_gap) ** 2 for px, py, pr in placed):
                    placed.append((x, y, r))
                    break
        return placed

    def gland(self, cx, cy, r, lumen_frac, nuc_gap) -> None:
        rng, s = self.rng, self.s
        asp = rng.uniform(0.8, 1.25)
        rx, ry = r * asp, r / asp
        self.ellipse(cx, cy, rx, ry, self.cyto + rng.normal(0, 4, 3))
        self.ellipse(cx, cy, rx * lumen_frac, ry * lumen_frac, self.lumen + rng.normal(0, 2, 3))
        ring = (1 + lumen_frac) / 2 + 0.12 * (1 - lumen_frac)
        n = max(5, int(2 * math.pi * r / (nuc_gap * s)))
        phase = rng.uniform(0, 2 * math.pi)
        for k in range(n):
            t = phase + 2 * math.pi * k / n + rng.normal(0, 0.08)
            rr = ring + rng.normal(0, 0.03)
            self.nucleus(cx + rx * rr * math.cos(t), cy + ry * rr * math.sin(t))

    # -- classes ----------------------------------------------------------------------
    def paint_nc(self) -> None:
        rng, s = self.rng, self.s
        self.fibres(int(rng.integers(8, 18)))
        self.stray_nuclei(int(rng.integers(10, 30)))
        radii = rng.uniform(55, 100, int(rng.integers(2, 5))) * s
        for x, y, r in self._place(radii, 12 * s, 40):
            self.gland(x, y, r, rng.uniform(0.6, 0.78), rng.uniform(10, 13))

    def paint_g3(self) -> None:
        rng, s = self.rng, self.s
        self.fibres(int(rng.integers(4, 10)))
        self.stray_nuclei(int(rng.integers(5, 20)))
        radii = rng.uniform(16, 30, int(rng.integers(50, 90))) * s
        for x, y, r in self._place(radii, rng.uniform(1, 6) * s, 25):
            self.gland(x, y, r, rng.uniform(0.28, 0.5), rng.uniform(8, 10))

    def paint_g4(self) -> None:
        rng, s = self.rng, self.s
        self.fibres(int(rng.integers(4, 10)))
        self.stray_nuclei(int(rng.integers(5, 20)))
        for _ in range(int(rng.integers(2, 4))):
            bx, by = rng.uniform(0.1, 0.9, 2) * self.size
            base = rng.uniform(70, 125) * s
            comps = []
            for _ in range(int(rng.integers(4, 9))):
                ox, oy = rng.normal(0, 0.45, 2) * base
                rx, ry = rng.uniform(0.35, 0.7, 2) * base
                comps.append((bx + ox, by + oy, rx, ry))
                self.ellipse(bx + ox, by + oy, rx, ry, self.cyto + rng.normal(0, 3, 3))
            # dense nuclei throughout the fused mass
            for _ in range(int(rng.integers(90, 180))):
                cx, cy, rx, ry = comps[int(rng.integers(len(comps)))]
                t, rr = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 0.85))
                self.nucleus(cx + rx * rr * math.cos(t), cy + ry * rr * math.sin(t))
            # several small punched-out holes (cribriform lumens)
            for _ in range(int(rng.integers(4, 11))):
                cx, cy, rx, ry = comps[int(rng.integers(len(comps)))]
                t, rr = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 0.5))
                h = rng.uniform(6, 15) * s
                self.ellipse(cx + rx * rr * math.cos(t), cy + ry * rr * math.sin(t),
                             h * rng.uniform(0.8, 1.2), h, self.lumen)

    def paint_g5(self) -> None:
        rng, s = self.rng, self.s
        self.fibres(int(rng.integers(3, 8)))
        centres = rng.uniform(0.15, 0.85, (int(rng.integers(1, 4)), 2)) * self.size
        for cx, cy in centres:  # faint cellular sheets
            r = rng.uniform(90, 170) * s
            self.ellipse(cx, cy, r * rng.uniform(0.8, 1.2), r, self.eosin * 0.6 + self.cyto * 0.4)
        n = int(rng.integers(220, 480))
        for _ in range(n):
            if rng.uniform() < 0.7:
                cx, cy = centres[int(rng.integers(len(centres)))]
                x, y = rng.normal([cx, cy], rng.uniform(60, 140) * s)
            else:
                x, y = rng.uniform(0, self.size, 2)
            self.nucleus(x, y, r=rng.uniform(3.5, 7.0))

    def paint_stroma(self) -> None:  # no label: stroma only
        rng = self.rng
        self.fibres(int(rng.integers(25, 45)))
        self.stray_nuclei(int(rng.integers(20, 50)))

    def finish(self) -> np.ndarray:
        rng, s = self.rng, self.s
        img = self.img.filter(ImageFilter.GaussianBlur(max(0.3, rng.uniform(0.8, 1.8) * s)))
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0.0, rng.uniform(3, 7), arr.shape).astype(np.float32)
        return np.clip(arr, 0, 255).astype(np.uint8)


def draw_patch(rng: np.random.Generator, cls: str | None, size: int = PATCH_SIZE) -> np.ndarray:
    """One synthetic tissue patch (H, W, 3 uint8) of class ``cls`` (None: stroma, no label)."""
    p = _Painter(rng, size)
    {"NC": p.paint_nc, "G3": p.paint_g3, "G4": p.paint_g4, "G5": p.paint_g5, None: p.paint_stroma}[cls]()
    return p.finish()


def draw_mixed(rng: np.random.Generator, a: str, b: str, size: int = PATCH_SIZE) -> np.ndarray:
    """A patch whose left part shows class ``a`` and right part class ``b`` (two labels)."""
    left, right = draw_patch(rng, a, size), draw_patch(rng, b, size)
    split = int(rng.uniform(0.35, 0.65) * size)
    out = right.copy()
    out[:, :split] = left[:, :split]
    return out


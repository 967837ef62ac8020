"""The generated dataset in SICAPv2's layout: patch names, partition tables, images.

``<root>/images/<name>.jpg`` holds RGB 512x512 patches with SICAPv2-style names, and
``<root>/partition/Test/{Train,Test}.xlsx`` the tables with the columns
``image_name, NC, G3, G4, G5, G4C``: single-label rows per class, and in Train a few rows with
two labels (a mixed patch) and with none (stroma). Slides are split by patient between Train
and Test. The tables are written as .xlsx files with fixed timestamps, so that every build
writes the same bytes. Here too the Test table is read back for the kit's zero-shot check.
"""

from __future__ import annotations

import io
import re
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from hpo_peft.demo_kit import tissue
from hpo_peft.demo_kit.tissue import CLASSES

COLUMNS = ("image_name", "NC", "G3", "G4", "G5", "G4C")
SPLITS = (("train", "Train.xlsx"), ("test", "Test.xlsx"))
PARTITION = Path("partition", "Test")  # where SICAPv2 keeps the two tables

N_TRAIN_PER_CLASS = 48
N_TEST_PER_CLASS = 24
N_TRAIN_MULTI = 5  # rows with two labels set
N_TRAIN_EMPTY = 5  # rows with no label set
G4C_FRACTION = 1 / 3  # share of G4 rows flagged as cribriform


def _sicap_names(count: int, slides: list[str], rng: np.random.Generator, taken: set[str]) -> list[str]:
    """Unique SICAPv2-style patch names such as
    ``16B0001851_Block_Region_1_0_0_xini_6827_yini_59786.jpg``."""
    names: list[str] = []
    while len(names) < count:
        slide = slides[int(rng.integers(len(slides)))]
        region = int(rng.integers(1, 13))
        i, j = int(rng.integers(0, 12)), int(rng.integers(0, 12))
        x, y = int(rng.integers(2_000, 60_000)), int(rng.integers(10_000, 90_000))
        name = f"{slide}_Block_Region_{region}_{i}_{j}_xini_{x}_yini_{y}.jpg"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _slide_ids(rng: np.random.Generator, count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        sid = f"{int(rng.integers(16, 19))}B{int(rng.integers(1, 9_999_999)):07d}"
        if sid not in out:
            out.append(sid)
    return out


def _plan_split(split: str) -> list[dict]:
    """Rows (with the labels to draw) of one partition table, shuffled deterministically."""
    rng = tissue.rng("tables", tissue.SPLIT_IDS[split])
    per_class = N_TRAIN_PER_CLASS if split == "train" else N_TEST_PER_CLASS
    rows: list[dict] = []
    for cls in CLASSES:
        for _ in range(per_class):
            rows.append({"labels": (cls,)})
    if split == "train":
        pairs = [("NC", "G3"), ("G3", "G4"), ("G4", "G5"), ("G3", "G5"), ("NC", "G4")]
        for k in range(N_TRAIN_MULTI):
            rows.append({"labels": pairs[k % len(pairs)]})
        for _ in range(N_TRAIN_EMPTY):
            rows.append({"labels": ()})
    order = rng.permutation(len(rows))
    rows = [rows[int(k)] for k in order]
    g4_rows = [r for r in rows if "G4" in r["labels"]]
    n_crib = int(round(len(g4_rows) * G4C_FRACTION))
    for k in sorted(rng.choice(len(g4_rows), size=n_crib, replace=False)):
        g4_rows[int(k)]["g4c"] = 1
    return rows


def _deterministic_xlsx(path: Path, rows: list[list]) -> None:
    """Write an .xlsx with fixed document timestamps and zip entry dates (same bytes every build)."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(list(COLUMNS))
    for r in rows:
        ws.append(r)
    fixed = datetime(2020, 1, 1)
    wb.properties.creator = "hpo_peft.demo_kit"
    wb.properties.created = fixed
    wb.properties.modified = fixed
    buf = io.BytesIO()
    wb.save(buf)
    # openpyxl stamps the zip entries (and possibly docProps) with "now": normalise them
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = _fix_core_dates(data)
            zi = zipfile.ZipInfo(info.filename, date_time=(2020, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o600 << 16
            dst.writestr(zi, data)
    path.write_bytes(out.getvalue())


def _fix_core_dates(data: bytes) -> bytes:
    return re.sub(
        rb"(<dcterms:(created|modified)[^>]*>)[^<]*(</dcterms:\2>)",
        rb"\g<1>2020-01-01T00:00:00Z\g<3>",
        data,
    )


def count_images() -> int:
    """How many images ``write_dataset`` draws (one per table row)."""
    return sum(len(_plan_split(split)) for split, _ in SPLITS)


def write_dataset(root: Path, bar) -> dict:
    """Draw the images and write both tables under ``root``; returns the rows per split.
    ``bar`` (a tqdm bar) advances by one per image."""
    images = root / "images"
    part = root / PARTITION
    images.mkdir(parents=True)
    part.mkdir(parents=True)
    name_rng = tissue.rng("names", 0)
    slides = _slide_ids(name_rng, 30)
    slides_by_split = {"train": slides[:20], "test": slides[20:]}  # patient-level split
    taken: set[str] = set()
    counts = {}
    for split, table in SPLITS:
        plan = _plan_split(split)
        names = _sicap_names(len(plan), slides_by_split[split], name_rng, taken)
        rows = []
        for idx, (row, name) in enumerate(zip(plan, names)):
            rng = tissue.rng(split, idx)
            labels = row["labels"]
            if len(labels) == 2:
                arr = tissue.draw_mixed(rng, *labels)
            else:
                arr = tissue.draw_patch(rng, labels[0] if labels else None)
            Image.fromarray(arr, "RGB").save(images / name, format="JPEG", quality=90)
            rows.append([name] + [int(c in labels) for c in CLASSES] + [int(row.get("g4c", 0))])
            bar.update(1)
        _deterministic_xlsx(part / table, rows)
        counts[split] = len(rows)
    return counts


def read_test_images(root: Path) -> tuple[list[Image.Image], np.ndarray]:
    """The Test table's images (RGB) and class indices, in the table's order."""
    import pandas as pd

    df = pd.read_excel(root / PARTITION / "Test.xlsx")
    images = []
    for name in df["image_name"]:
        with Image.open(root / "images" / name) as img:
            images.append(img.convert("RGB"))
    labels = df[list(CLASSES)].to_numpy().argmax(axis=1)
    return images, labels

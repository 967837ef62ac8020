"""The search benchmark's kits besides the demo kit: other class counts, difficulty and base models.

Each kit is an image folder (`data.format: imagefolder`: `train/<class>/`, `test/<class>/`, and
`unseen/<class>/`, the thousands of images no study reads) and a CLIP-format model folder, so a
study reads it through exactly the package's own loading code. The patches are the demo kit's tissue
painter (`hpo_peft.demo_kit.tissue`), drawn at 128 px from image streams the demo kit never uses.

- `three-class-untrained`: three grades (the painter's G3, G4, G5) that look alike, each patch
  blended with a patch of another grade (up to 40 %) and noisier; the base model is the demo's tiny
  CLIP architecture with random weights, never trained: zero-shot is chance, only training learns.
- `five-class-pretrained`: the demo's four classes and stroma, five classes; the base model is the
  demo kit's pre-trained tiny CLIP (zero-shot above chance on its four classes, none on stroma).
- `four-class-untrained`: the demo's four classes, lightly blended (up to 20 %) and noisier, on the
  tiny CLIP architecture with random weights of its own: a second kit where only training learns,
  so a prior learned without one untrained kit still sees another.

    python benchmarks/kits.py            # builds them under local_data/bench-kits/ (idempotent)
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

KITS_DIR = ROOT / "local_data" / "bench-kits"
DRAW_SIZE = 128
KIT_FORMAT = 1  # bump when a kit's content changes


@dataclass(frozen=True)
class KitSpec:
    name: str
    classes: dict[str, str | None]  # folder name -> the painter's class (None: stroma)
    train_per_class: int
    test_per_class: int
    unseen_per_class: int
    blend: float  # up to this fraction of each patch is another class's patch
    noise: float  # extra pixel noise (std, 0-255)
    pretrained: bool  # the demo kit's pre-trained model, or the same architecture with random weights
    stream: int  # image streams start here (the demo kit's are below 20,000)


KITS = {
    "three-class-untrained": KitSpec("three-class-untrained", {"gleason3": "G3", "gleason4": "G4", "gleason5": "G5"},
                                     48, 48, 700, 0.4, 18.0, False, 100_000),
    "five-class-pretrained": KitSpec("five-class-pretrained", {"NC": "NC", "G3": "G3", "G4": "G4", "G5": "G5",
                                                               "stroma": None}, 48, 48, 400, 0.0, 0.0, True, 200_000),
    "four-class-untrained": KitSpec("four-class-untrained", {"NC": "NC", "G3": "G3", "G4": "G4", "G5": "G5"},
                                    48, 48, 500, 0.2, 10.0, False, 300_000),
}


def _patch(spec: KitSpec, cls: str | None, index: int) -> np.ndarray:
    from hpo_peft.demo_kit import tissue

    rng = tissue.rng("test", spec.stream + index)
    arr = tissue.draw_patch(rng, cls, DRAW_SIZE).astype(np.float32)
    if spec.blend:
        others = [c for c in spec.classes.values() if c != cls]
        other = tissue.draw_patch(rng, others[int(rng.integers(len(others)))], DRAW_SIZE).astype(np.float32)
        weight = rng.uniform(0, spec.blend)
        arr = (1 - weight) * arr + weight * other
    if spec.noise:
        arr = arr + rng.normal(0, spec.noise, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _write_images(spec: KitSpec, out: Path) -> dict:
    from PIL import Image
    from tqdm.auto import tqdm

    splits = {"train": spec.train_per_class, "test": spec.test_per_class, "unseen": spec.unseen_per_class}
    per_split = sum(splits.values())
    counts = {}
    with tqdm(total=per_split * len(spec.classes), desc=f"{spec.name}: images", unit="img") as bar:
        for c, (folder, cls) in enumerate(spec.classes.items()):
            start = c * per_split
            for split, n in splits.items():
                (out / split / folder).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.fromarray(_patch(spec, cls, start + i), "RGB").save(out / split / folder / f"{split}_{start + i}.png")
                    bar.update()
                start += n
                counts[f"{split}/{folder}"] = n
    return counts


def _write_model(spec: KitSpec, out: Path, demo: Path) -> None:
    import torch

    from hpo_peft.demo_kit import tiny_clip, tokenizer

    if spec.pretrained:
        shutil.copytree(demo / "model", out / "model")
        return
    tokenizer.write_tokenizer_files(out / "model")
    processor = tiny_clip.make_processor(out / "model")
    with torch.random.fork_rng():
        torch.manual_seed(spec.stream)
        model = tiny_clip.make_model(processor.tokenizer)  # the demo's architecture, random weights
    tiny_clip.save_quietly(model.eval(), processor, out / "model", progress=False)


def build_kit(name: str, demo: Path = ROOT / "local_data" / "demo") -> Path:
    """Build kit `name` under KITS_DIR (kept when complete); returns its folder."""
    from hpo_peft.demo_kit import build_demo_kit

    spec, out = KITS[name], KITS_DIR / name
    meta = out / "kit.json"
    if meta.exists() and json.loads(meta.read_text()).get("kit_format") == KIT_FORMAT:
        return out
    build_demo_kit(demo)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    counts = _write_images(spec, out)
    _write_model(spec, out, demo)
    meta.write_text(json.dumps({"kit_format": KIT_FORMAT, "spec": spec.__dict__, "images": counts}, indent=2))
    return out


def overrides(name: str, seed: int) -> list[str]:
    """A study's --set overrides that point studies/demo.yaml at kit `name`."""
    spec, out = KITS[name], KITS_DIR / name
    return ["demo_kit=null", "data.format=imagefolder", f"data.root={out}", "data.train_dir=train", "data.test_dir=test",
            f"data.categories=[{','.join(spec.classes)}]", f"model.name_or_path={out / 'model'}", f"data.seed={seed}"]


if __name__ == "__main__":
    for kit in KITS:
        print(build_kit(kit))

"""`data.format: hf`: a dataset saved with `datasets.save_to_disk` (a DatasetDict) at `data.root`,
with splits `train_split` and `test_split` (default `train`, `test`), an image column (`image_column`,
default `image`: an `Image` feature, or paths relative to the root) and a label column
(`label_column`, default `label`: `ClassLabel` or class-name strings); rows whose class is not one
of `data.categories` are skipped and counted in one line. An image is named `SPLIT/INDEX`.

Needs the `datasets` package (`pip install 'hpo-peft[hf]'`). Images stay in the dataset: they are
decoded from its bytes, once per process, as files are. The same image twice (in a split, or in
both) is found by content: a cheap key (size, first and last 4 KiB) and then the whole bytes.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pandas as pd

from hpo_peft.data.images import LabelledImages, Preprocessing, load_cached, progress, stack, where
from hpo_peft.data.reader import Reader
from hpo_peft.data.tables import note, plain
from hpo_peft.core.errors import UserError

_DATASETS: dict[tuple, Any] = {}
_ROWS: dict[tuple, pd.DataFrame] = {}
_KEYS: dict[int, list[tuple]] = {}  # by id of a pool kept in _ROWS


def _library():
    try:
        import datasets
    except ImportError:
        raise UserError("data.format hf needs the `datasets` package: pip install 'hpo-peft[hf]'") from None
    return datasets


class HfReader(Reader):
    kind = "split"
    in_files = False

    def _name(self, split: str) -> str:
        return self.config.train_split if split == "train" else self.config.test_split

    def _stamp(self) -> tuple:
        root = self.config.root
        files = [root / "dataset_dict.json", *(root / s / "state.json" for s in (self.config.train_split, self.config.test_split))]
        return tuple(p.stat().st_mtime_ns if p.is_file() else None for p in files)

    def _dataset(self):
        root = self.config.root
        key = (str(root.resolve()), self._stamp())
        if key not in _DATASETS:
            datasets = _library()
            try:
                loaded = datasets.load_from_disk(str(root))
            except Exception as err:  # FileNotFoundError, or the library's own for a folder of something else
                raise UserError(f"{root}: not a dataset saved with datasets.save_to_disk "
                                f"({type(err).__name__}: {' '.join(str(err).split())})") from None
            if not isinstance(loaded, datasets.DatasetDict):
                raise UserError(f"{root}: one split saved alone; save a DatasetDict with splits "
                                f"{self.config.train_split!r} and {self.config.test_split!r} (data.train_split, data.test_split)")
            _DATASETS[key] = loaded
        return _DATASETS[key]

    def check_root(self) -> None:
        super().check_root()
        self._dataset()

    def source(self, split: str) -> str:
        return f"{self.config.root} split {self._name(split)!r}"

    def split(self, split: str):
        """The split, its images undecoded ({bytes, path} each)."""
        datasets, found = _library(), self._dataset()
        name = self._name(split)
        if name not in found:
            raise UserError(f"{self.config.root}: no split {name!r} (data.{split}_split); it has {list(found)}")
        part = found[name]
        wanted = [c for c in (self.config.image_column, self.config.label_column, self.config.group_column) if c]
        missing = [c for c in wanted if c not in part.column_names]
        if missing:
            raise UserError(f"{self.source(split)}: missing column(s) {missing}; found {part.column_names}")
        if isinstance(part.features[self.config.image_column], datasets.Image):
            part = part.cast_column(self.config.image_column, datasets.Image(decode=False))
        return part

    def rows(self, split: str) -> pd.DataFrame:
        config = self.config
        key = (str(config.root.resolve()), self._stamp(), split, self._name(split), config.image_column,
               config.label_column, config.group_column, tuple(config.categories))
        if key not in _ROWS:
            rows = self._rows(split)
            keys = self._keys(split, rows)
            self._check_unique(split, rows, keys)
            _ROWS[key], _KEYS[id(rows)] = rows, keys  # the pool kept, its keys computed once
        return _ROWS[key]

    def _rows(self, split: str) -> pd.DataFrame:
        config, part = self.config, self.split(split)
        columns = [c for c in (config.label_column, config.group_column) if c]
        values = part.select_columns(list(dict.fromkeys(columns))).to_pandas()
        names = getattr(part.features[config.label_column], "names", None)  # a ClassLabel's
        labels = values[config.label_column].map(lambda v: _class_name(v, names))
        known = labels.isin(config.categories).to_numpy()
        if (~known).any():
            others = list(dict.fromkeys(labels[~known]))
            shown = ", ".join(repr(v) if v else "none" for v in others[:4]) + (", ..." if len(others) > 4 else "")
            note(f"{self.source(split)}: skipped {int((~known).sum())} rows whose {config.label_column} is not one of "
                 f"data.categories ({shown})")
        index = known.nonzero()[0]
        out = pd.DataFrame({"image_name": [f"{self._name(split)}/{i}" for i in index],
                            "label": [config.categories.index(v) for v in labels[known]], "row": index})
        if config.group_column:
            groups = values[config.group_column][known].map(lambda v: "" if pd.isna(v) else str(plain(v)).strip())
            if (groups == "").any():
                raise UserError(f"{self.source(split)}: row {int(index[(groups == '').to_numpy()][0])}: "
                                f"empty {config.group_column!r}")
            out["group"] = groups.to_numpy()
        return out

    # images --------------------------------------------------------------------------------------
    def _stored(self, split: str, positions) -> list[tuple[memoryview | None, str | None]]:
        """Each position's stored image as (bytes, path), read from the memory-mapped table without
        copying (a split's keys read 8 KiB of each image, not all of it)."""
        import pyarrow as pa

        part = self.split(split)
        if getattr(part, "_indices", None) is not None:  # a dataset saved with a selection kept aside
            part = part.flatten_indices()
        column = part.data.table.column(self.config.image_column)
        starts = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
        children: dict[int, tuple] = {}
        out = []
        for position in positions:
            c = int(np.searchsorted(starts, position, side="right")) - 1
            if c not in children:
                chunk = column.chunks[c]
                fields = dict(zip((f.name for f in chunk.type), chunk.flatten())) if pa.types.is_struct(chunk.type) else {}
                children[c] = (fields.get("bytes"), fields.get("path")) if fields else (None, chunk)
            data, paths = children[c]
            j = int(position - starts[c])
            stored = data[j].as_buffer() if data is not None and data[j].is_valid else None
            out.append((memoryview(stored) if stored is not None else None, paths[j].as_py() if paths is not None else None))
        return out

    def _open(self, stored: tuple[memoryview | None, str | None]):
        """What PIL opens for a stored image: its bytes, or the file it names (relative to the root)."""
        data, path = stored
        if data is not None:
            return io.BytesIO(bytes(data))
        return self.config.root / path if path else None

    def check_images(self, rows: pd.DataFrame, split: str) -> None:
        for name, row, stored in zip(rows["image_name"], rows["row"], self._stored(split, rows["row"])):
            if stored[0] is None and not (stored[1] and (self.config.root / stored[1]).is_file()):
                raise UserError(f"{self.config.root / stored[1] if stored[1] else name}: image not found"
                                f"{where(row, self.source(split))}")

    def load(self, rows: pd.DataFrame, split: str, prep: Preprocessing, desc: str) -> LabelledImages:
        self.check_images(rows, split)
        stamp, images = (str(self.config.root.resolve()), self._stamp()), []
        with progress(len(rows), desc) as bar:
            for name, row, stored in zip(rows["image_name"], rows["row"], self._stored(split, rows["row"])):
                images.append(load_cached((*stamp, name, prep.height, prep.width), lambda s=stored: self._open(s), prep,
                                          f"{self.config.root}/{name}", where(row, self.source(split))))
                bar.update()
        return stack(rows, images, prep)

    # the same image twice ------------------------------------------------------------------------
    def _keys(self, split: str, rows: pd.DataFrame) -> list[tuple]:
        """A cheap key per row, equal for the same image (equal keys are then compared in full):
        size and a digest of the first and last 4 KiB, or the file a path resolves to (a split's
        whole pool, kept for the process, has them computed once)."""
        if id(rows) in _KEYS:
            return _KEYS[id(rows)]
        keys = []
        for data, path in self._stored(split, rows["row"]):
            if data is not None:
                keys.append((len(data), hashlib.blake2b(bytes(data[:4096]) + bytes(data[-4096:]), digest_size=16).digest()))
            else:
                keys.append(("file", str((self.config.root / path).resolve()) if path else None))
        return keys

    def _same(self, left: tuple[str, int], right: tuple[str, int]) -> bool:
        (a, _), (b, _) = (self._stored(split, [row])[0] for split, row in (left, right))
        return a is None or b is None or a == b  # files: the same resolved path (the keys are equal)

    def _check_unique(self, split: str, rows: pd.DataFrame, keys: list[tuple]) -> None:
        first: dict[tuple, int] = {}
        for key, row in zip(keys, rows["row"]):
            if key in first and key[-1] is not None and self._same((split, first[key]), (split, row)):
                raise UserError(f"{self.source(split)}: rows {first[key]} and {row} hold the same image; a split must "
                                "hold each image once (it could be drawn for training and for validation): keep one")
            first.setdefault(key, row)

    def shared(self, train: pd.DataFrame, test: pd.DataFrame) -> list[str]:
        in_test: dict[tuple, int] = {}
        for key, row in zip(self._keys("test", test), test["row"]):
            in_test.setdefault(key, row)
        return [name for name, key, row in zip(train["image_name"], self._keys("train", train), train["row"])
                if key in in_test and key[-1] is not None and self._same(("train", row), ("test", in_test[key]))]


def _class_name(value: Any, names: list[str] | None) -> str:
    """A label cell as a class name: a ClassLabel's index by its names; else the text (2.0 as 2)."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if names is not None:
        index = int(value)
        return names[index] if 0 <= index < len(names) else ""
    return str(plain(value)).strip()

"""Speed and cost of hpo_peft, measured against the course notebook's training loop.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out benchmarks/results/NAME.md] [--kit DIR]

Writes a Markdown report and a JSON file with the same figures next to it. Every measurement runs
in a fresh subprocess of this script (the hidden sub-command `_child`), so that its peak memory
(the process's own VmHWM; on CUDA also `torch.cuda.max_memory_allocated`) and its caches are its
own. What each figure means: benchmarks/README.md. `--quick` shrinks everything to check the code
path only; its figures mean nothing. Run it on a quiet machine: nothing else on the cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
PEFT_METHODS = ("affine_ln", "bias", "lora", "full")
BLACK_BOX = ("linear_probe", "zs_linear_probe", "clip_adapter", "clap")


@dataclass(frozen=True)
class Sizes:
    full_arch: bool  # CLIPConfig() (PLIP's ViT-B/32) or a tiny CLIP for --quick
    shots: int
    val_shots: int
    epochs: int
    trial_methods: tuple[str, ...]  # (a)
    trial_repeats: int  # (a), ours: trials per process (the first is compared with the baseline)
    demo_trials: int  # (b i), per pruner setting
    plip_trials: int  # (b ii), per pruner setting; 0 skips
    warm_trials: int  # (c), after the cold one
    black_box_epochs: int
    accuracy_epochs: int
    accuracy_methods: tuple[str, ...]
    gpu_batches: tuple[int, ...]
    gpu_steps: int
    matmul_size: int


FULL = Sizes(True, 16, 16, 2, PEFT_METHODS, 2, 12, 4, 3, 100, 20, ("lora", "bias", "affine_ln", "full"), (32, 64, 128), 20, 8192)
QUICK = Sizes(False, 4, 4, 1, ("lora",), 2, 2, 1, 1, 5, 1, ("lora", "bias"), (4, 8), 2, 512)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Set-up: the demo kit and a PLIP-architecture model folder
# ---------------------------------------------------------------------------------------------


def build_model_folder(kit: Path, folder: Path, full_arch: bool) -> dict:
    """A random-weight CLIPModel saved with save_pretrained together with a processor (the
    CLIPImageProcessor defaults: 224 input; the demo kit's tokenizer), loadable like vinid/plip."""
    from transformers import (
        AutoProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
    )

    tokenizer = AutoProcessor.from_pretrained(kit / "model").tokenizer
    token_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if full_arch:  # PLIP's architecture: CLIP ViT-B/32 defaults (token ids only matter for pooling)
        config = CLIPConfig(text_config=token_ids)
    else:
        small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        config = CLIPConfig(
            text_config=dict(small, vocab_size=len(tokenizer), **token_ids),
            vision_config=dict(small, image_size=224, patch_size=32),
            projection_dim=32,
        )
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
    vision = sum(p.numel() for p in model.vision_model.parameters()) + model.visual_projection.weight.numel()
    info = {"folder": str(folder), "vision_parameters": vision, "all_parameters": sum(p.numel() for p in model.parameters()),
            "architecture": "CLIPConfig() (CLIP ViT-B/32, as PLIP)" if full_arch else "tiny CLIP (quick mode)"}
    del model
    return info


# ---------------------------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------------------------


class Children:
    """Runs `_child` subprocesses one at a time, in the run's scratch folder (their working
    directory, so that nothing they write by a relative path lands in the repository)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.count = 0

    def run(self, kind: str, **params) -> dict:
        self.count += 1
        result_path = self.tmp / f"child-{self.count}.json"
        log_path = self.tmp / f"child-{self.count}.log"
        env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, str(SCRIPT), "_child", json.dumps({"kind": kind, **params}), str(result_path)]
        started = time.perf_counter()
        with open(log_path, "w") as output:
            code = subprocess.run(command, cwd=self.tmp, env=env, stdout=output, stderr=subprocess.STDOUT, check=False).returncode
        if code != 0 or not result_path.is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            log(f"  FAILED ({kind}, exit {code}):\n    " + "\n    ".join(tail))
            return {"error": tail[-1] if tail else f"exit code {code}"}
        result = json.loads(result_path.read_text())
        result["process_s"] = time.perf_counter() - started
        return result


def peak_rss_mib() -> float:
    """This process's own peak resident set (VmHWM). `ru_maxrss` is kept in the JSON too, but on Linux
    a child's `ru_maxrss` starts at its parent's peak (it survives fork and exec), so it is not used."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(spec_json: str, result_path: str) -> None:
    spec = json.loads(spec_json)
    result = CHILD_KINDS[spec.pop("kind")](**spec)
    result["peak_rss_mib"] = peak_rss_mib()
    result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(result_path).write_text(json.dumps(result))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# (a) ours: open_workspace + run_trial
# ---------------------------------------------------------------------------------------------


def trial_config(kit: str, model_dir: str, shots: int, val_shots: int, epochs: int, precision: str, device: str, **extra):
    from hpo_peft.config import StudyConfig

    return StudyConfig.model_validate({
        "name": "benchmark",
        "data": {"root": str(Path(kit) / "sicapv2"), "shots": shots, "val_shots": val_shots},
        "model": {"name_or_path": model_dir},
        "train": {"max_epochs": epochs, "patience": None, "precision": precision, "device": device},
        **extra,
    })


def child_ours(kit, model_dir, method, shots, val_shots, epochs, precision, device, repeats) -> dict:
    from hpo_peft.model import load_base_model
    from hpo_peft.runtime import amp_dtype, resolve_device
    from hpo_peft.trial import open_workspace, run_trial

    config = trial_config(kit, model_dir, shots, val_shots, epochs, precision, device)
    started = time.perf_counter()
    base = load_base_model(config.model)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    workspace = open_workspace(config, base)  # text prototypes + decoding every image once
    sync(device)
    workspace_s = time.perf_counter() - started
    options = {"rank": 4} if method == "lora" else {}
    times = []
    for _ in range(repeats):  # the first pays one-off kernel set-up, as the baseline's only trial does
        started = time.perf_counter()
        outcome = run_trial(workspace, method, options, config.train, progress=False)
        sync(device)
        times.append(time.perf_counter() - started)
    dtype = amp_dtype(precision, resolve_device(device))
    return {"load_s": load_s, "workspace_s": workspace_s, "trial_s": times[0], "trial_times_s": times,
            "trainable": outcome.trainable_parameters,
            "dtype": str(dtype or torch.float32).removeprefix("torch."), "val_bacc": outcome.validation.balanced_accuracy}


# ---------------------------------------------------------------------------------------------
# (a) baseline: the course notebook's loop, written out here
# ---------------------------------------------------------------------------------------------


class PLIPWrapper(torch.nn.Module):
    """The notebook's wrapper: encoder(**inputs).pooler_output -> projection -> L2-normalise."""

    def __init__(self, encoder, proj_layer):
        super().__init__()
        self.encoder = encoder
        self.proj_layer = proj_layer

    def forward(self, inputs):
        features = self.encoder(**inputs).pooler_output
        projected_features = self.proj_layer(features)
        return projected_features / projected_features.norm(dim=-1, keepdim=True)


class ZSLinearProbe(torch.nn.Module):
    """The notebook's head (its global `device` made a parameter)."""

    def __init__(self, zero_shot_prot, logit_scale, device):
        super().__init__()
        self.device = device
        self.logit_scale = logit_scale
        self.logit_scale.requires_grad = False
        self.prototypes = torch.nn.Parameter(zero_shot_prot.clone())
        self.to(device)

    def forward(self, features):
        prototypes = self.prototypes.to(self.device)
        prototypes_norm = prototypes / prototypes.norm(dim=-1, keepdim=True)
        logit_scale = self.logit_scale.exp()
        return features @ prototypes_norm.t() * logit_scale


class _LoRALayer(torch.nn.Module):
    def __init__(self, w, w_a, w_b):
        super().__init__()
        self.w = w
        self.w_a = w_a
        self.w_b = w_b

    def forward(self, x):
        return self.w(x) + self.w_b(self.w_a(x))


class LoRAWrapper(torch.nn.Module):
    """The notebook's LoRA: A (r x D) and B (D x r, zeros) on k, v, q of every CLIPAttention."""

    def __init__(self, vit_model, r=4):
        super().__init__()
        self.ViTbase = vit_model
        self.r = r
        self.w_As, self.w_Bs = [], []
        for layer in list(list(self.ViTbase.encoder.children())[2].modules()):
            if layer._get_name() == "CLIPAttention":
                for name in ("k_proj", "v_proj", "q_proj"):
                    base = getattr(layer, name)
                    w_a = torch.nn.Linear(base.in_features, r, bias=False)
                    w_b = torch.nn.Linear(r, base.in_features, bias=False)
                    torch.nn.init.zeros_(w_b.weight)
                    self.w_As.append(w_a), self.w_Bs.append(w_b)
                    setattr(layer, name, _LoRALayer(base, w_a, w_b))

    def forward(self, x):
        return self.ViTbase(x)


class NotebookDataset(torch.utils.data.Dataset):
    """The course loader: every item opens and decodes the 512x512 JPEG again."""

    def __init__(self, paths, labels, transforms):
        self.paths, self.labels, self.transforms = paths, labels, transforms

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = Image.open(self.paths[index]).convert("RGB")
        return self.transforms(image), self.labels[index]


def notebook_unfreeze(model_peft, method, device):
    """What the notebook's cells do to a deepcopy of the frozen model (head trainable)."""
    if method == "affine_ln":
        for m in model_peft.modules():
            for name, param in m.named_parameters():
                if "layer_norm" in name:
                    param.requires_grad = True
    elif method == "bias":
        for m in model_peft.modules():
            for name, param in m.named_parameters():
                if "bias" in name:
                    param.requires_grad = True
    elif method == "lora":
        model_peft[0] = LoRAWrapper(model_peft[0], r=4).to(device)
    elif method == "full":
        for param in model_peft.parameters():
            param.requires_grad = True
    return model_peft


@torch.no_grad()
def notebook_predict(loader, model, device):
    probs, labels = [], []
    for images, y in loader:
        logits = model({"pixel_values": images.to(device)})
        probs.append(logits.softmax(dim=-1).cpu())
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def child_baseline(kit, model_dir, method, shots, val_shots, epochs, device) -> dict:
    from sklearn.metrics import balanced_accuracy_score
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from transformers import AutoModel, AutoProcessor

    from hpo_peft.config import DataConfig
    from hpo_peft.data import few_shot_rows

    data = DataConfig(root=Path(kit) / "sicapv2", shots=shots, val_shots=val_shots)
    train_rows, val_rows = few_shot_rows(data)  # the same images as ours
    images_dir = data.root / data.images_dir
    torch.manual_seed(1)

    started = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.image_processor.do_center_crop = False
    plip = AutoModel.from_pretrained(model_dir).eval()
    vision_encoder = PLIPWrapper(plip.vision_model, plip.visual_projection)
    text_encoder = PLIPWrapper(plip.text_model, plip.text_projection)
    from hpo_peft.config import COURSE_DESCRIPTIONS, COURSE_TEMPLATES

    class_prototypes = []
    with torch.no_grad():
        for category in data.categories:
            texts = [t.replace("[CLS]", d) for d in COURSE_DESCRIPTIONS[category] for t in COURSE_TEMPLATES]
            features = text_encoder(processor.tokenizer(texts, max_length=77, padding=True, truncation=True, return_tensors="pt"))
            mean = features.mean(0).unsqueeze(0)
            class_prototypes.append(mean / mean.norm(dim=-1, keepdim=True))
    head = ZSLinearProbe(torch.concat(class_prototypes, dim=0), plip.logit_scale.detach().clone(), device)
    model = torch.nn.Sequential(copy.deepcopy(vision_encoder), head).to(device).to(torch.float32)
    for param in model.parameters():
        param.requires_grad = False
    for param in model[1].parameters():
        param.requires_grad = True
    crop = processor.image_processor.crop_size
    plip_transforms = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(std=processor.image_processor.image_std, mean=processor.image_processor.image_mean),
        transforms.Resize([crop["height"], crop["width"]]),
    ])

    def loader(rows, shuffle):
        dataset = NotebookDataset([images_dir / n for n in rows["image_name"]], list(rows["label"]), plip_transforms)
        return DataLoader(dataset, batch_size=32, shuffle=shuffle, num_workers=0)

    train_loader, val_loader = loader(train_rows, True), loader(val_rows, False)
    load_s = time.perf_counter() - started

    started = time.perf_counter()
    model_peft = notebook_unfreeze(copy.deepcopy(model).eval().to(device), method, device)
    trainable = sum(p.numel() for p in model_peft.parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(model_peft.parameters(), lr=1e-3)
    for _ in range(epochs):  # train_ft: forward, CE loss, zero_grad, backward, step per batch
        for images, labels in train_loader:
            logits = model_peft({"pixel_values": images.to(device)})
            loss = torch.nn.functional.cross_entropy(logits, labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probs, y = notebook_predict(val_loader, model_peft, device)  # the validation ours does per epoch
        balanced_accuracy_score(y.numpy(), probs.argmax(1).numpy())
    probs, y = notebook_predict(val_loader, model_peft, device)  # and the final one
    sync(device)
    trial_s = time.perf_counter() - started
    return {"load_s": load_s, "trial_s": trial_s, "trainable": trainable,
            "val_bacc": 100 * balanced_accuracy_score(y.numpy(), probs.argmax(1).numpy())}


# ---------------------------------------------------------------------------------------------
# (b) studies
# ---------------------------------------------------------------------------------------------


def child_study(config_path, overrides, n_trials, folder) -> dict:
    from hpo_peft.config import load_config
    from hpo_peft.study import StudyOptions, run_study

    config = load_config(config_path, overrides)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options = StudyOptions("benchmark", storage=str(folder / "o.journal"), tracking_uri=f"sqlite:///{folder}/mlflow.db")
    start = datetime.now()
    started = time.perf_counter()
    study = run_study(config, options, n_trials, None)
    wall_s = time.perf_counter() - started
    trials = [{
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "method": t.params.get("method"),
        "start_s": (t.datetime_start - start).total_seconds() if t.datetime_start else None,
        "end_s": (t.datetime_complete - start).total_seconds() if t.datetime_complete else None,
    } for t in study.trials]
    return {"wall_s": wall_s, "trials": trials}


def study_overrides(kit: Path, model_dir: Path, device: str, pruner: str, extra: list[str]) -> list[str]:
    return [f"data.root={kit / 'sicapv2'}", f"model.name_or_path={model_dir}", "demo_kit=null",
            f"train.device={device}", f"search.pruner={pruner}", *extra]


def summarize_study(result: dict, target: float | None) -> dict:
    trials = result["trials"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    first_start = min((t["start_s"] for t in trials if t["start_s"] is not None), default=0.0)
    last_end = max((t["end_s"] for t in trials if t["end_s"] is not None), default=0.0)
    reached = [t["end_s"] for t in complete if target is not None and t["value"] >= target]
    return {
        "n_trials": len(trials),
        "n_complete": len(complete),
        "n_pruned": sum(t["state"] == "PRUNED" for t in trials),
        "n_failed": sum(t["state"] == "FAIL" for t in trials),
        "best": max((t["value"] for t in complete), default=None),
        "wall_s": result["wall_s"],
        "setup_s": first_start,
        "trials_per_hour": 3600 * len(trials) / result["wall_s"],
        "trials_per_hour_trials_only": 3600 * len(trials) / max(last_end - first_start, 1e-9),
        "target": target,
        "time_to_target_s": min(reached) if reached else None,
        "peak_rss_mib": result.get("peak_rss_mib"),
    }


def measure_study_pair(children: Children, label: str, config: Path, kit: Path, model_dir: Path, device: str,
                       pruner: str, n_trials: int, extra: list[str]) -> dict:
    """The same study without and with pruning, each in a fresh process and fresh storage."""
    raw = {}
    for name, spec in (("none", "{name: none}"), ("pruned", pruner)):
        log(f"(b) {label}: {n_trials} trials, pruner {spec}")
        raw[name] = children.run("study", config_path=str(config), n_trials=n_trials,
                                 overrides=study_overrides(kit, model_dir, device, spec, extra),
                                 folder=str(children.tmp / f"study-{label}-{name}"))
        if "error" in raw[name]:
            return {"error": raw[name]["error"], "pruner": pruner}
    best = max((t["value"] for t in raw["none"]["trials"] if t["state"] == "COMPLETE"), default=None)
    target = None if best is None else best - 2.0
    out = {"pruner": pruner, "none": summarize_study(raw["none"], target), "pruned": summarize_study(raw["pruned"], target)}
    for name in ("none", "pruned"):
        s = out[name]
        log(f"    {name}: {s['n_trials']} trials ({s['n_pruned']} pruned) in {s['wall_s']:.0f} s = "
            f"{s['trials_per_hour']:.0f}/h; target {fmt(target)} reached at {fmt(s['time_to_target_s'])} s")
    return out


# ---------------------------------------------------------------------------------------------
# (c) black-box adapters on the feature cache
# ---------------------------------------------------------------------------------------------


def child_black_box(kit, model_dir, shots, val_shots, epochs, warm_trials, device) -> dict:
    from hpo_peft import features
    from hpo_peft.trial import open_workspace, run_trial

    course = {"optimizer": "sgd", "learning_rate": 1e-3, "max_epochs": epochs, "patience": None}
    config = trial_config(kit, model_dir, shots, val_shots, epochs, "auto", device,
                          method_train={m: course for m in BLACK_BOX})
    workspace = open_workspace(config)
    out = {}
    for method in BLACK_BOX:
        features._CACHE.clear()  # this method's first trial extracts the features again (cold)
        times = []
        for _ in range(1 + warm_trials):
            started = time.perf_counter()
            run_trial(workspace, method, {}, config.train_for(method), progress=False)
            sync(device)
            times.append(time.perf_counter() - started)
        out[method] = {"cold_s": times[0], "warm_s": statistics.median(times[1:]) if warm_trials else None}
    return {"methods": out, "images": len(workspace.data.train) + len(workspace.data.val)}


# ---------------------------------------------------------------------------------------------
# (d) GPU throughput
# ---------------------------------------------------------------------------------------------


def child_gpu(model_dir, batches, steps, matmul_size, device) -> dict:
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from hpo_peft.config import ModelConfig, PromptConfig
    from hpo_peft.methods import get_method, method_config
    from hpo_peft.model import build_classifier, load_base_model, text_prototypes
    from hpo_peft.runtime import autocast

    dev = torch.device(device)
    n = matmul_size
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started, repeats = time.perf_counter(), 50
    for _ in range(repeats):
        a @ b
    sync(device)
    matmul_flops = 2 * n**3 * repeats / (time.perf_counter() - started)
    del a, b

    base = load_base_model(ModelConfig(name_or_path=model_dir))
    base.clip.to(dev)
    prototypes = text_prototypes(base, PromptConfig(), ["NC", "G3", "G4", "G5"]).to(dev)
    prep = base.preprocessing

    def lora_classifier():
        classifier = get_method("lora").prepare(build_classifier(base, prototypes), method_config("lora", {"rank": 4}))
        return classifier.to(dev).train()

    def step(classifier, optimizer, images, labels, dtype):
        with autocast(dev, dtype):
            logits = classifier(prep.normalize(images))
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def batch_of(size):
        images = torch.randint(0, 256, (size, 3, prep.height, prep.width), dtype=torch.uint8, device=dev)
        return images, torch.randint(0, 4, (size,), device=dev)

    classifier = lora_classifier()
    optimizer = torch.optim.Adam([p for p in classifier.parameters() if p.requires_grad], lr=1e-3)
    images, labels = batch_of(batches[0])
    with FlopCounterMode(display=False) as counter:
        step(classifier, optimizer, images, labels, torch.bfloat16)
    flops_per_image = counter.get_total_flops() / batches[0]

    rows = []
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        for size in batches:
            classifier = lora_classifier()
            optimizer = torch.optim.Adam([p for p in classifier.parameters() if p.requires_grad], lr=1e-3)
            images, labels = batch_of(size)
            for _ in range(3):
                step(classifier, optimizer, images, labels, dtype)
            sync(device)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for _ in range(steps):
                step(classifier, optimizer, images, labels, dtype)
            sync(device)
            images_per_s = size * steps / (time.perf_counter() - started)
            rows.append({
                "precision": name, "batch": size, "images_per_s": images_per_s,
                "flops_fraction": flops_per_image * images_per_s / matmul_flops,
                "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
            })
            del classifier, optimizer
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    return {"device_name": device_name, "matmul_size": n, "matmul_tflops": matmul_flops / 1e12,
            "flops_per_image": flops_per_image, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Demo-kit accuracy: fp32 vs bf16
# ---------------------------------------------------------------------------------------------


def child_accuracy(kit, methods, epochs, device) -> dict:
    from hpo_peft.config import load_config
    from hpo_peft.trial import open_workspace, run_trial

    config = load_config(ROOT / "studies" / "demo.yaml", [
        f"data.root={Path(kit) / 'sicapv2'}", f"model.name_or_path={Path(kit) / 'model'}", "demo_kit=null", f"train.device={device}"])
    workspace = open_workspace(config)
    rows = []
    for method in methods:
        for precision in ("fp32", "bf16"):
            train = config.train_for(method, max_epochs=epochs, patience=None, precision=precision)
            outcome = run_trial(workspace, method, config.methods.get(method, {}), train, progress=False)
            rows.append({"method": method, "precision": precision, "val_bacc": outcome.validation.balanced_accuracy,
                         "seconds": outcome.seconds})
    return {"rows": rows, "learning_rate": config.train.learning_rate}


CHILD_KINDS = {"ours": child_ours, "baseline": child_baseline, "study": child_study, "black_box": child_black_box,
               "gpu": child_gpu, "accuracy": child_accuracy}


# ---------------------------------------------------------------------------------------------
# The measurements, from the parent
# ---------------------------------------------------------------------------------------------


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def measure_trials(children: Children, kit: Path, model_dir: Path, sizes: Sizes, device: str) -> dict:
    common = dict(kit=str(kit), model_dir=str(model_dir), shots=sizes.shots, val_shots=sizes.val_shots, epochs=sizes.epochs, device=device)
    out = {}
    for method in sizes.trial_methods:
        row = {"baseline": children.run("baseline", method=method, **common)}
        log(f"(a) {method}: baseline {fmt(row['baseline'].get('trial_s'))} s")
        for precision in ("fp32", "auto"):
            row[precision] = children.run("ours", method=method, precision=precision, repeats=sizes.trial_repeats, **common)
            r = row[precision]
            log(f"(a) {method}: ours {precision} ({r.get('dtype')}) trials {[round(t, 1) for t in r.get('trial_times_s', [])]} s "
                f"+ workspace {fmt(r.get('workspace_s'))} s")
        out[method] = row
    return out


def measure_studies(children: Children, kit: Path, model_dir: Path, sizes: Sizes, device: str) -> dict:
    out = {"demo": measure_study_pair(
        children, "demo", ROOT / "studies" / "demo.yaml", kit, kit / "model", device,
        "{name: median, n_startup_trials: 2, n_warmup_steps: 4}", sizes.demo_trials,
        [] if sizes.full_arch else ["search.params.max_epochs=2"])}
    if sizes.plip_trials:
        out["plip"] = measure_study_pair(
            children, "plip", ROOT / "studies" / "sicapv2_plip.yaml", kit, model_dir, device,
            "{name: median, n_startup_trials: 1, n_warmup_steps: 0}", sizes.plip_trials,
            [f"search.params.max_epochs={sizes.epochs}"])
    return out


def measure_black_box(children: Children, kit: Path, model_dir: Path, sizes: Sizes, device: str) -> dict:
    log(f"(c) black-box adapters: cold + {sizes.warm_trials} warm trials each, {sizes.black_box_epochs} epochs")
    result = children.run("black_box", kit=str(kit), model_dir=str(model_dir), shots=sizes.shots, val_shots=sizes.val_shots,
                          epochs=sizes.black_box_epochs, warm_trials=sizes.warm_trials, device=device)
    for method, r in result.get("methods", {}).items():
        log(f"    {method}: cold {fmt(r['cold_s'], 2)} s, warm {fmt(r['warm_s'], 2)} s")
    return result


def measure_gpu(children: Children, model_dir: Path, sizes: Sizes, device: str) -> dict:
    log(f"(d) GPU: LoRA training throughput at batch {list(sizes.gpu_batches)}, bf16 and fp32")
    result = children.run("gpu", model_dir=str(model_dir), batches=list(sizes.gpu_batches), steps=sizes.gpu_steps,
                          matmul_size=sizes.matmul_size, device=device)
    for row in result.get("rows", []):
        log(f"    {row['precision']} batch {row['batch']}: {row['images_per_s']:.0f} images/s")
    return result


def measure_accuracy(children: Children, kit: Path, sizes: Sizes, device: str) -> dict:
    log(f"demo-kit accuracy: {list(sizes.accuracy_methods)} x fp32/bf16, {sizes.accuracy_epochs} epochs")
    result = children.run("accuracy", kit=str(kit), methods=list(sizes.accuracy_methods), epochs=sizes.accuracy_epochs, device=device)
    for row in result.get("rows", []):
        log(f"    {row['method']} {row['precision']}: {row['val_bacc']:.1f}%")
    return result


# ---------------------------------------------------------------------------------------------
# Machine and report
# ---------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal")), 0)
    from hpo_peft.runtime import cpu_has_bf16

    versions = {}
    for package in ("torch", "transformers", "peft", "optuna", "mlflow", "torchvision"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_bf16(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none",
        "device": device,
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit or "unknown",
        "load_average_start": os.getloadavg()[0],
    }


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def trials_cell(result: dict) -> str:
    """First trial of the process, then the later ones in brackets."""
    times = result.get("trial_times_s") or []
    later = f" ({', '.join(fmt(t) for t in times[1:])})" if len(times) > 1 else ""
    return (fmt(times[0]) if times else "-") + later


def report_markdown(results: dict) -> str:
    m, sizes = results["machine"], results["sizes"]
    gpu = m["device"] == "cuda"
    lines = [f"# hpo_peft benchmark ({m['device']}{', QUICK MODE: code-path check only, figures mean nothing' if results['quick'] else ''})", ""]
    lines += [
        f"- date: {m['date']}; commit {m['commit']}; total run time {results['total_s'] / 60:.1f} min",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['ram_gib']} GiB RAM, "
        f"native CPU bf16: {'yes' if m['cpu_native_bf16'] else 'no'}; GPU: {m['gpu']}",
        f"- load average (1 min) at the start: {m['load_average_start']:.2f} (anything else running on the cores "
        "makes every figure unreliable)",
        f"- versions: python {m['python']}, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- model: {results['model']['architecture']}, random weights, {results['model']['vision_parameters']:,} vision-side "
        f"parameters; data: the demo kit's 512x512 JPEGs, {sizes['shots']} train + {sizes['val_shots']} validation shots "
        "per class, 4 classes",
        "",
    ]

    trials = results["trials"]
    lines += [
        "## (a) One trial: the course's loop vs ours",
        "",
        f"Epochs {sizes['epochs']}, batch 32, Adam 1e-3, validation after every epoch and once at the end, on "
        f"`{m['device']}`. Baseline: the notebook's loop (PIL decode + ToTensor/Normalize/Resize in every `__getitem__`, "
        "DataLoader, fp32). Ours: `run_trial` after `open_workspace`, which decodes every image once per process "
        "(column *workspace*: decoding + text prototypes, paid once per study process, not per trial). Each "
        "measurement is a fresh process; ours runs the trial "
        f"{sizes['trial_repeats']} time(s) there: the first (compared with the baseline's only trial) and, in "
        "brackets, the later ones, which no longer pay one-off kernel set-up. auto = bf16 autocast where "
        "the device has native bf16, else fp32 (the dtype is shown). Peak RSS: the process's own VmHWM "
        "(whole CLIP model loaded in both).",
        "",
        "| method | trainable (ours / notebook) | baseline s | ours fp32 s | ours auto s | baseline / ours fp32 | "
        "baseline / ours auto | workspace s (once) | baseline / (workspace + ours auto) | "
        "peak RSS MiB baseline / fp32 / auto |"
        + (" peak GPU MiB baseline / fp32 / auto |" if gpu else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for method, row in trials.items():
        b, f, a = row["baseline"], row["fp32"], row["auto"]
        cells = [
            method,
            f"{fmt(f.get('trainable'))} / {fmt(b.get('trainable'))}",
            fmt(b.get("trial_s")),
            trials_cell(f),
            f"{trials_cell(a)}, {a.get('dtype', '-')}",
            ratio(b.get("trial_s"), f.get("trial_s")),
            ratio(b.get("trial_s"), a.get("trial_s")),
            fmt(a.get("workspace_s")),
            ratio(b.get("trial_s"), (a.get("workspace_s") or 0) + (a.get("trial_s") or 0)),
            " / ".join(fmt(r.get("peak_rss_mib"), 0) for r in (b, f, a)),
        ]
        if gpu:
            cells.append(" / ".join(fmt(r.get("peak_gpu_mib"), 0) for r in (b, f, a)))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"{method} {k}: {r['error']}" for method, row in trials.items() for k, r in row.items() if "error" in r]
    lines += [""] + [f"- failed: {e}" for e in errors] + ([""] if errors else [])

    lines += ["## (b) Study throughput (`run_study`)", ""]
    names = {"demo": "demo kit (`studies/demo.yaml`, tiny model, fp32)",
             "plip": f"{'PLIP architecture' if sizes['full_arch'] else 'tiny CLIP'} (`studies/sicapv2_plip.yaml` space, "
                     f"epochs {sizes['epochs']}, precision auto)"}
    lines += ["Trials/h counts every trial (pruned ones too) over the whole `run_study` call (model load, decoding, "
              "MLflow set-up included) and over the trials alone. Time to target: seconds from the call until a "
              "completed trial first reaches the no-pruning study's best validation balanced accuracy minus 2 points.",
              "",
              "| study | pruner | trials (pruned, failed) | wall s | set-up s | trials/h | trials/h, trials only | best val bacc | target | time to target s | peak RSS MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, pair in results["studies"].items():
        if "error" in pair:
            lines.append(f"| {names[key]} | failed: {pair['error']} ||||||||||")
            continue
        for label in ("none", "pruned"):
            s = pair[label]
            lines.append(
                f"| {names[key]} | {'none' if label == 'none' else pair['pruner'].strip('{}')} | {s['n_trials']} ({s['n_pruned']}, {s['n_failed']}) | "
                f"{fmt(s['wall_s'])} | {fmt(s['setup_s'])} | {fmt(s['trials_per_hour'], 0)} | "
                f"{fmt(s['trials_per_hour_trials_only'], 0)} | {fmt(s['best'])} | {fmt(s['target'])} | "
                f"{fmt(s['time_to_target_s'])} | {fmt(s['peak_rss_mib'], 0)} |")
    if "plip" not in results["studies"]:
        lines.append("\nPLIP-architecture study: skipped in quick mode.")
    lines.append("")

    bb = results["black_box"]
    lines += ["## (c) Black-box adapters on the per-process feature cache", "",
              f"Course settings: SGD (momentum 0.9), lr 1e-3, {sizes['black_box_epochs']} epochs, batch 32, precision "
              f"auto. Cold: the first trial after the cache is emptied (extracts the features of "
              f"{bb.get('images', '-')} images); warm: median of the next {sizes['warm_trials']}.", "",
              "| method | cold s | warm s | cold / warm |", "|---|---|---|---|"]
    if "error" in bb:
        lines.append(f"| failed: {bb['error']} ||||")
    for method, r in bb.get("methods", {}).items():
        lines.append(f"| {method} | {fmt(r['cold_s'], 2)} | {fmt(r['warm_s'], 2)} | {ratio(r['cold_s'], r['warm_s'])} |")
    lines.append("")

    lines += ["## (d) GPU", ""]
    g = results.get("gpu")
    if not g:
        lines += ["not measured: no GPU in this session", ""]
    elif "error" in g:
        lines += [f"failed: {g['error']}", ""]
    else:
        lines += [
            f"Device {g['device_name']}. Measured bf16 matmul rate ({g['matmul_size']}x{g['matmul_size']} @ "
            f"{g['matmul_size']}x{g['matmul_size']}): "
            f"{g['matmul_tflops']:.1f} TFLOP/s. FLOPs per training image: {g['flops_per_image'] / 1e9:.2f} GFLOP, "
            "counted by `torch.utils.flop_counter.FlopCounterMode` over one whole LoRA training step (forward, "
            "backward, optimizer; matmuls, convolutions and attention only) divided by the batch size. "
            "Fraction = FLOPs per image x images/s / measured bf16 matmul rate (fp32 rows too).", "",
            "| precision | batch | images/s | fraction of bf16 matmul rate | peak GPU MiB |", "|---|---|---|---|---|"]
        for row in g["rows"]:
            lines.append(f"| {row['precision']} | {row['batch']} | {row['images_per_s']:.0f} | "
                         f"{100 * row['flops_fraction']:.1f}% | {fmt(row['peak_gpu_mib'], 0)} |")
        lines += ["", "Peak GPU memory per method (one trial, section (a)): see the last column of table (a).", ""]

    acc = results["accuracy"]
    lines += ["## Demo-kit accuracy: fp32 vs bf16", "",
              f"`run_trial` on `studies/demo.yaml` (tiny demo model, lr {acc.get('learning_rate', '-')}), "
              f"epochs {sizes['accuracy_epochs']} without early stopping (best epoch kept), validation balanced accuracy %.", "",
              "| method | fp32 | bf16 | bf16 - fp32 |", "|---|---|---|---|"]
    if "error" in acc:
        lines.append(f"| failed: {acc['error']} ||||")
    by_method: dict[str, dict[str, float]] = {}
    for row in acc.get("rows", []):
        by_method.setdefault(row["method"], {})[row["precision"]] = row["val_bacc"]
    for method, v in by_method.items():
        lines.append(f"| {method} | {v['fp32']:.1f} | {v['bf16']:.1f} | {v['bf16'] - v['fp32']:+.1f} |")
    if by_method:
        mean = {p: statistics.mean(v[p] for v in by_method.values()) for p in ("fp32", "bf16")}
        lines.append(f"| mean | {mean['fp32']:.1f} | {mean['bf16']:.1f} | {mean['bf16'] - mean['fp32']:+.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the code path (< 2 min)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, help="Markdown report (default benchmarks/results/[quick-]DEVICE.md); JSON beside it")
    parser.add_argument("--kit", type=Path, help="reuse a demo kit folder (e.g. local_data/demo) instead of building one in a temp folder")
    args = parser.parse_args()

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        log("--device cuda: CUDA is not available here; measuring on cpu")
        device = "cpu"
    sizes = QUICK if args.quick else FULL
    out = args.out or ROOT / "benchmarks" / "results" / f"{'quick-' if args.quick else ''}{device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"quick": args.quick, "sizes": asdict(sizes), "machine": machine_info(device)}
    log(f"benchmark on {results['machine']['cpu']} ({device}{', quick' if args.quick else ''}) -> {out}")
    if results["machine"]["load_average_start"] > 0.5:
        log(f"warning: load average {results['machine']['load_average_start']:.1f}: something else is running; timings will suffer")

    with tempfile.TemporaryDirectory(prefix="hpo_peft_bench_") as tmp_name:
        tmp = Path(tmp_name)
        from hpo_peft.demo_kit import build_demo_kit

        log("building the demo kit" if args.kit is None else f"demo kit: {args.kit}")
        kit = build_demo_kit((args.kit or tmp / "kit").resolve(), progress=False)
        log(f"saving the {'PLIP (CLIPConfig())' if sizes.full_arch else 'tiny'} architecture with random weights")
        results["model"] = build_model_folder(kit, tmp / "plip_arch", sizes.full_arch)
        model_dir = tmp / "plip_arch"
        children = Children(tmp)

        results["trials"] = measure_trials(children, kit, model_dir, sizes, device)
        results["studies"] = measure_studies(children, kit, model_dir, sizes, device)
        results["black_box"] = measure_black_box(children, kit, model_dir, sizes, device)
        results["gpu"] = measure_gpu(children, model_dir, sizes, device) if device == "cuda" else None
        results["accuracy"] = measure_accuracy(children, kit, sizes, device)

    results["total_s"] = time.perf_counter() - started
    out.write_text(report_markdown(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"done in {results['total_s'] / 60:.1f} min: {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()

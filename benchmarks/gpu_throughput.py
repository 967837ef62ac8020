"""(d) GPU (only with `--device cuda` and a GPU): images/s of LoRA training steps of hpo_peft's
classifier at several batch sizes in bf16 autocast and fp32, the measured bf16 matmul rate, FLOPs
per training image (FlopCounterMode over one whole step) and the fraction of that rate reached."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from harness import Children, Sizes, fmt, run_logged, sync


def child_gpu(model_dir, batches, steps, matmul_size, device) -> dict:
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from hpo_peft.core.config import ModelConfig, PromptConfig
    from hpo_peft.methods import get_method, method_config
    from hpo_peft.models.classifier import build_classifier, load_base_model, text_prototypes
    from hpo_peft.core.runtime import autocast

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


def measure_gpu(children: Children, model_dir: Path, sizes: Sizes, device: str) -> dict:
    return run_logged(
        children, "gpu", f"(d) GPU: LoRA training throughput at batch {list(sizes.gpu_batches)}, bf16 and fp32",
        lambda result: (f"{row['precision']} batch {row['batch']}: {row['images_per_s']:.0f} images/s" for row in result.get("rows", [])),
        model_dir=str(model_dir), batches=list(sizes.gpu_batches), steps=sizes.gpu_steps, matmul_size=sizes.matmul_size, device=device)


def report_section(results: dict) -> list[str]:
    lines = ["## (d) GPU", ""]
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
    return lines

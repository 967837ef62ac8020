"""What model scale does to PEFT: PLIP's architecture (CLIP ViT-B/32, 224 px, HF CLIP family)
against CONCH's (timm ViT-B/16 at 448 px with attentional pooling, conch family), random weights.

    python benchmarks/model_scale.py [--device cpu|cuda] [--steps N] [--quick] [--architectures plip conch] [--out benchmarks/results/NAME.md]

Per architecture, method (Affine-LN, bias, LoRA rank 4, full fine-tuning, and a black-box
adapter: zero-shot linear probe, whose step is a no-grad encoder pass plus the head's update when
its features are not cached) and batch size (16, 32): trainable parameters, seconds per training
step (forward, cross-entropy, backward, Adam step; `--warmup` untimed steps, then the mean of `--steps`)
and peak memory (the process's peak RSS, VmHWM; on CUDA also `torch.cuda.max_memory_allocated`).
Each measurement runs in a fresh process (this script's hidden `_child` sub-command), so its peak
is its own. Both models are built in memory, through the package's own families
(`hpo_peft.models`): nothing is downloaded. `--quick` shrinks both to check the code path only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from harness import ROOT, log, machine_info, peak_rss_mib, sync

ARCHITECTURES = ("plip", "conch")
METHODS = ("affine_ln", "bias", "lora", "full", "zs_linear_probe")
BATCHES = (16, 32)
QUICK_PLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=32)
QUICK_CONCH = dict(image_size=64, width=64, layers=2, heads=2, patch_size=16, embed_dim=64, pooler_heads=2,
                   text_width=32, text_layers=1, text_heads=2, context_length=32)


def build(architecture: str, quick: bool):
    from transformers import CLIPConfig, CLIPModel

    from hpo_peft.models import FAMILIES, BaseVLM
    from hpo_peft.models.conch import conch_architecture

    if architecture == "conch":
        return conch_architecture(**(QUICK_CONCH if quick else {}))
    vision = QUICK_PLIP if quick else dict(image_size=224, patch_size=32)  # CLIPConfig() is ViT-B/32 otherwise
    config = CLIPConfig(vision_config=vision, text_config=dict(hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=1, num_attention_heads=2))
    from hpo_peft.data import Preprocessing

    size = vision["image_size"]
    prep = Preprocessing(height=size, width=size, mean=(0.5,) * 3, std=(0.5,) * 3)
    return BaseVLM("plip-architecture", None, CLIPModel(config).eval().requires_grad_(False), None, prep,
                     FAMILIES["hf_clip"])


def child(architecture: str, method: str, batch: int, steps: int, warmup: int, device: str, quick: bool) -> dict:
    from hpo_peft.methods import METHODS as REGISTRY
    from hpo_peft.methods import method_config
    from hpo_peft.models.classifier import build_classifier, count_trainable

    torch.manual_seed(0)
    base = build(architecture, quick)
    prep = base.preprocessing
    pixels = torch.randn(batch, 3, prep.height, prep.width, device=device)
    labels = torch.randint(0, 4, (batch,), device=device)
    with torch.no_grad():
        dim = base.image_encoder()(pixels[:1].cpu()).shape[1]
    classifier = REGISTRY[method].prepare(build_classifier(base, torch.randn(4, dim)),
                                          method_config(method, {"rank": 4} if method == "lora" else {})).to(device)
    del base
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    frozen_encoder = not any(p.requires_grad for p in classifier.encoder.parameters())
    classifier.train()

    def step():
        if frozen_encoder:  # black-box: features without a graph, then the head
            with torch.no_grad():
                features = classifier.encoder(pixels)
            logits = classifier.head(features)
        else:
            logits = classifier(pixels)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):  # one-off kernel and allocator set-up
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    result = {"trainable": count_trainable(classifier), "s_per_step": (time.perf_counter() - started) / steps}
    result["peak_rss_mib"] = peak_rss_mib()
    if device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_child(spec: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(spec)]
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=_env())
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        log(f"  FAILED {spec}: {tail}")
        return {"error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import os

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's path too
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}


def report(results: dict) -> str:
    m = results["machine"]
    gpu = m["device"] == "cuda"
    lines = [f"# Model scale and PEFT ({m['device']}{', QUICK: code path only' if results['quick'] else ''})", "",
             f"- date: {m['date']}; commit {m['commit']}; {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch "
             f"threads), {m['ram_gib']} GiB RAM; GPU: {m['gpu']}; load average at start {m['load_average_start']:.2f}",
             f"- fp32, random weights, 4 classes; s/step = mean of {results['steps']} step(s) after {results['warmup']} "
             "warm-up step(s); trainable includes the 4-class head", "",
             "| architecture | method | trainable | s/step b16 | s/step b32 | peak RSS MiB b16 | b32 |"
             + (" peak GPU MiB b16 | b32 |" if gpu else ""),
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if gpu else "")]
    for (arch, method), row in results["rows"].items():
        b16, b32 = row.get("16", {}), row.get("32", {})
        cells = [arch, method, f"{b16.get('trainable', 0):,}", _f(b16.get("s_per_step"), 2), _f(b32.get("s_per_step"), 2),
                 _f(b16.get("peak_rss_mib"), 0), _f(b32.get("peak_rss_mib"), 0)]
        if gpu:
            cells += [_f(b16.get("peak_gpu_mib"), 0), _f(b32.get("peak_gpu_mib"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _f(value, digits):
    return "-" if value is None else f"{value:,.{digits}f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        print(json.dumps(child(**json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (0: time the first step too)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--architectures", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES),
                        help="which, in this order (each measurement is logged as it ends)")
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"{'quick-' if args.quick else ''}model-scale-{args.device}.md"
    results = {"quick": args.quick, "steps": args.steps, "warmup": args.warmup, "machine": machine_info(args.device), "rows": {}}
    for arch in args.architectures:
        for method in METHODS:
            row = {}
            for batch in BATCHES:
                row[str(batch)] = run_child(dict(architecture=arch, method=method, batch=batch, steps=args.steps,
                                                 warmup=args.warmup, device=args.device, quick=args.quick))
                log(f"{arch} {method} b{batch}: {row[str(batch)]}")
            results["rows"][(arch, method)] = row
    out.write_text(report(results))
    results["rows"] = {f"{a}/{m}": r for (a, m), r in results["rows"].items()}
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()

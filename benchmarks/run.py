"""Speed and cost of hpo_peft, measured against the course notebook's training loop.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out benchmarks/results/NAME.md] [--kit DIR]

Writes a Markdown report and a JSON file with the same figures next to it. Every measurement runs
in a fresh subprocess of this script (the hidden sub-command `_child`), so that its peak memory
(the process's own VmHWM; on CUDA also `torch.cuda.max_memory_allocated`) and its caches are its
own. What each figure means: benchmarks/README.md. `--quick` shrinks everything to check the code
path only; its figures mean nothing. Run it on a quiet machine: nothing else on the cores.

This file is the runner only: each benchmark lives in its own module beside it (trial_speed.py and
course_loop.py: (a); study_throughput.py: (b); black_box.py: (c); gpu_throughput.py: (d);
precision.py: fp32 vs bf16 accuracy), the shared plumbing in harness.py and fixtures.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import black_box
import course_loop
import gpu_throughput
import precision
import study_throughput
import torch
import trial_speed
from fixtures import build_model_folder
from harness import FULL, QUICK, ROOT, Children, child_main, log, machine_info

CHILD_KINDS = {"ours": trial_speed.child_ours, "baseline": course_loop.child_baseline, "study": study_throughput.child_study,
               "black_box": black_box.child_black_box, "gpu": gpu_throughput.child_gpu, "accuracy": precision.child_accuracy}
SECTIONS = (trial_speed, study_throughput, black_box, gpu_throughput, precision)  # the report's order


def report_markdown(results: dict) -> str:
    m, sizes = results["machine"], results["sizes"]
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
    for section in SECTIONS:
        lines += section.report_section(results)
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(CHILD_KINDS, sys.argv[2], sys.argv[3])
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

        results["trials"] = trial_speed.measure_trials(children, kit, model_dir, sizes, device)
        results["studies"] = study_throughput.measure_studies(children, kit, model_dir, sizes, device)
        results["black_box"] = black_box.measure_black_box(children, kit, model_dir, sizes, device)
        results["gpu"] = gpu_throughput.measure_gpu(children, model_dir, sizes, device) if device == "cuda" else None
        results["accuracy"] = precision.measure_accuracy(children, kit, sizes, device)

    results["total_s"] = time.perf_counter() - started
    out.write_text(report_markdown(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"done in {results['total_s'] / 60:.1f} min: {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()

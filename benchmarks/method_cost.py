"""What each method costs at PLIP size: trainable parameters and the seconds of a short trial, for
every registered method (and LoRA with DoRA as its own row), on PLIP's architecture with random weights.

    python benchmarks/method_cost.py [--methods NAME ...] [--epochs 2] [--device cpu|cuda] [--out FILE.md]

The model is `transformers.CLIPConfig()` (CLIP ViT-B/32 at 224 px, PLIP's architecture; text tower
at its defaults too, which CoOp and KgCoOp run every step) with random weights, saved with
`save_pretrained` and the demo kit's tokenizer into a temporary folder (`fixtures.build_model_folder`)
and loaded through the package's own `load_base_model`. The trials are the package's: the config is
studies/demo.yaml (the demo kit's images, SICAPv2's 4 classes, 16 shots + 16 validation shots per
class, holdout validation, `train.augment: dihedral` for the methods that train the encoder) with
model.name_or_path pointed at that folder, and each method runs `trial.run_trial` once with its own
training defaults (`settings.merged_train`: paper defaults such as CoOp's SGD or Tip-Adapter-F's
AdamW) overridden to `--epochs` epochs (2), batch 32, fp32, no early stopping. Method options are
demo.yaml's (LoRA rank 4, B zeros), with `use_dora: true` for the DoRA row; Tip-Adapter trains
nothing, so its trial is the zero-epoch one.

Reported per method: trainable parameters as the trial logs them (`TrialOutcome.trainable_parameters`,
the count a study stores per trial), the trial's own seconds (`TrialOutcome.seconds`) for each of
`--repeats` identical trials (2), the epochs it trained. One process, as a study worker: the model
loads once and the image features of the frozen encoder (black-box adapters, Tip-Adapter,
CoOp/KgCoOp) are computed once, before the trials, and reported on their own (`feature cache
fill`): the trials of those methods are timed with it filled, as every study trial after the first
one that needs it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from fixtures import build_model_folder
from harness import ROOT, log, machine_info, peak_rss_mib, sync

DEMO = ROOT / "studies" / "demo.yaml"
KIT = ROOT / "local_data" / "demo"
DORA = "lora+dora"  # the row name of LoRA with methods.lora.use_dora: true


def rows_to_run() -> list[str]:
    from hpo_peft.methods import METHODS

    names = list(METHODS)
    return names[: names.index("lora") + 1] + [DORA] + names[names.index("lora") + 1:]


def measure(rows: list[str], model_dir: Path, epochs: int, device: str, repeats: int) -> dict:
    from hpo_peft.app.commands import prepare_study_config
    from hpo_peft.methods import get_method
    from hpo_peft.core.runtime import Placement
    from hpo_peft.fewshot.settings import merged_train
    from hpo_peft.fewshot.trial import open_workspace, run_trial

    overrides = [f"model.name_or_path={model_dir}", "data.validation=holdout", "data.shots=16", "data.val_shots=16",
                 "train.precision=fp32", f"train.device={device}"]
    config = prepare_study_config(DEMO, overrides)
    started = time.perf_counter()
    workspace = open_workspace(config)  # model load, text prototypes, the few-shot images decoded once
    sync(device)
    workspace_s = time.perf_counter() - started
    split = workspace.plan.splits[0]
    started = time.perf_counter()
    for images in (split.train, split.val):  # the frozen encoder's features, once per process (features.py)
        workspace.features(images, Placement.of(config.train.device, config.train.precision).dtype)
    sync(device)
    cache_s = time.perf_counter() - started
    log(f"workspace {workspace_s:.1f} s, feature cache fill {cache_s:.1f} s "
        f"({len(split.train.labels)} train + {len(split.val.labels)} validation images)")
    out = {"workspace_s": workspace_s, "feature_cache_s": cache_s, "train_images": len(split.train.labels),
           "val_images": len(split.val.labels), "rows": {}}
    for row in rows:
        name = "lora" if row == DORA else row
        method = get_method(name)
        options = dict(config.methods.get(name, {}))
        if row == DORA:
            options["use_dora"] = True
        values = dict(max_epochs=epochs, batch_size=32, patience=None) if method.trains else {}
        train = merged_train(config, name, **values)
        times = []
        for _ in range(repeats):  # the same trial again: the first of a process pays one-off set-up
            outcome = run_trial(workspace, name, options, train, progress=False)
            sync(device)
            times.append(outcome.seconds)
        trained = len(outcome.training.history) if method.trains else 0
        out["rows"][row] = {
            "method": name, "options": outcome.method_options, "trainable": outcome.trainable_parameters,
            "seconds": sum(times) / len(times), "trial_seconds": times, "epochs": trained,
            "encoder_trains": method.trains_encoder,
            "optimizer": train.optimizer, "learning_rate": train.learning_rate, "batch_size": train.batch_size,
            "augment": train.augment, "val_bacc": outcome.validation.balanced_accuracy,
        }
        seconds = " / ".join(f"{t:.1f}" for t in times)
        log(f"{row}: {outcome.trainable_parameters:,} trainable, {seconds} s, {trained} epochs")
    return out


def report(results: dict) -> str:
    m, r = results["machine"], results["measured"]
    lines = [f"# Method cost at PLIP size ({m['device']})", "",
             f"- date: {m['date']}; commit {m['commit']}; {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch "
             f"threads), {m['ram_gib']} GiB RAM; GPU: {m['gpu']}; torch {m['versions']['torch']}, transformers "
             f"{m['versions']['transformers']}, peft {m['versions']['peft']}; load average at start "
             f"{m['load_average_start']:.2f}",
             f"- model: {results['model']['architecture']}, random weights, {results['model']['vision_parameters']:,} "
             f"parameters in the vision tower and projection ({results['model']['all_parameters']:,} in all), "
             "loaded through `load_base_model` from a save_pretrained folder",
             f"- trials: studies/demo.yaml, SICAPv2's 4 classes of the demo kit, holdout validation: "
             f"{r['train_images']} training and {r['val_images']} validation images; each method's own "
             f"training defaults, but {results['epochs']} epochs, batch 32, fp32, no early stopping; "
             "Tip-Adapter trains nothing (its zero-epoch trial); LoRA at demo.yaml's rank 4, B zeros, and "
             f"{DORA} the same with `use_dora: true`",
             f"- seconds: `TrialOutcome.seconds` of each of {results['repeats']} identical trials in turn "
             f"({results['epochs']} epochs: training and the validation pass each epoch), in one process after the "
             "workspace "
             f"({r['workspace_s']:.1f} s: model load, text prototypes, images decoded) and the frozen encoder's "
             f"feature cache ({r['feature_cache_s']:.1f} s for the {r['train_images'] + r['val_images']} images, once per "
             "process; the methods marked 'cached' use it); trainable: `TrialOutcome.trainable_parameters`, "
             "what a study logs per trial (the 4 x 512 head included where it trains)",
             f"- run time: {results['run_s'] / 60:.1f} minutes in all, peak RSS {results['peak_rss_mib']:,.0f} MiB", "",
             f"| method | trainable parameters | seconds per trial, {results['epochs']} epochs (each of "
             f"{results['repeats']} trials) | encoder | optimizer, lr |",
             "|---|---:|---:|---|---|"]
    for row, v in r["rows"].items():
        encoder = "trains" if v["encoder_trains"] else "frozen, cached"
        epochs = "0 epochs" if not v["epochs"] else f"{v['optimizer']}, {v['learning_rate']:g}"
        times = " / ".join(f"{t:.1f}" if t >= 1 else f"{t:.2f}" for t in v["trial_seconds"])
        lines.append(f"| {row} | {v['trainable']:,} | {times} | {encoder} | {epochs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", help=f"rows to run (default: every registered method, and {DORA})")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="trials per method (the table gives each one's seconds)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = args.methods or rows_to_run()
    out = args.out or ROOT / "benchmarks" / "results" / f"method-cost-{args.device}-{date.today().isoformat()}.md"
    started = time.perf_counter()
    machine = machine_info(args.device)
    from hpo_peft.demo_kit import build_demo_kit

    build_demo_kit(KIT)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="plip-architecture-") as folder:
        model = build_model_folder(KIT, Path(folder), full_arch=True)
        log(f"saved {model['architecture']} ({model['vision_parameters']:,} vision parameters) to {folder}")
        measured = measure(rows, Path(folder), args.epochs, args.device, args.repeats)
    model.pop("folder")
    results = {"machine": machine, "epochs": args.epochs, "repeats": args.repeats, "model": model, "measured": measured,
               "run_s": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out} and its .json ({results['run_s']:.0f} s)")


if __name__ == "__main__":
    main()

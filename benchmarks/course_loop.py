"""(a) baseline: the course notebook's training loop, written out here (its `vlms` helpers are not
part of the course material we have), timed for one trial of one method: PIL decoding and
transforms in every `__getitem__`, a DataLoader, the notebook's PLIPWrapper + ZSLinearProbe head,
its unfreezing cells and LoRA, Adam, fp32, `train_ft`'s loop and a predict pass for validation."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from harness import sync
from PIL import Image


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

    from hpo_peft.core.config import DataConfig
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
    from hpo_peft.core.config import COURSE_DESCRIPTIONS, COURSE_TEMPLATES

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

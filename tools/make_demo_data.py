"""Builds the SYNTHETIC demo data set: procedurally drawn "scans", no download, no real patients.

Every image is drawn from scratch with numpy: CT, MRI (T2-like), chest X-ray and H&E-like
histopathology, of the brain, chest, abdomen, liver or colon. Half of the images carry a finding
(hyperdense/hyperintense/hypodense lesions, lung nodules or opacities, tumor nests) with a count
(1-3), a side (patient's left/right, shown in radiological convention: the patient's right is
on the image's left) and a size (small/large). All text (captions, instructions, questions and
answers) is generated from those drawn findings by templates, so every answer can be read off
the image and a trained model can beat an untrained one. Nothing here is medical data.

The VQA questions are balanced per question text: every text (say "Is this a CT image?") gets
each of its answers equally often, in train and in test, so the image-blind baseline that
answers each question with its most common training answer
(`python -m exgra_jax.eval.question_prior`) is at chance, and beating it shows that a model
reads the image.

    python tools/make_demo_data.py --out /tmp/demo_data [--seed 0] [--num-images 400]
        [--vqa-train-per-answer 60] [--vqa-test-per-answer 6]

Output (all paths relative to --out; images are referenced by file name, LLaVA-Med style):
    images/synth_XXXXX.png   RGB PNGs, --image-size pixels square
    pretrain.json            LLaVA-Med stage-1 style: one caption turn per train image,
                             with `conversations` and `conversations_long` (extended captions)
    instruct.json            LLaVA-Med stage-2 style multi-turn instructions, same two keys
    vqa/train.json, vqa/test.json, vqa/candidate.json
                             LLaVA-Med VQA format (OPEN and CLOSED questions, options appended
                             to closed ones) and the open-answer candidate list
    findings.json            the drawn ground truth per image (split, modality, organ, lesions)
    tokenizer/               a small LLaMA-style BPE tokenizer (Hugging Face format), trained
                             on the conversations as the llava_v0 template renders them, so
                             the system prompt and role tags cost one token per word
    README.txt               says that all of the above is synthetic

The output is a deterministic function of the flags (same --seed, same bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

# Runnable as a script from the repository root without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exgra_jax.data.conversation import get_template, normalize_turns  # noqa: E402
from exgra_jax.data.tfds.vqa_export import (  # noqa: E402
    IMAGE_PLACEHOLDER,
    VQAItem,
    export_vqa,
    write_json,
)

SYNTHETIC_NOTICE = (
    "SYNTHETIC DATA: procedurally drawn images and template-generated text for demos and "
    "tests. Not real medical images, not medical advice, no patient data."
)

# The conversation template of configs/demo.py (the default, ExGra-Med's llava_v0).
DEMO_TEMPLATE = "llava_v0"
# (modality, organ) pairs that get drawn, each equally often.
SCAN_TYPES = [
    ("CT", "brain"),
    ("MRI", "brain"),
    ("CT", "chest"),
    ("X-ray", "chest"),
    ("CT", "abdomen"),
    ("MRI", "abdomen"),
    ("pathology", "liver"),
    ("pathology", "colon"),
]
FINDING_NOUN = {
    ("CT", "brain"): "hyperdense lesion",
    ("MRI", "brain"): "hyperintense lesion",
    ("CT", "chest"): "nodule",
    ("X-ray", "chest"): "opacity",
    ("CT", "abdomen"): "hypodense lesion",
    ("MRI", "abdomen"): "hyperintense lesion",
    ("pathology", "liver"): "tumor nest",
    ("pathology", "colon"): "tumor nest",
}
LOCATION = {"brain": "{side} hemisphere", "chest": "{side} lung", "abdomen": "{side} abdomen"}
# Nominal field of view (mm) of the whole image, to turn radii into sizes in the long answers.
FIELD_OF_VIEW_MM = {"brain": 220.0, "chest": 360.0, "abdomen": 400.0, "liver": 0.8, "colon": 0.8}
MODALITY_OPEN_ANSWER = {"CT": "CT", "MRI": "MRI", "X-ray": "X-ray", "pathology": "histopathology"}
MODALITY_LONG = {
    "CT": "axial computed tomography (CT)",
    "MRI": "axial T2-weighted magnetic resonance imaging (MRI)",
    "X-ray": "frontal (posteroanterior) chest radiograph (X-ray)",
    "pathology": "hematoxylin and eosin (H&E) stained histopathology",
}
ANATOMY = {
    ("CT", "brain"): "the skull, both cerebral hemispheres and the lateral ventricles",
    ("MRI", "brain"): "the scalp, both cerebral hemispheres, the lateral ventricles and the "
    "cerebrospinal fluid spaces",
    ("CT", "chest"): "both lungs, the mediastinum with the heart, and the thoracic spine",
    ("X-ray", "chest"): "both lung fields, the ribs, the cardiac silhouette and the diaphragm",
    ("CT", "abdomen"): "the liver, the spleen, both kidneys, the aorta and the lumbar spine",
    ("MRI", "abdomen"): "the liver, the spleen, both kidneys and the spine with "
    "bright subcutaneous fat",
    ("pathology", "liver"): "hepatocyte cords radiating from a central vein",
    ("pathology", "colon"): "colonic crypts with goblet cells in the lamina propria",
}
FINDING_LONG = {
    ("CT", "brain"): "bright compared with the brain parenchyma, as seen with acute blood",
    ("MRI", "brain"): "bright on T2, in keeping with edema or gliosis",
    ("CT", "chest"): "of soft-tissue attenuation within the aerated lung",
    ("X-ray", "chest"): "ill-defined, increasing the density of the lung field",
    ("CT", "abdomen"): "darker than the surrounding parenchyma, as seen with cysts or "
    "metastases",
    ("MRI", "abdomen"): "very bright on T2, as seen with fluid-filled cysts",
    ("pathology", "liver"): "made of crowded hyperchromatic nuclei, replacing normal cords",
    ("pathology", "colon"): "made of crowded hyperchromatic nuclei, replacing normal crypts",
}
REGIONS = ("brain", "chest", "abdomen")  # radiology
TISSUES = ("liver", "colon")  # pathology
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
SMALL_RADIUS = (0.07, 0.10)  # in units of the image half-width
LARGE_RADIUS = (0.14, 0.17)


# ----------------------------------------------------------------------------------------------
# Findings
# ----------------------------------------------------------------------------------------------


@dataclass
class Lesion:
    x: float  # center, image coordinates in [-1, 1], x to the right, y down
    y: float
    radius: float


@dataclass
class Findings:
    image_id: str
    split: str
    modality: str
    organ: str
    size: str = ""  # "small" | "large" | "" (no finding)
    side: str = ""  # patient's "left" | "right" | "" (none, or pathology)
    lesions: list[Lesion] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.lesions)

    @property
    def noun(self) -> str:
        return FINDING_NOUN[(self.modality, self.organ)]

    @property
    def location(self) -> str:
        return LOCATION[self.organ].format(side=self.side) if self.side else ""


def plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    return noun[:-1] + "ies" if noun.endswith("y") else noun + "s"


def sample_plan(rng: np.random.Generator, modality: str, organ: str):
    """The intended finding: (count, side, size, radii). Placement may lower the count."""
    if rng.random() < 0.5:
        return 0, "", "", []
    size = "large" if rng.random() < 0.5 else "small"
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    if size == "large":
        count = min(count, 2)
    side = "" if modality == "pathology" else ("left" if rng.random() < 0.5 else "right")
    lo, hi = LARGE_RADIUS if size == "large" else SMALL_RADIUS
    radii = [float(rng.uniform(lo, hi)) for _ in range(count)]
    return count, side, size, radii


# ----------------------------------------------------------------------------------------------
# Drawing helpers (everything at 2x resolution, then averaged down for anti-aliasing)
# ----------------------------------------------------------------------------------------------


def ellipse(x, y, cx, cy, rx, ry, soft=0.04):
    """Soft-edged ellipse mask in [0, 1]; `soft` is the edge width in normalized radius."""
    d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - d) / soft + 0.5, 0.0, 1.0)


def smooth_noise(rng: np.random.Generator, res: int, cells: int) -> np.ndarray:
    """Unit-variance-ish noise with features about res/cells pixels wide."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((res, res), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32)


def paint(img, mask, value):
    """Alpha-composites `value` (scalar or RGB) over `img` with `mask`."""
    if img.ndim == 3:
        mask = mask[..., None]
    return img * (1.0 - mask) + np.asarray(value, np.float32) * mask


@dataclass
class Canvas:
    image: np.ndarray  # [R, R] intensity or [R, R, 3] RGB, floats in ~[0, 1]
    regions: dict  # side ("left" | "right" | "") -> boolean mask of allowed lesion area
    lesion_value: object  # intensity or RGB of a lesion
    lesion_soft: float = 0.15


def _sides(x, inside, margin=0.06):
    # Radiological convention: the patient's right is on the image's left.
    return {"right": inside & (x < -margin), "left": inside & (x > margin)}


def draw_ct_brain(x, y, rng):
    s, dx, dy = rng.uniform(0.9, 1.02), rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)
    rx, ry = 0.74 * s, 0.9 * s
    img = np.full(x.shape, 0.02, np.float32)
    img = paint(img, ellipse(x, y, dx, dy, rx + 0.03, ry + 0.03), 0.33)  # scalp
    img = paint(img, ellipse(x, y, dx, dy, rx, ry), 0.95)  # skull
    brain = ellipse(x, y, dx, dy, rx - 0.08, ry - 0.08)
    img = paint(img, brain, 0.42 + 0.03 * smooth_noise(rng, x.shape[0], 12))
    for sx in (-1, 1):  # lateral ventricles
        img = paint(img, ellipse(x, y, dx + sx * 0.11, dy - 0.05, 0.06, 0.2), 0.15)
    inside = (ellipse(x, y, dx, dy, rx - 0.1, ry - 0.1, soft=1e-3) > 0.5) & (
        (np.abs(x - dx) > 0.2) | (np.abs(y - dy + 0.05) > 0.28)  # keep off the ventricles
    )
    return Canvas(img, _sides(x - dx, inside, margin=0.03), 0.8, 0.1)


def draw_mri_brain(x, y, rng):
    s, dx, dy = rng.uniform(0.9, 1.02), rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)
    rx, ry = 0.74 * s, 0.9 * s
    img = np.full(x.shape, 0.02, np.float32)
    img = paint(img, ellipse(x, y, dx, dy, rx + 0.04, ry + 0.04), 0.65)  # scalp fat
    img = paint(img, ellipse(x, y, dx, dy, rx, ry), 0.08)  # cortical bone: dark
    img = paint(img, ellipse(x, y, dx, dy, rx - 0.05, ry - 0.05), 0.85)  # CSF rim
    brain = ellipse(x, y, dx, dy, rx - 0.08, ry - 0.08)
    img = paint(img, brain, 0.45 + 0.07 * smooth_noise(rng, x.shape[0], 16))
    for sx in (-1, 1):
        img = paint(img, ellipse(x, y, dx + sx * 0.11, dy - 0.05, 0.06, 0.2), 0.9)
    inside = (ellipse(x, y, dx, dy, rx - 0.1, ry - 0.1, soft=1e-3) > 0.5) & (
        (np.abs(x - dx) > 0.2) | (np.abs(y - dy + 0.05) > 0.28)  # keep off the ventricles
    )
    return Canvas(img, _sides(x - dx, inside, margin=0.03), 1.0, 0.2)


def draw_ct_chest(x, y, rng):
    dx, dy = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    img = np.full(x.shape, 0.02, np.float32)
    img = paint(img, ellipse(x, y, dx, dy + 0.05, 0.93, 0.7), 0.3)  # subcutaneous fat
    img = paint(img, ellipse(x, y, dx, dy + 0.05, 0.87, 0.64), 0.45)
    vessels = 0.03 * np.abs(smooth_noise(rng, x.shape[0], 20))
    lungs = np.zeros(x.shape, bool)
    for sx in (-1, 1):
        cx, rx, ry = dx + sx * 0.42, rng.uniform(0.3, 0.35), rng.uniform(0.44, 0.5)
        img = paint(img, ellipse(x, y, cx, dy, rx, ry), 0.06 + vessels)
        lungs |= ellipse(x, y, cx, dy, rx - 0.05, ry - 0.05, soft=1e-3) > 0.5
    img = paint(img, ellipse(x, y, dx + 0.06, dy + 0.12, 0.2, 0.26), 0.5)  # heart
    img = paint(img, ellipse(x, y, dx, dy + 0.52, 0.11, 0.1), 0.95)  # vertebra
    img = paint(img, ((y > 0.86) & (y < 0.9)).astype(np.float32), 0.6)  # table
    return Canvas(img, _sides(x - dx, lungs, margin=0.1), 0.5, 0.1)


def draw_xray_chest(x, y, rng):
    dx = rng.uniform(-0.04, 0.04)
    xs = x - dx
    img = np.full(x.shape, 0.04, np.float32)
    torso = (np.abs(xs / 0.9) ** 4 + np.abs((y - 0.1) / 0.95) ** 4) < 1
    img = paint(img, torso.astype(np.float32), 0.35)
    lungs = np.zeros(x.shape, bool)
    for sx in (-1, 1):
        lung = ellipse(x, y, dx + sx * 0.38, -0.05, 0.3, 0.55, soft=0.2)
        img = paint(img, lung, 0.1 + 0.05 * (y + 1) / 2)
        lungs |= ellipse(x, y, dx + sx * 0.38, -0.05, 0.25, 0.48, soft=1e-3) > 0.5
    for y0 in np.arange(-0.6, 0.4, 0.14):  # ribs: arcs that bend down laterally
        rib = np.abs(y - (y0 + 0.3 * (np.abs(xs) - 0.1) ** 2)) < 0.025
        img = paint(img, (rib & torso & (np.abs(xs) > 0.1)).astype(np.float32) * 0.5, 0.6)
    img = paint(img, (np.abs(xs) < 0.09).astype(np.float32) * torso, 0.55)  # spine
    heart = ellipse(x, y, dx + 0.14, 0.22, 0.28, 0.24)  # patient's left = image right
    img = paint(img, heart, 0.6)
    img = paint(img, (torso & (y > 0.5)).astype(np.float32), 0.5)  # diaphragm / abdomen
    lungs &= heart < 0.01
    return Canvas(img, _sides(xs, lungs, margin=0.1), 0.58, 0.35)


def draw_abdomen(x, y, rng, mri):
    dx, dy = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    #            fat   body  liver  spleen kidney spine  aorta  lesion
    tones = (0.8, 0.3, 0.22, 0.45, 0.55, 0.35, 0.1, 0.95) if mri else (
        0.28, 0.42, 0.56, 0.52, 0.6, 0.95, 0.7, 0.22)
    fat, body, liver, spleen, kidney, spine, aorta, lesion = tones
    img = np.full(x.shape, 0.02, np.float32)
    img = paint(img, ellipse(x, y, dx, dy, 0.92, 0.72), fat)
    body_tex = body + 0.03 * smooth_noise(rng, x.shape[0], 10)
    img = paint(img, ellipse(x, y, dx, dy, 0.84, 0.64), body_tex)
    img = paint(img, ellipse(x, y, dx - 0.33, dy - 0.12, 0.44, 0.4), liver)
    img = paint(img, ellipse(x, y, dx + 0.48, dy - 0.1, 0.22, 0.28), spleen)
    for sx in (-1, 1):
        img = paint(img, ellipse(x, y, dx + sx * 0.33, dy + 0.3, 0.1, 0.15), kidney)
    img = paint(img, ellipse(x, y, dx, dy + 0.45, 0.12, 0.11), spine)
    img = paint(img, ellipse(x, y, dx + 0.05, dy + 0.24, 0.05, 0.05), aorta)
    inside = (ellipse(x, y, dx, dy, 0.72, 0.52, soft=1e-3) > 0.5) & (
        (np.abs(x - dx) > 0.2) | (y - dy < 0.1)
    )
    return Canvas(img, _sides(x - dx, inside, margin=0.12), lesion, 0.1)


def draw_pathology(x, y, rng, organ):
    res = x.shape[0]
    stain = rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
    pink = np.array([0.93, 0.68, 0.8], np.float32) + stain
    purple = np.array([0.35, 0.18, 0.55], np.float32) + stain
    img = np.broadcast_to(pink, (res, res, 3)).copy()
    img = img + 0.04 * smooth_noise(rng, res, 24)[..., None]
    nuclei = np.zeros(x.shape, np.float32)
    if organ == "liver":
        cx, cy = rng.uniform(-0.3, 0.3, size=2)
        angle = np.arctan2(y - cy, x - cx)
        sinusoids = (np.cos(angle * 14) > 0.85).astype(np.float32)  # radial cords
        img = paint(img, sinusoids * 0.6, np.array([0.98, 0.9, 0.93], np.float32))
        img = paint(img, ellipse(x, y, cx, cy, 0.1, 0.1), np.array([0.98, 0.95, 0.97]))
        for gx in np.arange(-0.95, 1.0, 0.16):
            for gy in np.arange(-0.95, 1.0, 0.16):
                px, py = gx + rng.uniform(-0.04, 0.04), gy + rng.uniform(-0.04, 0.04)
                nuclei = np.maximum(nuclei, ellipse(x, y, px, py, 0.025, 0.025, soft=0.3))
    else:
        for _ in range(int(rng.integers(5, 8))):  # crypts: pale lumen, ring of nuclei
            gx, gy = rng.uniform(-0.8, 0.8, size=2)
            r = rng.uniform(0.12, 0.18)
            img = paint(img, ellipse(x, y, gx, gy, r * 0.6, r * 0.6), np.array([0.98, 0.95, 0.97]))
            for t in np.linspace(0, 2 * np.pi, 12, endpoint=False):
                px, py = gx + r * np.cos(t), gy + r * np.sin(t)
                nuclei = np.maximum(nuclei, ellipse(x, y, px, py, 0.022, 0.03, soft=0.3))
        for _ in range(40):  # scattered stromal nuclei
            px, py = rng.uniform(-1, 1, size=2)
            nuclei = np.maximum(nuclei, ellipse(x, y, px, py, 0.02, 0.02, soft=0.3))
    img = paint(img, nuclei, purple)
    inside = (np.abs(x) < 0.82) & (np.abs(y) < 0.82)
    nest = np.array([0.3, 0.1, 0.42], np.float32) + stain
    return Canvas(img, {"": inside}, nest, 0.1)


def draw_anatomy(modality, organ, x, y, rng) -> Canvas:
    if modality == "pathology":
        return draw_pathology(x, y, rng, organ)
    if organ == "abdomen":
        return draw_abdomen(x, y, rng, mri=modality == "MRI")
    return {
        ("CT", "brain"): draw_ct_brain,
        ("MRI", "brain"): draw_mri_brain,
        ("CT", "chest"): draw_ct_chest,
        ("X-ray", "chest"): draw_xray_chest,
    }[(modality, organ)](x, y, rng)


def place_lesions(rng, region: np.ndarray, coords: np.ndarray, radii: list[float]):
    """Non-overlapping discs fully inside `region`.

    Retries the whole layout a few times; returns the layout that fits the most discs (the
    count in the findings is always the number actually drawn).
    """
    res = region.shape[0]
    candidates = np.flatnonzero(region)
    if candidates.size == 0:
        return []
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    best: list[Lesion] = []
    for _ in range(10):
        placed: list[Lesion] = []
        for radius in radii:
            for _ in range(100):
                idx = int(candidates[rng.integers(candidates.size)])
                cx, cy = float(coords[idx % res]), float(coords[idx // res])
                px = np.clip(((cx + radius * np.cos(angles) + 1) / 2 * res).astype(int), 0, res - 1)
                py = np.clip(((cy + radius * np.sin(angles) + 1) / 2 * res).astype(int), 0, res - 1)
                if not region[py, px].all():
                    continue
                if any(np.hypot(cx - o.x, cy - o.y) < radius + o.radius + 0.1 for o in placed):
                    continue
                placed.append(Lesion(cx, cy, radius))
                break
        if len(placed) > len(best):
            best = placed
        if len(best) == len(radii):
            break
    return best


def render(findings: Findings, size: int, seeds, draw_lesions: bool = True) -> np.ndarray:
    """Draws the scan for `findings` (lesions already placed) as uint8 [size, size, 3].

    `seeds` = (anatomy, texture, noise) seed sequences; the same seeds with draw_lesions=False
    give the same picture without the lesions (used by the tests to locate them).
    """
    res = 2 * size
    coords = (np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1
    x, y = np.meshgrid(coords, coords)
    canvas = draw_anatomy(findings.modality, findings.organ, x, y, np.random.default_rng(seeds[0]))
    img = canvas.image
    tex_rng = np.random.default_rng(seeds[1])
    texture = 0.05 * smooth_noise(tex_rng, res, 16)
    if draw_lesions:
        for les in findings.lesions:
            mask = ellipse(x, y, les.x, les.y, les.radius, les.radius, soft=canvas.lesion_soft)
            value = np.asarray(canvas.lesion_value, np.float32)
            value = value + (texture[..., None] if img.ndim == 3 else texture)
            img = paint(img, mask, value)
    noise_rng = np.random.default_rng(seeds[2])
    gain, bias = noise_rng.uniform(0.9, 1.1), noise_rng.uniform(-0.03, 0.03)
    img = img * gain + bias
    if findings.modality == "MRI":  # Rician magnitude noise
        n1, n2 = 0.03 * noise_rng.standard_normal((2,) + img.shape)
        img = np.sqrt((img + n1) ** 2 + n2**2)
    elif findings.modality == "X-ray":
        img = img + 0.02 * smooth_noise(noise_rng, res, 32) + 0.01 * noise_rng.standard_normal(
            img.shape
        )
    else:
        img = img + 0.02 * noise_rng.standard_normal(img.shape)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))  # 2x2 box downsampling
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_seeds(seed: int, index: int):
    """Independent seed streams of one image: (plan, anatomy, texture, noise, text)."""
    return np.random.SeedSequence([seed, index]).spawn(5)


def make_scan(seed: int, index: int, split: str, size: int):
    """Samples the findings of image `index`, places them in the drawn anatomy, renders it."""
    plan_ss, anat_ss, tex_ss, noise_ss, _ = image_seeds(seed, index)
    plan_rng = np.random.default_rng(plan_ss)
    modality, organ = SCAN_TYPES[int(plan_rng.integers(len(SCAN_TYPES)))]
    count, side, size_word, radii = sample_plan(plan_rng, modality, organ)
    findings = Findings(f"synth_{index:05d}", split, modality, organ)
    if count:
        res = 2 * size
        coords = (np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1
        x, y = np.meshgrid(coords, coords)
        canvas = draw_anatomy(modality, organ, x, y, np.random.default_rng(anat_ss))
        findings.lesions = place_lesions(plan_rng, canvas.regions[side], coords, radii)
        if findings.lesions:
            findings.side, findings.size = side, size_word
    return findings, render(findings, size, (anat_ss, tex_ss, noise_ss))


# ----------------------------------------------------------------------------------------------
# Text: captions, instructions (short and extended), VQA
# ----------------------------------------------------------------------------------------------


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" or word.startswith(("MRI", "X-ray", "H&E")) else "a"


def scan_phrase(f: Findings) -> str:
    if f.modality == "pathology":
        return f"H&E-stained histopathology section of {f.organ} tissue"
    if f.modality == "X-ray":
        return "frontal chest X-ray"
    return f"axial {f.modality} of the {f.organ}"


def finding_phrase(f: Findings) -> str:
    """'two small nodules in the right lung' (empty when there is no finding)."""
    if not f.count:
        return ""
    text = f"{NUMBER_WORDS[f.count]} {f.size} {plural(f.noun, f.count)}"
    return text + (f" in the {f.location}" if f.location else "")


def diameters_mm(f: Findings) -> str:
    fov = FIELD_OF_VIEW_MM[f.organ]
    sizes = [les.radius * fov for les in f.lesions]  # diameter = 2r * fov / 2
    unit = "mm"
    if f.modality == "pathology":
        sizes, unit = [s * 1000 for s in sizes], "micrometers"
    return " and ".join(f"{s:.0f}" for s in sizes) + f" {unit}"


def short_caption(f: Findings) -> str:
    scan = scan_phrase(f)
    scan = scan[0].upper() + scan[1:]
    if f.count:
        return f"{scan} showing {finding_phrase(f)}."
    return f"{scan} with no focal abnormality."


def long_caption(f: Findings) -> str:
    kind = MODALITY_LONG[f.modality]
    organ = f"{f.organ} tissue" if f.modality == "pathology" else f"the {f.organ}"
    parts = [
        f"This is {article(kind)} {kind} image of {organ}.",
        f"It shows {ANATOMY[(f.modality, f.organ)]}.",
    ]
    if f.count:
        be = "is" if f.count == 1 else "are"
        parts.append(
            f"There {be} {finding_phrase(f)}, {FINDING_LONG[(f.modality, f.organ)]}; "
            f"{'it measures' if f.count == 1 else 'they measure'} about {diameters_mm(f)} "
            "across."
        )
        if f.side:
            other = "right" if f.side == "left" else "left"
            parts.append(f"The {LOCATION[f.organ].format(side=other)} is unremarkable.")
        parts.append(f"Impression: {plural(f.noun, f.count)} as described; "
                     "correlation with the clinical history is advised.")
    else:
        parts.append("No focal lesion, mass or abnormal density is seen; "
                     "the visualized structures appear within normal limits.")
    return " ".join(parts)


CAPTION_PROMPTS = [
    "Describe the image concisely.",
    "Give a short description of this medical image.",
    "Summarize the visual content of the image.",
    "What does this image show?",
    "Write a brief report for this image.",
]
KIND_QUESTIONS = [
    "What kind of image is this?",
    "Which imaging technique and body region does this image show?",
    "Can you tell me what type of scan this is?",
]
ABNORMAL_QUESTIONS = [
    "Do you see any abnormality?",
    "Are there any abnormal findings in this image?",
    "Is anything abnormal visible here?",
]


def instruction_turns(f: Findings, rng: np.random.Generator):
    """(question, short answer, long answer) turns of one multi-turn instruction example."""
    kind = MODALITY_LONG[f.modality]
    organ = f"{f.organ} tissue" if f.modality == "pathology" else f"the {f.organ}"
    short_kind = "H&E histopathology" if f.modality == "pathology" else f.modality
    turns = [(
        str(rng.choice(KIND_QUESTIONS)),
        f"This is {article(short_kind)} {short_kind} image of {organ}.",
        f"This is {article(kind)} {kind} image of {organ}. "
        f"It shows {ANATOMY[(f.modality, f.organ)]}.",
    )]
    q = str(rng.choice(ABNORMAL_QUESTIONS))
    if f.count:
        be = "is" if f.count == 1 else "are"
        turns.append((
            q,
            f"Yes, there {be} {finding_phrase(f)}.",
            f"Yes. There {be} {finding_phrase(f)}, {FINDING_LONG[(f.modality, f.organ)]}. "
            "The remaining structures look normal.",
        ))
        turns.append((
            "How big " + ("is it?" if f.count == 1 else "are they?"),
            f"{'It is' if f.count == 1 else 'They are'} {f.size}.",
            f"{'It is' if f.count == 1 else 'They are'} {f.size}, about {diameters_mm(f)} "
            "across on this image.",
        ))
    else:
        turns.append((
            q,
            "No, there is no focal abnormality.",
            "No. There is no focal lesion, mass or abnormal density, and the visualized "
            f"structures ({ANATOMY[(f.modality, f.organ)]}) appear within normal limits.",
        ))
    return turns


def to_conversations(turns, long: bool):
    conv = []
    for k, (q, short, extended) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if k == 0 else q})
        conv.append({"from": "gpt", "value": extended if long else short})
    return conv


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def vqa_pool(f: Findings):
    """Every (question, answer, answer_type) this image supports, all read off the drawing.

    Yes/no questions and "A or B" choices are asked in every variant (each modality, each
    organ of the image's family, each side, both orders), so that `balance_by_question`
    finds each answer of each text.
    """
    noun = f.noun
    pool = [
        ("What imaging modality was used?", MODALITY_OPEN_ANSWER[f.modality], "OPEN"),
        (f"Is there {article(noun)} {noun} in this image?", yes_no(f.count > 0), "CLOSED"),
        ("Which organ is shown?", f.organ, "OPEN"),
        (f"How many {plural(noun, 2)} are there?", str(f.count), "OPEN"),
    ]
    for modality, word in MODALITY_OPEN_ANSWER.items():
        pool.append((f"Is this {article(word)} {word} image?", yes_no(modality == f.modality),
                     "CLOSED"))
    # Negatives come from the same family only: an abdominal CT does show the liver and colon.
    if f.modality == "pathology":
        family, organ_choice = TISSUES, "Is this {a} or {b} tissue?"
        pool += [(f"Is this {tissue} tissue?", yes_no(tissue == f.organ), "CLOSED")
                 for tissue in TISSUES]
    else:
        family, organ_choice = REGIONS, "Does this image show the {a} or the {b}?"
        pool += [(f"Does this image show the {region}?", yes_no(region == f.organ), "CLOSED")
                 for region in REGIONS]
    # "A or B" choices, in both orders, between the image's modality (organ) and each other.
    own = MODALITY_OPEN_ANSWER[f.modality]
    for other in MODALITY_OPEN_ANSWER.values():
        if other != own:
            pool += [(f"Is this {article(a)} {a} or {article(b)} {b} image?", own, "CLOSED")
                     for a, b in ((own, other), (other, own))]
    for other in family:
        if other != f.organ:
            pool += [(organ_choice.format(a=a, b=b), f.organ, "CLOSED")
                     for a, b in ((f.organ, other), (other, f.organ))]
    if f.count:
        pool += [
            (f"Is there more than one {noun}?", yes_no(f.count > 1), "CLOSED"),
            (f"Is the {noun} small or large?", f.size, "CLOSED"),
            (f"What is the size of the {noun}?", f.size, "OPEN"),
        ]
    if f.side:
        pool += [(f"Is the {noun} in the {LOCATION[f.organ].format(side=side)}?",
                  yes_no(side == f.side), "CLOSED") for side in ("left", "right")]
        pool += [
            (f"Is the {noun} on the patient's left or right side?", f.side, "CLOSED"),
            (f"Where is the {noun} located?", f.location, "OPEN"),
        ]
    return pool


def vqa_items(f: Findings) -> list[VQAItem]:
    image = f"{f.image_id}.png"
    return [VQAItem(f"{f.image_id}_q{k}", image, q, a, t)
            for k, (q, a, t) in enumerate(vqa_pool(f))]


def balance_by_question(items: list[VQAItem], rng: np.random.Generator,
                        max_per_answer: int) -> list[VQAItem]:
    """Keeps, for each question text, the same number of items of each of its answers.

    That number is the count of the text's rarest answer, at most `max_per_answer`; the items
    kept are drawn at random, and texts with a single answer are dropped. Answering a question
    from its text alone (the most common answer to it in training) then does no better than
    chance, so only a model that reads the image beats that prior. Order is preserved.
    A split too small to balance at all (a handful of images, as in test fixtures) keeps every
    item rather than none.
    """
    by_question: dict[str, dict[str, list[int]]] = {}
    for index, item in enumerate(items):
        by_question.setdefault(item.question, {}).setdefault(item.answer, []).append(index)
    keep = []
    for by_answer in by_question.values():
        if len(by_answer) < 2:
            continue
        n = min(max_per_answer, *(len(indices) for indices in by_answer.values()))
        for indices in by_answer.values():
            keep += rng.choice(indices, size=n, replace=False).tolist()
    return [items[i] for i in sorted(keep)] if keep else list(items)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def rendered_text(conversation) -> str:
    """A conversation as the model reads it: in the conversation template (system prompt,
    role tags, the options of closed questions), which the tokenizer must then encode in few
    tokens; the image placeholder becomes image tokens, so it is left out."""
    turns = [(role, text.replace(IMAGE_PLACEHOLDER, "").strip())
             for role, text in normalize_turns(conversation)]
    return get_template(DEMO_TEMPLATE).render(turns)[0]


def findings_record(f: Findings) -> dict:
    rec = asdict(f)
    rec["id"] = rec.pop("image_id")
    rec["image"] = f"{f.image_id}.png"
    rec["count"] = f.count
    rec["noun"] = f.noun
    rec["location"] = f.location
    rec["lesions"] = [
        {k: round(v, 6) for k, v in asdict(les).items()} for les in f.lesions
    ]
    return rec


def build(out: str, seed: int = 0, num_images: int = 400, image_size: int = 64,
          test_fraction: float = 0.2, vqa_max_per_answer: tuple[int, int] = (60, 6),
          vocab_size: int = 1000, tokenizer: bool = True, verbose: bool = True) -> dict:
    """Writes the data set to `out`; returns a summary dict (counts and paths).

    `vqa_max_per_answer` caps (train, test) questions per question text and answer.
    """
    if num_images < 2:
        raise ValueError("--num-images must be at least 2 (one train and one test image)")
    if image_size < 16 or image_size % 2:
        raise ValueError("--image-size must be an even number >= 16")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("--test-fraction must be in (0, 1)")
    num_test = min(max(1, round(num_images * test_fraction)), num_images - 1)
    order = np.random.default_rng(np.random.SeedSequence([seed, 2**31])).permutation(num_images)
    test_ids = {int(i) for i in order[:num_test]}

    image_dir = os.path.join(out, "images")
    os.makedirs(image_dir, exist_ok=True)
    all_findings, pretrain, instruct = [], [], []
    vqa = {"train": [], "test": []}
    for index in range(num_images):
        split = "test" if index in test_ids else "train"
        f, pixels = make_scan(seed, index, split, image_size)
        Image.fromarray(pixels).save(os.path.join(image_dir, f"{f.image_id}.png"), optimize=False)
        all_findings.append(f)
        text_rng = np.random.default_rng(image_seeds(seed, index)[4])
        vqa[split] += vqa_items(f)
        if split == "train":
            prompt = "<image>\n" + str(text_rng.choice(CAPTION_PROMPTS))
            pretrain.append({
                "id": f.image_id,
                "image": f"{f.image_id}.png",
                "conversations": [{"from": "human", "value": prompt},
                                  {"from": "gpt", "value": short_caption(f)}],
                "conversations_long": [{"from": "human", "value": prompt},
                                       {"from": "gpt", "value": long_caption(f)}],
            })
            turns = instruction_turns(f, text_rng)
            instruct.append({
                "id": f.image_id,
                "image": f"{f.image_id}.png",
                "conversations": to_conversations(turns, long=False),
                "conversations_long": to_conversations(turns, long=True),
            })

    for k, split in enumerate(("train", "test")):
        balance_rng = np.random.default_rng(np.random.SeedSequence([seed, 2**31 + 1 + k]))
        vqa[split] = balance_by_question(vqa[split], balance_rng, vqa_max_per_answer[k])
    write_json(os.path.join(out, "pretrain.json"), pretrain)
    write_json(os.path.join(out, "instruct.json"), instruct)
    write_json(os.path.join(out, "findings.json"), [findings_record(f) for f in all_findings])
    stats = export_vqa(vqa, os.path.join(out, "vqa"))
    with open(os.path.join(out, "README.txt"), "w", encoding="utf-8") as fh:
        fh.write(SYNTHETIC_NOTICE + "\n\nMade by tools/make_demo_data.py "
                 f"--seed {seed} --num-images {num_images} --image-size {image_size}.\n")
    if tokenizer:
        from exgra_jax.data.tokenizer import train_tokenizer

        conversations = [rec[key] for rec in pretrain + instruct
                         for key in ("conversations", "conversations_long")]
        for split in vqa:
            with open(os.path.join(out, "vqa", f"{split}.json"), encoding="utf-8") as fh:
                conversations += [rec["conversations"] for rec in json.load(fh)]
        train_tokenizer(map(rendered_text, conversations), os.path.join(out, "tokenizer"),
                        vocab_size=vocab_size)

    summary = {
        "out": out,
        "num_images": num_images,
        "num_train_images": num_images - num_test,
        "num_test_images": num_test,
        "num_with_findings": sum(1 for f in all_findings if f.count),
        "num_vqa_train": len(vqa["train"]),
        "num_vqa_test": len(vqa["test"]),
        "num_closed_without_options": sum(len(s.no_options_ids) for s in stats.values()),
        "tokenizer": os.path.join(out, "tokenizer") if tokenizer else None,
    }
    if verbose:
        print(SYNTHETIC_NOTICE)
        for key, value in summary.items():
            print(f"  {key}: {value}")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--vqa-train-per-answer", type=int, default=60,
                        help="at most this many train questions per question text and answer")
    parser.add_argument("--vqa-test-per-answer", type=int, default=6,
                        help="the same for the test questions")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--no-tokenizer", action="store_true", help="skip training the tokenizer")
    args = parser.parse_args(argv)
    build(args.out, seed=args.seed, num_images=args.num_images, image_size=args.image_size,
          test_fraction=args.test_fraction,
          vqa_max_per_answer=(args.vqa_train_per_answer, args.vqa_test_per_answer),
          vocab_size=args.vocab_size, tokenizer=not args.no_tokenizer)


if __name__ == "__main__":
    main()

"""Every number this companion quotes from the paper, each with the table or section it comes from.

The harness (spvr_lib.paper) shows these beside our own results; the method (spvr_lib) never reads
them.  Values are as printed in Hassan, Paik, Khare, "SPvR: Structured Pruning via Ranking"
(UAI 2025); None stands for a "-" in the paper.
"""
from __future__ import annotations

# --------------------------------------------------------------------------- Section 3.1.1
# The worked example: f(x) and the three masked outputs, and the KL / Eq. 2 values the paper prints.
WORKED_P = [0.1, 0.3, 0.6]


WORKED_P_MASKED = [[0.1, 0.6, 0.3], [0.01, 0.1, 0.89], [0.1, 0.8, 0.1]]


WORKED_PAPER = {"KL": [0.20, 0.32, 0.78], "L": [1.3, 0.29, 1.5]}


# Appendix A: the setup of the Guyon experiment as the paper states it (samples, features, label noise,
# hidden ReLU units, Adam's learning rate).
GUYON_SETUP = dict(n_samples=1000, n_features=100, flip_y=0.02, hidden=64, lr=1e-3)


# Appendix A, Table 5: Kendall tau of each criterion's neuron ranking against the ground truth.
TABLE5_PAPER = {"SPvR": 0.861, "KL": 0.586}


# Table 1's base rows and the sizes of Tables 6-8's 0% rows, as the paper prints them.
PAPER_BASE = {
    "vgg16": {"paper dataset": "CIFAR-10", "paper top1": 94.25, "paper top5": None, "paper size (MB)": 112},
    "resnet34": {"paper dataset": "Tiny ImageNet", "paper top1": 63.02, "paper top5": 83.22, "paper size (MB)": 163},
    "resnet50": {"paper dataset": "ImageNet1K", "paper top1": 76.32, "paper top5": 92.89, "paper size (MB)": 195},
}


# Tables 6-8 as the paper prints them: rate -> (size on disk in MB, architecture).  Table 8's 70% row
# lists "x 6" for the last stage; ResNet50's last stage has 3 blocks, so we read it as a typo and
# show it as printed.
PAPER_ARCHITECTURES = {
    "vgg16": {
        0.0: (112, '64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"'),
        0.7: (33.7, '58, 64, "M", 126, 128, "M", 238, 224, "M", 192, 192, 94, "M", 56, 482, 512, "M"'),
        0.8: (22.5, '58, 64, "M", 126, 128, "M", 238, 224, "M", 192, 192, 94, "M", 56, 196, 512, "M"'),
        0.9: (11.2, '54, 64, "M", 124, 128, "M", 224, 220, "M", 174, 110, "M"'),
        0.95: (5.56, '42, 64, "M", 110, 126, "M", 170, 138, 92, "M"'),
        0.98: (2.25, '36, 62, "M", 78, 112, "M", 92, 44, 46, "M"'),
    },
    "resnet34": {
        0.0: (163, "[64, 64] × 3, [128, 128] × 4, [256, 256] × 6, [512, 512] × 3"),
        0.7: (46.8, "[60, 60] × 3, [112, 112] × 4, [328, 328] × 3"),
        0.8: (30.6, "[60, 60] × 3, [104, 104] × 4, [256, 256] × 3"),
        0.9: (15.2, "[60, 60] × 3, [100, 100] × 4, [152, 152] × 3"),
        0.95: (8.03, "[60, 60] × 3, [76, 76] × 4, [88, 88] × 3"),
        0.98: (2.72, "[60, 60] × 3, [36, 36] × 4, [44, 44] × 3"),
    },
    "resnet50": {
        0.0: (195, "[64, 64, 64] × 3, [128, 128, 128] × 4, [256, 256, 256] × 6, [512, 512, 512] × 3"),
        0.4: (118, "[64, 64, 64] × 3, [120, 120, 120] × 4, [240, 240, 240] × 6, [328, 328, 328] × 3"),
        0.7: (60.3, "[64, 64, 64] × 3, [112, 112, 112] × 4, [200, 200, 200] × 6, [152, 152, 152] × 6"),
        0.8: (41.5, "[56, 56, 56] × 3, [112, 112, 112] × 4, [168, 168, 168] × 6, [96, 96, 96] × 3"),
        0.95: (12, "[56, 56, 56] × 3, [88, 88, 88] × 4, [64, 64, 64] × 6"),
    },
}


# --------------------------------------------------------------------------- Tables 1-3
# Table 1 (top-1 and top-5 in %, as printed; None where the paper prints "-"). Keyed by
# (model key, rate, method); "base" at rate 0.0 is the unpruned network.  The paper's rows are
# CIFAR-10 (VGG16), Tiny ImageNet (ResNet34) and ImageNet1K (ResNet50).
_T1_METHODS = ("l1", "l2", "taylor", "fpgm", "rcp", "hrank", "curl", "nisp", "otov2", "spvr")
_T1_TOP1 = {
    ("vgg16", 0.70): (93.53, 93.45, 93.23, 92.72, 86.68, 92.84, 94.18, 92.51, 93.20, 94.21),
    ("vgg16", 0.80): (92.60, 92.99, 92.87, 91.63, 85.90, 93.09, 93.89, 91.48, 92.70, 94.33),
    ("vgg16", 0.90): (92.05, 91.64, 91.55, 90.85, 84.00, 92.36, 93.49, 90.28, 91.07, 94.43),
    ("vgg16", 0.95): (90.20, 90.36, 90.37, 88.41, 84.09, 91.44, 92.14, 88.77, 91.03, 93.64),
    ("vgg16", 0.98): (87.32, 87.64, 87.22, 87.09, 83.78, 91.10, 91.66, 87.00, 87.88, 92.60),
    ("resnet34", 0.70): (60.95, 60.50, 60.65, 60.73, 58.18, 57.90, 58.38, 57.06, 58.72, 62.89),
    ("resnet34", 0.80): (58.73, 58.51, 59.40, 59.14, 56.52, 55.30, 56.85, 54.76, 59.05, 62.55),
    ("resnet34", 0.90): (56.42, 56.78, 57.06, 56.22, 54.21, 52.85, 55.13, 52.62, 55.94, 60.36),
    ("resnet34", 0.95): (55.07, 54.96, 55.16, 52.88, 50.65, 50.55, 48.33, 50.82, 52.10, 58.95),
    ("resnet34", 0.98): (52.15, 51.18, 51.59, 50.42, 45.46, 46.83, 39.49, 45.10, 47.73, 55.84),
    ("resnet50", 0.40): (73.82, 73.89, 71.69, 74.83, 75.13, 74.98, None, 75.43, None, 75.58),
    ("resnet50", 0.70): (70.07, 70.91, None, None, None, 69.10, 73.39, None, 72.20, 73.70),
    ("resnet50", 0.80): (68.11, 69.00, None, None, None, None, None, None, 70.10, 72.18),
}
_T1_TOP5 = {
    ("resnet34", 0.70): (81.59, 81.28, 81.68, 81.68, 80.51, 80.27, 80.68, 79.39, 82.04, 83.08),
    ("resnet34", 0.80): (80.65, 80.58, 80.61, 80.39, 79.26, 78.85, 80.22, 77.56, 82.18, 82.73),
    ("resnet34", 0.90): (79.30, 79.40, 79.79, 78.70, 78.08, 77.02, 79.81, 76.78, 81.00, 82.34),
    ("resnet34", 0.95): (79.16, 78.32, 78.86, 76.46, 75.57, 75.68, 74.80, 75.35, 78.66, 81.59),
    ("resnet34", 0.98): (76.68, 77.42, 77.42, 76.13, 72.19, 73.26, 67.46, 71.89, 74.66, 80.72),
    ("resnet50", 0.40): (91.76, 91.82, 91.01, 92.32, 92.52, 92.33, None, 92.45, None, 92.69),
    ("resnet50", 0.70): (89.23, 89.57, None, None, None, 89.58, 91.46, None, 90.70, 91.91),
    ("resnet50", 0.80): (88.06, 88.43, None, None, None, None, None, None, 89.30, 90.58),
}
PAPER_TABLE1: dict[tuple[str, float, str], dict[str, float | None]] = {
    (model, rate, m): {"top1": v1, "top5": _T1_TOP5.get((model, rate), (None,) * 10)[i]}
    for (model, rate), row in _T1_TOP1.items() for i, (m, v1) in enumerate(zip(_T1_METHODS, row))
}
PAPER_TABLE1.update({("vgg16", 0.0, "base"): {"top1": 94.25, "top5": None},
                     ("resnet34", 0.0, "base"): {"top1": 63.02, "top5": 83.22},
                     ("resnet50", 0.0, "base"): {"top1": 76.32, "top5": 92.89}})


# Table 2: fine-tuning (FT) against training from scratch (TFS) at the highest rate without depth reduction.
PAPER_TABLE2: dict[str, dict[str, float | None]] = {
    "vgg16": {"rate": 0.60, "FT top1": 93.40, "TFS top1": 94.25, "FT top5": None, "TFS top5": None},
    "resnet34": {"rate": 0.60, "FT top1": 61.60, "TFS top1": 62.91, "FT top5": 82.70, "TFS top5": 83.11},
    "resnet50": {"rate": 0.90, "FT top1": 67.77, "TFS top1": 69.37, "FT top5": 87.91, "TFS top5": 89.08},
}


PAPER_TABLE3: dict[tuple[str, float, str], dict[str, float | None]] = {}
# Table 3: every method's network trained from scratch at one high rate (OTOv2 excluded).
_T3_METHODS = ("l1", "l2", "taylor", "fpgm", "rcp", "hrank", "curl", "nisp", "spvr")
_T3 = {
    ("vgg16", 0.90, "top1"): (92.70, 92.12, 91.65, 91.00, 88.07, 93.10, 93.69, 90.01, 94.43),
    ("resnet34", 0.90, "top1"): (56.20, 56.88, 57.16, 56.23, 54.25, 52.35, 55.43, 52.93, 60.36),
    ("resnet34", 0.90, "top5"): (79.10, 79.30, 79.89, 78.60, 78.28, 77.34, 80.00, 76.97, 82.34),
    ("resnet50", 0.80, "top1"): (71.50, 71.45, None, None, None, None, None, None, 72.18),
    ("resnet50", 0.80, "top5"): (90.30, 90.40, None, None, None, None, None, None, 90.58),
}
for (_model, _rate, _metric), _row in _T3.items():
    for _m, _v in zip(_T3_METHODS, _row):
        PAPER_TABLE3.setdefault((_model, _rate, _m), {"top1": None, "top5": None})[_metric] = _v


# --------------------------------------------------------------------------- Table 4 and Sections 5.4-6.2
# Table 4 as printed (ImageNet1K): parameters in millions, top-1 in %.
TABLE4_PAPER = {
    "MobileNetV3-small": {"paper params (M)": 2.4, "paper top1": 65.40},
    "MobileNetV3-minimal": {"paper params (M)": 2.0, "paper top1": 61.90},
    "ResNet50-pruned": {"paper params (M)": 1.6, "paper top1": 65.20},
}


# MobileNetV3-small-minimal's share of ResNet50's parameters at the paper's size (1000 classes, RGB,
# width 1): 2,044,736 / 25,557,032 = 8.0% (the paper prints 2.0M and 25.6M).
# (models.spec_params of mobilenetv3("small-minimal", 1000) and resnet50(1000, stem="imagenet"))
# Section 5.4: the pruned ResNet50 has "20% fewer parameters" than MobileNetV3-minimal (1.6M / 2.0M)
PAPER_MOBILENET_BUDGET_FRACTION = 0.8
PAPER_MINIMAL_SHARE = 2_044_736 / 25_557_032


SEGMENTATION_PAPER_MIOU = {"base": 51.2, "pruned": 46.5}   # Section 5.5, CityScapes, % IoU


# Section 6.2: "for d = 32, SPvR can prune VGG16, ResNet34 and ResNet50 under 6 seconds, 8 minutes and
# 30 minutes" (upper bounds, on the paper's GPU and full-size networks).
PAPER_PRUNE_S_AT_D32 = {"vgg16": 6.0, "resnet34": 8 * 60.0, "resnet50": 30 * 60.0}

# Section 6.2 / Figure 2: the group sizes d the paper ablates at full width, per model
PAPER_GROUP_SIZES = {"vgg16": (2, 4, 8, 16, 32), "resnet34": (4, 8, 16, 32), "resnet50": (8, 16, 32)}

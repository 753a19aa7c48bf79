"""VTAB-1k facts: the 19 tasks (docs/methods.md order, groups, class counts) and the two ways of averaging them.

- **group mean**: the mean of the Natural (7), Specialized (4) and Structured (8) group means — the VPT, NOAH,
  FacT (and very likely SQT) papers' "Average";
- **flat mean**: the mean over the 19 tasks — V-PETL Bench's "Mean".

Torch- and pandas-free (the suite validator reads the class counts). `petlbench.report.vtab` turns result rows
into the tasks × methods table with both means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

Group: TypeAlias = Literal["Natural", "Specialized", "Structured"]
GROUPS: Final[tuple[Group, ...]] = ("Natural", "Specialized", "Structured")


@dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task: its folder name in the FacT/NOAH/SQT layout, display name, group and class count."""

    name: str
    display: str
    group: Group
    num_classes: int


# Order and class counts: docs/methods.md Folder names: the FacT/NOAH/SQT `vtab-1k/<task>/` layout (and the
# keys of SQT's per-dataset configs, docs/methods.md).
VTAB_TASKS: Final[tuple[VtabTask, ...]] = (
    VtabTask("cifar", "CIFAR-100", "Natural", 100),
    VtabTask("caltech101", "Caltech101", "Natural", 102),
    VtabTask("dtd", "DTD", "Natural", 47),
    VtabTask("oxford_flowers102", "Flowers102", "Natural", 102),
    VtabTask("oxford_iiit_pet", "Pets", "Natural", 37),
    VtabTask("svhn", "SVHN", "Natural", 10),
    VtabTask("sun397", "Sun397", "Natural", 397),
    VtabTask("patch_camelyon", "Camelyon", "Specialized", 2),
    VtabTask("eurosat", "EuroSAT", "Specialized", 10),
    VtabTask("resisc45", "Resisc45", "Specialized", 45),
    VtabTask("diabetic_retinopathy", "Retinopathy", "Specialized", 5),
    VtabTask("clevr_count", "Clevr-Count", "Structured", 8),
    VtabTask("clevr_dist", "Clevr-Dist", "Structured", 6),
    VtabTask("dmlab", "DMLab", "Structured", 6),
    VtabTask("kitti", "KITTI-Dist", "Structured", 4),
    VtabTask("dsprites_loc", "dSpr-Loc", "Structured", 16),
    VtabTask("dsprites_ori", "dSpr-Ori", "Structured", 16),
    VtabTask("smallnorb_azi", "sNORB-Azim", "Structured", 18),
    VtabTask("smallnorb_ele", "sNORB-Ele", "Structured", 9),
)
TASKS_BY_NAME: Final[Mapping[str, VtabTask]] = {t.name: t for t in VTAB_TASKS}


def group_mean(values: Mapping[str, float]) -> float | None:
    """Mean of the three group means over {task name: accuracy}; None unless all 19 tasks are present."""
    means = [group_means(values).get(g) for g in GROUPS]
    return None if any(m is None for m in means) else sum(m for m in means if m is not None) / len(GROUPS)


def flat_mean(values: Mapping[str, float]) -> float | None:
    """Mean over the 19 tasks; None unless all 19 are present."""
    if any(t.name not in values for t in VTAB_TASKS):
        return None
    return sum(values[t.name] for t in VTAB_TASKS) / len(VTAB_TASKS)


def group_means(values: Mapping[str, float]) -> dict[Group, float]:
    """Mean of each group whose tasks are all present (an incomplete group has no mean)."""
    out: dict[Group, float] = {}
    for group in GROUPS:
        tasks = [t.name for t in VTAB_TASKS if t.group == group]
        if all(name in values for name in tasks):
            out[group] = sum(values[name] for name in tasks) / len(tasks)
    return out

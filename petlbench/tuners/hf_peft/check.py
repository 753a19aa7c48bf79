"""`python -m petlbench.tuners.hf_peft.check`: the pre-flight child that validates peft tuner knobs with peft.

Reads `{"items": [{"params": {...}, "backbone": {...}, "data": {...}, "data_root": ...}, ...]}` on stdin; for each
item, validates the config with peft's config class and injects it into the backbone built on the meta device (no
memory, no weights), as `attach` does in a worker. Writes `{"errors": [{"item": i, "field": ..., "message": ...}]}`
on stdout; `field` is a config field, "peft_type", "tuner" (peft is not installed) or null. The parent
(`petlbench.tuners.hf_peft.preflight`) turns them into lines naming the suite field.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

from pydantic import TypeAdapter


def check_item(item: dict[str, Any]) -> None:
    """Raise the PeftFieldError (or PeftMissing) that a worker would raise for this item."""
    import torch

    from petlbench.backbone import build_backbone
    from petlbench.data.loaders import num_classes
    from petlbench.data.specs import DataSpec
    from petlbench.errors import PetlbenchError
    from petlbench.spec.models import BackboneSpec
    from petlbench.tuners.hf_peft import Peft
    from petlbench.tuners.hf_peft.layers import PeftNeedsWeights, attach_peft, peft_config

    tuner = Peft.model_validate(item["params"])
    peft_config(tuner.peft_type, tuner.config)  # the fields first: they need no model
    # The module names do not depend on the weights: never load a checkpoint or the hub here.
    backbone = BackboneSpec.model_validate(item["backbone"]).model_copy(update={"weights": "random"})
    try:
        classes = num_classes(TypeAdapter(DataSpec).validate_python(item["data"]), item.get("data_root"))
        with torch.device("meta"):
            model = build_backbone(backbone, classes)
    except PetlbenchError:
        return  # a backbone or data problem is not peft's; the other checks and the worker report it
    with torch.device("meta"), contextlib.suppress(PeftNeedsWeights):  # fields and targets were checked already
        attach_peft(model, tuner.peft_type, tuner.config)


def check(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from petlbench.tuners.hf_peft.layers import PeftFieldError, PeftMissing

    errors: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            check_item(item)
        except PeftMissing as exc:
            return [{"item": index, "field": "tuner", "message": str(exc)}]
        except PeftFieldError as exc:
            errors.append({"item": index, "field": exc.field, "message": exc.detail})
    return errors


def main() -> None:
    request = json.load(sys.stdin)
    with contextlib.redirect_stdout(sys.stderr):  # libraries that print keep the answer on stdout clean
        errors = check(request["items"])
    json.dump({"errors": errors}, sys.stdout)


if __name__ == "__main__":
    main()

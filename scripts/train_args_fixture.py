#!/usr/bin/env python3
"""Writes tests/fixtures/train/sdscripts_flags.json: every option train_network.py registers
(name, type, default, nargs, action, choices), read from an sd-scripts checkout's source with
`ast` (no sd-scripts import, so none of its dependencies are needed).

Usage: scripts/train_args_fixture.py /path/to/sd-scripts
"""
import ast
import json
import os
import sys

FUNCS = {
    "library/utils.py": ["add_logging_arguments"],
    "library/train_util.py": [
        "add_sd_models_arguments",
        "add_dataset_arguments",
        "add_training_arguments",
        "add_masked_loss_arguments",
        "add_optimizer_arguments",
    ],
    "library/sai_model_spec.py": ["add_model_spec_arguments"],
    "library/deepspeed_utils.py": ["add_deepspeed_arguments"],
    "library/config_util.py": ["add_config_arguments"],
    "library/custom_train_functions.py": ["add_custom_train_arguments"],
    "train_network.py": ["setup_parser"],
}


def literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return {"name": ast.unparse(node)}


def main():
    root = sys.argv[1]
    flags = []
    for rel, names in FUNCS.items():
        tree = ast.parse(open(os.path.join(root, rel), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                for c in ast.walk(node):
                    if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "add_argument":
                        kw = {k.arg: k.value for k in c.keywords}
                        flags.append(
                            {
                                "name": ast.literal_eval(c.args[0])[2:],
                                "action": literal(kw["action"]) if "action" in kw else None,
                                "type": ast.unparse(kw["type"]) if "type" in kw else None,
                                "default": literal(kw["default"]) if "default" in kw else None,
                                "nargs": literal(kw["nargs"]) if "nargs" in kw else None,
                                "choices": [str(x) for x in literal(kw["choices"])] if "choices" in kw else [],
                            }
                        )
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "sdscripts_flags.json")
    with open(out, "w") as f:
        json.dump(flags, f, indent=0)
    print(f"wrote {len(flags)} options to {out}")


if __name__ == "__main__":
    main()

"""``python -m lorafast <command>`` (also the ``lorafast`` console script).

Commands:
    bench     correctness, speed and memory of lorafast (and each strategy) vs PEFT, the reference and the frozen
              linear, plus host cost per call; --host (host cost only), --quant nf4 (QLoRA vs PEFT), --moe (MoE
              experts: a Qwen3-MoE block, frozen vs PEFT target_parameters vs lorafast)
    roofline  predicted times and ratios on H100 / H200 for the bench shapes
    doctor    versions, device, kernels compiled for it, every strategy checked against float64, what auto picks;
              --json report.json to attach to an issue

Each command is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``; add one by
listing it in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
from typing import List, Optional

# name -> (module, one-line help).
COMMANDS = {
    "bench": ("lorafast.bench",
              "check and time lorafast against PEFT, the reference and the floor (--host, --quant, --moe)"),
    "roofline": ("lorafast.roofline", "print the roofline prediction table (H100/H200)"),
    "doctor": ("lorafast.doctor", "check lorafast on this machine and write a report (--quick, --json PATH)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the chosen command; returns its exit status."""
    parser = argparse.ArgumentParser(prog="lorafast", description="lorafast command-line tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args.module).run(args))


if __name__ == "__main__":
    raise SystemExit(main())

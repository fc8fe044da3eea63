"""Read a training run's log (train.py's stdout: one JSON entry per 50 steps among other lines) for the chain's
checks: did the run end with its held-out probe above a floor, and how did it leave its stages.

    python -m pdllm.training.runlog OUT/train_official_log.txt --min-em 0.2

The official run is the base every later run of benchmarks/reproduce_bundle.sh starts from, and it does not always
learn: its copy stage ends in a phase change whose step varies from run to run (GPU kernels are not bit-for-bit
repeatable), and one run left the stage on its deadline before the change and ended with probe 0.0 where the
bundle's ended with 0.39 (benchmarks/NOTES.md, "The reproduction script end to end"). The chain checks the run here
before spending half an hour on top of it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunSummary:
    """What a log says about its run: the last probe entry (None: no probe ran) and each stage change."""

    last_probe: dict | None
    advances: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        changes = ", ".join(
            f"to {a['advance']} at step {a['step']} ({a.get('advance_on', 'probe or deadline')}, probe {a['em']:.3f})"
            for a in self.advances
        )
        if self.last_probe is None:
            return "no probe in the log (a run shorter than its probe interval)"
        p = self.last_probe
        return f"last probe {p['em']:.3f} at step {p['step']} (stage {p['stage']}); stage changes: {changes or 'none'}"


def read_log(path: Path) -> RunSummary:
    """The probe entries of a train.py log; lines that are not a JSON step entry are skipped."""
    probes = []
    for line in path.read_text().splitlines():
        if not line.startswith('{"step"'):
            continue
        entry = json.loads(line)
        if "em" in entry:
            probes.append(entry)
    return RunSummary(probes[-1] if probes else None, [p for p in probes if "advance" in p])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check a training run's last held-out probe against a floor.")
    p.add_argument("log", type=Path)
    p.add_argument("--min-em", type=float, default=0.0, help="the last probe's exact match must reach this")
    args = p.parse_args(argv)
    if not args.log.is_file():
        print(f"runlog: {args.log}: no such log", file=sys.stderr)
        return 2
    summary = read_log(args.log)
    print(f"{args.log.name}: {summary.describe()}")
    if summary.last_probe is not None and summary.last_probe["em"] < args.min_em:
        print(f"{args.log.name}: the run ended with probe {summary.last_probe['em']:.3f}, under the floor "
              f"{args.min_em}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

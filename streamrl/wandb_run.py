"""wandb with slime's flags (`--use-wandb`, `--wandb-mode/project/group/team/host/key/dir/run-id`,
`--disable-wandb-random-suffix`), offline by default: no account, no network; `wandb sync <dir>` uploads later.

The run id is saved as `wandb.json` in the run dir and the `--save` dir, so a resumed job (`--load`, same or new
`--run-dir`) continues the same wandb run; `--wandb-run-id` names one explicitly. Every metric is plotted against
the `step` key (the train step), so an eval logged at the step it started on after later steps is kept, not
dropped as out of order.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def init_wandb(args: argparse.Namespace, run_dir: Path, resuming: bool) -> Any:
    import wandb  # a core dependency (pyproject.toml), imported only with --use-wandb

    if args.wandb_host:
        os.environ["WANDB_BASE_URL"] = args.wandb_host
    if args.wandb_key and args.wandb_mode == "online":
        wandb.login(key=args.wandb_key, host=args.wandb_host)
    # where the run id is kept: the run dir, and the --save dir (a resume may use a new --run-dir but --load's)
    homes = [run_dir] + ([Path(args.save)] if args.save else [])
    found = [p for p in [run_dir / "wandb.json"] + ([Path(args.load) / "wandb.json"] if args.load else [])
             if p.exists()]
    saved = json.loads(found[0].read_text()) if resuming and found else {}
    run_id = args.wandb_run_id or saved.get("id")
    group = saved.get("group") or args.wandb_group
    if group and not saved and not args.disable_wandb_random_suffix:
        group = f"{group}_{wandb.util.generate_id()}"  # slime: one group per launch unless told otherwise
    wandb_dir = Path(args.wandb_dir or run_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(entity=args.wandb_team, project=args.wandb_project, group=group, name=group,
                     mode=args.wandb_mode, dir=str(wandb_dir), config=vars(args), id=run_id,
                     resume="allow" if run_id else None)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    for home in homes:
        home.mkdir(parents=True, exist_ok=True)
        (home / "wandb.json").write_text(json.dumps({"id": run.id, "group": group, "project": args.wandb_project}))
    return run

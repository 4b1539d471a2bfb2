"""Build (or update) the pre-processed store of a dataset ahead of training.

    python3 preprocess.py --root /data/amos_ct --dataset amos --num_workers 8
    python3 preprocess.py --root /data/Dataset027_ACDC                     # planned from the data, as main_train.py plans it
    python3 preprocess.py --root /data/amos_ct --dataset amos --preprocessed /fast/ssd/rep3d

Every training and validation case is checked first (every problem in one message), then loaded,
resampled to the preset's or plan's spacing, oriented RAS, normalised, cropped to its foreground
and written once as memory-mappable arrays with its crop-centre indices and geometry
(:mod:`rep3d.data.store`), by ``--num_workers`` processes. Run again, it rebuilds only the cases whose
files changed, adds new ones and drops removed ones; an interrupted build resumes where it stopped.
``main_train.py`` with the same data flags then reuses the store (its start line says so). The data
flags are main_train.py's, so its command line's data part can be pasted here; ``--cache_rate`` and
``--loader`` change nothing stored and are accepted for that reason only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rep3d.cli import HelpFormatter, add_dataset_args
from rep3d.commands.train import dataset_from_args
from rep3d.data.checks import CheckRecord, check_dataset
from rep3d.data.dataset_config import DataError
from rep3d.data.demo import DEMO_ROOT_DEFAULT, make_demo_dataset
from rep3d.data.store import OFF, Store, build_store, resolve_base
from rep3d.data.store_layout import check_record_path
from rep3d.fileio import WriteError
from rep3d.runtime import default_num_workers

# main_train.py's data flags that do not change what is stored.
_IGNORED = ("--cache_rate", "--loader", "--cache_on_gpu")


def build_parser() -> argparse.ArgumentParser:
    """main_train.py's data flags (``rep3d.cli.add_dataset_args``); the loader-only ones are hidden."""
    p = argparse.ArgumentParser(prog="preprocess.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2], formatter_class=HelpFormatter)
    add_dataset_args(p, training=True)
    for action in p._actions:
        if any(f in _IGNORED for f in action.option_strings):
            action.help = argparse.SUPPRESS
    return p


def preprocess(args: argparse.Namespace, log=print) -> Store:
    """Resolve the dataset as main_train.py does, check every case, build or update its store.

    Raises:
        DataError: problems in the data (every one listed) or cases that could not be pre-processed.
        ValueError: unusable dataset flags (the message names the flag), or ``--preprocessed off``.
        StoreError / WriteError: the store cannot be written (the message names ``--preprocessed``).
    """
    base = resolve_base(args.preprocessed)
    if base is None:
        raise ValueError(f"--preprocessed {OFF} means no store: there is nothing to build; pass a folder, or leave the flag out for the default")
    workers = default_num_workers() if args.num_workers in (None, 0) else int(args.num_workers)
    cfg, _ = dataset_from_args(args)  # as main_train.py resolves it: the same store
    root = args.root
    if root is None and args.datalist is None:
        root = DEMO_ROOT_DEFAULT  # main_train.py's demo data: the same store its demo run uses
        make_demo_dataset(root)
    record = CheckRecord(check_record_path(args.preprocessed, root, args.datalist))
    splits = check_dataset(cfg, root, ("train", "val"), datalist=args.datalist, fold=args.fold, roi=cfg.roi, num_workers=workers, record=record)
    cases = splits["train"] + splits["val"]
    log(f"{len(cases)} cases checked ({len(splits['train'])} training, {len(splits['val'])} validation); dataset {cfg.name}, spacing {list(cfg.spacing)}, roi {list(cfg.roi)}")
    store = build_store(cfg, cases, base, root=root, datalist=args.datalist, roi=cfg.roi, crop_ratios=args.crop_ratios, num_workers=workers, progress=True, log=log)
    log(store.report.describe())
    return store


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry. Exit codes: 0 done; 2 bad flags or data (message, no traceback); 1 the store
    could not be written; 130 interrupted (the cases written so far are kept: run again to go on)."""
    args = build_parser().parse_args(argv)
    prog = "preprocess.py"
    try:
        preprocess(args)
    except (DataError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except WriteError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; the cases written so far are kept. Run the same command again to finish the store", file=sys.stderr)
        return 130
    return 0

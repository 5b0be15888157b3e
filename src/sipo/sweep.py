"""`sipo sweep`: one run per cell of a grid of config overrides and training seeds, in one folder,
resumable, then `sipo compare` of every cell with the seeds pooled per configuration.

    sipo sweep --config C --grid objective.name=dpo,dpo-cm,sipo --grid objective.beta=1000,5000 \\
        --seeds 0,1,2 --compare-prompts prompts.txt --scorers pickscore --output-dir runs/sweep

Cells. Every combination of the ``--grid`` values, for every training seed (``train.seed``): a run in
``<output_dir>/<key=value,...,seed=S>/``, trained with ``sipo train --config C <overrides> <cell's
overrides> train.seed=S train.output_dir=<that folder>``: exactly what ``--print-commands`` prints, one
line per unfinished cell, for a cluster scheduler or ``accelerate launch``.

Resuming. A cell is finished when its run wrote its model card (the last thing ``sipo train`` writes)
and its newest checkpoint holds ``train.max_steps`` steps: it is skipped. A cell with a run but not
finished (killed, or stopped by a signal) continues with ``--resume``, which continues exactly where
its newest checkpoint stopped; a cell without a run starts. ``sweep.json`` records the config and
overrides the sweep was started with: a rerun with others stops (cells of two sweeps are never
mixed); more grid values or seeds add cells.

Workers (``--workers N``): N cells at once, each in its own spawned process with ``cores / N`` torch
threads and one progress bar over all their steps (:func:`run_cells`). On a CPU a small model spends its
time in per-op overhead, where two one-thread processes beat one two-thread process; the demo trains its
fine-tunes this way. The cells share the device: on GPUs give each cell its own with
``--print-commands`` and a scheduler.

The compare (``--compare-prompts``): every cell and the base on the same prompts and seeds
(:mod:`sipo.compare`), a configuration's runs pooled over training seeds with the t-interval over
seeds (:func:`sipo.stats.t_interval`, as the demo's claims), into ``<output_dir>/compare``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue as queue_module
import shlex
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable

from sipo.errors import SipoError, TrainingInterrupted

RECORD = "sweep.json"


@dataclass(frozen=True)
class Cell:
    name: str  # the folder: "objective.name=sipo,objective.beta=1000,seed=0"
    configuration: str  # the grid part: "objective.name=sipo,objective.beta=1000"
    overrides: tuple[str, ...]  # the grid's key=value
    seed: int


@dataclass
class SweepResult:
    output_dir: Path
    cells: list[Cell]
    #: cell name -> "finished before" | "trained" | "resumed"
    status: dict[str, str] = field(default_factory=dict)
    compare: Any = None  # sipo.compare.CompareResult


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["objective.name=dpo,sipo", "objective.beta=1000,5000"]`` -> ``{"objective.name": ["dpo", "sipo"], ...}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, _, values = item.partition("=")
        key = key.strip()
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not key or not options or "." not in key:
            raise SipoError(f"--grid {item!r} is not section.key=VALUE,VALUE; write e.g. --grid objective.name=dpo,sipo")
        if key in grid:
            raise SipoError(f"--grid names {key} twice; give all its values in one --grid {key}=A,B")
        if key == "train.seed" or key == "train.output_dir":
            raise SipoError(f"--grid {key} is set by the sweep itself; pass training seeds as --seeds 0,1,2")
        grid[key] = list(dict.fromkeys(options))
    return grid


def _folder_part(value: str) -> str:
    return value.replace("/", "_").replace("\\", "_")


def make_cells(grid: dict[str, list[str]], seeds: list[int]) -> list[Cell]:
    cells = []
    for values in product(*grid.values()) if grid else [()]:
        overrides = tuple(f"{key}={value}" for key, value in zip(grid, values))
        configuration = ",".join(f"{key}={_folder_part(value)}" for key, value in zip(grid, values)) or "config"
        for seed in seeds:
            name = f"{configuration},seed={seed}" if grid else f"seed={seed}"
            cells.append(Cell(name, configuration, overrides, int(seed)))
    return cells


def cell_overrides(cell: Cell, output_dir: Path) -> list[str]:
    return [*cell.overrides, f"train.seed={cell.seed}", f"train.output_dir={(output_dir / cell.name).resolve()}"]


def cell_state(run_dir: Path, max_steps: int) -> str:
    """``finished``; ``started`` (a run with a checkpoint, not finished: resume it); ``unstarted`` (a run
    stopped before its first checkpoint: nothing to resume, start it again); or ``new``."""
    from sipo.checkpoints import checkpoint_step, list_checkpoints
    from sipo.rundir import holds_a_run

    if not run_dir.is_dir() or not holds_a_run(run_dir):
        return "new"
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return "unstarted"
    if (run_dir / "README.md").is_file() and checkpoint_step(checkpoints[-1]) >= max_steps:
        return "finished"
    return "started"


#: keys a cell's run may differ in from the cell's config and still be that cell: where it writes, how it
#: reports, how it runs. Everything else (objective.beta included, which a plain --resume may change)
#: makes other weights, so a finished cell trained with it is another configuration's run.
CELL_MAY_DIFFER = frozenset({
    "train.output_dir", "data.path", "data.num_workers", "data.prefetch_factor", "train.log_every", "train.report_to",
    "train.checkpoint_every", "train.keep_last", "train.lora_format", "train.max_bad_steps", "train.validate_every",
    "train.sample_every", "train.sample_steps", "train.sample_guidance_scale", "train.validation_prompts",
    "train.validation_seeds", "train.validation_scorers", "train.validation_scorer_paths", "train.keep_best",
    "train.num_processes", "train.batch_size", "train.gradient_accumulation_steps",  # the layout: --resume checks the product
    "train.max_steps",  # checked by the step count below
})


def check_cell_settings(run_dir: Path, config, cell: Cell) -> None:
    """Stop when the run in ``run_dir`` was trained with other settings than ``cell``'s config gives now
    (the config file was edited since, or the data or base model changed): skipping or resuming it would
    pool two configurations' runs under one name. Compares the newest checkpoint's fingerprint."""
    from sipo.checkpoints import checkpoint_step, list_checkpoints, read_fingerprint, run_fingerprint

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return
    saved = read_fingerprint(checkpoints[-1])
    if not saved:
        return  # written before sipo recorded fingerprints: nothing to compare
    current = run_fingerprint(config, int(saved.get("train.num_processes", 1) or 1))
    changed = [f"{key}: {saved.get(key, '(unset)')!r} -> {current.get(key, '(unset)')!r}"
               for key in sorted(set(saved) | set(current))
               if key not in CELL_MAY_DIFFER and key in saved and saved.get(key) != current.get(key)]
    if checkpoint_step(checkpoints[-1]) > config.train.max_steps:
        changed.append(f"train.max_steps: the run holds step {checkpoint_step(checkpoints[-1])}, the config says "
                       f"{config.train.max_steps}")
    if changed:
        raise SipoError(f"cell {cell.name} in {run_dir.parent} was trained with other settings than the sweep's config "
                        f"gives now ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}): the config or its "
                        "data changed since; restore them to continue this sweep, or pass another --output-dir")


#: a cell's state -> the flag its `sipo train` takes
FLAGS = {"new": "", "started": " --resume", "unstarted": " --overwrite"}


def train_command(config_path: str, overrides: list[str], cell: Cell, output_dir: Path, state: str = "new") -> str:
    words = ["sipo", "train", "--config", config_path, *overrides, *cell_overrides(cell, output_dir), "--no-progress"]
    return " ".join(shlex.quote(w) for w in words) + FLAGS[state]


def _config_argument(config: str | Path | None) -> str | None:
    """The config as the printed commands name it: an absolute path for a file, a packaged name as given."""
    if config is None:
        return None
    path = Path(config).expanduser()
    return str(path.resolve()) if path.is_file() else str(config)


def check_record(output_dir: Path, config: str | None, overrides: list[str]) -> None:
    """The folder holds no sweep, or one started with the same config and overrides (then it is continued)."""
    record = output_dir / RECORD
    mine = {"config": config, "overrides": list(overrides)}
    if record.is_file():
        try:
            previous = json.loads(record.read_text())
        except ValueError:
            previous = {}
        theirs = {"config": previous.get("config"), "overrides": previous.get("overrides")}
        if theirs != mine:
            raise SipoError(f"{output_dir} holds a sweep of --config {theirs['config']} {' '.join(theirs['overrides'] or [])}"
                            f", not of this one; pass another --output-dir, or the same config and overrides to continue it")


def _by_name(work: dict[str, Callable], cell: Cell, tick=None) -> Any:
    return work[cell.name](cell, tick=tick)


# ----------------------------------------------------------------------------- running cells
class _RecordStop:
    """A worker's SIGINT/SIGTERM handler outside `sipo.train` (loading a cell, between cells): the stop is
    kept, `sipo.train` adopts it (it stops before the cell's first step), and no further cell starts. A
    worker never dies of the signal, so the pool never breaks while the others checkpoint."""

    signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = self.signum or signum


_RECORDED_STOP = _RecordStop()


def _worker_setup(workers: int, interruptible: bool) -> None:
    """A spawned worker's torch threads (the machine's cores shared by the workers), quiet libraries, and
    its stop signals (:class:`_RecordStop`; SIGINT only where the parent did not ignore it)."""
    import signal
    import warnings

    import torch

    from sipo.models import quiet_libraries

    signal.signal(signal.SIGTERM, _RECORDED_STOP)
    if interruptible:
        signal.signal(signal.SIGINT, _RECORDED_STOP)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    quiet_libraries()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _ignore_stop_signals() -> None:
    """The manager's process outlives a Ctrl-C or SIGTERM: the workers still tick while they checkpoint."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


#: what a worker returns for a cell it did not start because the sweep was stopped first
NOT_STARTED = "not started: the sweep was stopped"


def _in_worker(work: Callable, cell: Cell, ticks, stop) -> Any:
    if stop.is_set() or _RECORDED_STOP.signum:  # queued before the stop: not started, so the rerun starts it
        return NOT_STARTED

    def tick() -> None:
        with contextlib.suppress(OSError, EOFError):  # progress only: never what breaks a cell
            ticks.put(1)
            if stop.is_set():  # the sweep was stopped and this process did not hear it: stop after this step
                from sipo.train import request_stop

                request_stop()

    try:
        return work(cell, tick=tick)
    except TrainingInterrupted as error:  # this worker starts no further cell, whoever else heard the signal
        _RECORDED_STOP.signum = _RECORDED_STOP.signum or error.signum
        raise


def run_cells(cells: list[Cell], work: Callable[..., Any], steps: dict[str, int], workers: int = 1,
              progress: bool = True, description: str | None = None, command: str = "sipo sweep") -> dict[str, Any]:
    """``work(cell, tick=...)`` for every cell, ``workers`` at a time, with one progress bar over the
    cells' optimizer ``steps`` (``tick()`` once per step); returns cell name -> what ``work`` returned.

    ``workers == 1`` runs in this process, in order. More run in ``spawn``ed processes
    (:func:`_worker_setup`): ``work`` and the cells must pickle (a module-level function, or a
    :func:`functools.partial` of one), and so must what ``work`` returns.

    Stopping (workers > 1): Ctrl-C reaches every worker from the terminal; a SIGTERM or SIGINT sent to
    this process alone reaches them through a shared flag their step callback reads
    (:func:`sipo.train.request_stop`: no second signal, which would mean "exit at once"). Each running
    cell finishes its step, checkpoints and raises :class:`~sipo.errors.TrainingInterrupted`, no further
    cell starts, and the first such error is raised here once every worker has stopped (``command``:
    what to rerun, in its sentence)."""
    from tqdm.auto import tqdm

    if workers < 1:
        raise SipoError(f"--workers {workers}: pass 1 or more (the cells trained at once)")
    bar = tqdm(total=sum(int(steps[c.name]) for c in cells), desc=description or f"train {len(cells)} cells",
               disable=not progress, dynamic_ncols=True, unit="step")
    results: dict[str, Any] = {}
    if workers == 1:
        for cell in cells:
            bar.set_postfix_str(cell.name)
            results[cell.name] = work(cell, tick=lambda: bar.update(1))
        bar.close()
        return results

    import multiprocessing
    import signal
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing.managers import SyncManager

    context = multiprocessing.get_context("spawn")
    interruptible = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    manager = SyncManager(ctx=context)
    manager.start(_ignore_stop_signals)
    stop, ticks = manager.Event(), manager.Queue()
    signalled: list[int] = []

    def on_signal(signum, frame) -> None:
        signalled.append(signum)
        stop.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(signum) is not signal.SIG_IGN}
    stopped: TrainingInterrupted | None = None
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_setup,
                                 initargs=(workers, interruptible)) as pool:
            pending = {pool.submit(_in_worker, work, cell, ticks, stop): cell for cell in cells}
            while pending:
                done, _ = wait(set(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    cell = pending.pop(future)
                    try:
                        results[cell.name] = future.result()
                    except TrainingInterrupted as error:  # the others checkpoint too before it is raised
                        stopped = stopped or error
                        stop.set()
                        continue
                    except BaseException:
                        stop.set()
                        raise
                    bar.set_postfix_str(f"done {cell.name}")
                with contextlib.suppress(queue_module.Empty, OSError, EOFError):
                    while True:
                        ticks.get_nowait()
                        bar.update(1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        manager.shutdown()
        bar.close()
    if stopped is not None:
        raise stopped
    not_started = [cell.name for cell in cells if results.get(cell.name) == NOT_STARTED]
    if not_started:  # stopped between cells: nothing was running to say so
        name = signal.Signals(signalled[0]).name if signalled else "a signal"
        raise TrainingInterrupted(f"stopped by {name} before {len(not_started)} cell(s) started ({not_started[0]}, ...); "
                                  f"rerun the same {command} command to continue", signum=signalled[0] if signalled
                                  else signal.SIGTERM, step=0)
    return {cell.name: results[cell.name] for cell in cells}


def train_cell(cell: Cell, config_arg: str | None, overrides: list[str], output_dir: Path, state: str,
               tick: Callable[[], None] | None = None, progress: bool = False, config=None) -> int:
    """One cell's `sipo train` (resumed or started over as its ``state`` says), with train's own progress
    bar when ``progress``; ``tick()`` after each step; returns its steps. ``config``: the cell's, when the
    caller loaded it already (a worker process loads its own)."""
    from sipo.config import load_config
    from sipo.train import train

    if config is None:
        config = load_config(config_arg, overrides + cell_overrides(cell, output_dir))
    callback = (lambda step, adapter: tick()) if tick is not None else None
    try:
        result = train(config, resume=state == "started", overwrite=state == "unstarted", progress=progress,
                       step_callback=callback)
    except TrainingInterrupted as stopped:  # train's advice (--resume, --overwrite) is not this command's
        raise stopped.rerun(f"cell {cell.name}", "sipo sweep") from stopped
    return int(result.steps)


def run_sweep(config: str | Path | None, grid: dict[str, list[str]], seeds: list[int], output_dir: str | Path,
              overrides: list[str] | None = None, print_commands: bool = False, compare_options: dict | None = None,
              base: bool = True, progress: bool = True, workers: int = 1) -> SweepResult:
    """Train every unfinished cell (module docstring), then compare them when ``compare_options`` names
    ``prompts``; with ``print_commands`` only print the unfinished cells' `sipo train` lines."""
    from sipo.config import load_config
    from sipo.rundir import check_output_dir

    overrides = list(overrides or [])
    config_arg = _config_argument(config)
    if workers < 1:
        raise SipoError(f"--workers {workers}: pass 1 or more (the cells trained at once)")
    if not seeds:
        raise SipoError("--seeds is empty; pass the training seeds, e.g. --seeds 0,1")
    output_dir = Path(output_dir)
    cells = make_cells(grid, list(dict.fromkeys(seeds)))
    # every cell's config is checked before the first trains: a typo in the grid stops in a second
    configs = {cell.name: load_config(config_arg, overrides + cell_overrides(cell, output_dir)) for cell in cells}
    check_record(output_dir, config_arg, overrides)
    states = {cell.name: cell_state(output_dir / cell.name, configs[cell.name].train.max_steps) for cell in cells}
    for cell in cells:  # before anything trains: a cell of other settings is never skipped, resumed or pooled
        if states[cell.name] in ("finished", "started"):
            check_cell_settings(output_dir / cell.name, configs[cell.name], cell)
    result = SweepResult(output_dir, cells)
    if print_commands:
        for cell in cells:
            if states[cell.name] != "finished":
                print(train_command(config_arg or "<config>", overrides, cell, output_dir, states[cell.name]))
        return result

    check_output_dir(output_dir, name="--output-dir")
    (output_dir / RECORD).write_text(json.dumps({"config": config_arg, "overrides": overrides, "grid": grid,
                                                  "seeds": list(seeds), "cells": [c.name for c in cells]}, indent=2))
    if workers > 1:
        todo = [cell for cell in cells if states[cell.name] != "finished"]
        for cell in cells:
            if states[cell.name] == "finished":
                result.status[cell.name] = "finished before"
        # a resumed cell's bar counts all its steps: the ticks of the steps before its checkpoint never come
        work = {cell.name: functools.partial(train_cell, config_arg=config_arg, overrides=overrides,
                                             output_dir=output_dir, state=states[cell.name]) for cell in todo}
        print(f"sweep: {len(todo)} of {len(cells)} cells to train, {workers} at a time")
        run_cells(todo, functools.partial(_by_name, work), {c.name: configs[c.name].train.max_steps for c in todo},
                  workers=workers, progress=progress, description="sweep")
        for cell in todo:
            result.status[cell.name] = "resumed" if states[cell.name] == "started" else "trained"
    for number, cell in enumerate(cells if workers == 1 else [], 1):
        state = states[cell.name]
        if state == "finished":
            result.status[cell.name] = "finished before"
            print(f"sweep: cell {number}/{len(cells)} {cell.name}: finished before, skipped")
            continue
        print(f"sweep: cell {number}/{len(cells)} {cell.name}: {'resuming' if state == 'started' else 'training'}")
        train_cell(cell, config_arg, overrides, output_dir, state, progress=progress, config=configs[cell.name])
        result.status[cell.name] = "resumed" if state == "started" else "trained"

    if compare_options and compare_options.get("prompts"):
        from sipo.compare import CompareOptions, run_compare

        groups: dict[str, dict[int, str]] = {}
        for cell in cells:
            groups.setdefault(cell.configuration, {})[cell.seed] = cell.name
        options = {"output_dir": output_dir / "compare", **compare_options}
        first = configs[cells[0].name]
        result.compare = run_compare(first, CompareOptions(
            runs=[str(output_dir / c.name) for c in cells], labels=[c.name for c in cells], base=base, groups=groups,
            **options))
    print(f"sweep: {len(cells)} cells in {output_dir}" + (f"; compare in {result.compare.output_dir}" if result.compare else ""))
    return result

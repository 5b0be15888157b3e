"""`sipo demo`: Diffusion-DPO vs DPO-C&M vs SIPO on a task that fits a laptop, measured honestly.

The steps, in order (each a function you can call on its own):

1. pretrain the tiny digits model (cached; :mod:`sipo.demo.pretrain`);
2. fit the reward, a digit classifier on real handwriting (:mod:`sipo.demo.reward`);
3. draw off-policy preference pairs from an early checkpoint and real digits, ranked by the reward
   (:mod:`sipo.demo.pairs`);
4. measure the base model's w(t) profile on those pairs and on its own samples (:mod:`sipo.demo.profile`);
5. fine-tune every (method, beta, seed) with :func:`sipo.train.train` from the same base on the
   same pairs, evaluating reward and win rate vs the base along the way (:mod:`sipo.demo.evaluate`);
5b. with ``--full`` or ``--onpolicy``, the on-policy question (issue 27): the same methods on pairs
   sampled from the base itself (:mod:`sipo.demo.onpolicy`), with stored noise, and as 2 rounds of
   iterative DPO (:mod:`sipo.demo.iterative`);
6. compare every fine-tune with the base through the library's `sipo compare` (per pair source, its
   configurations pooled over seeds: :func:`sipo.demo.report.write_compares`), write ``report.md`` +
   plots (:mod:`sipo.demo.report`), the claims (:mod:`sipo.demo.claims`), print the table and the
   final line ``win rate vs base: dpo=0.NN dpo-cm=0.NN sipo=0.NN`` (means over seeds at the default beta).

The fine-tunes are the cells of a sweep, run by the library's :func:`sipo.sweep.run_cells` in
``workers`` processes of one torch thread each: on two cores the tiny model spends its time in per-op
overhead, where two single-threaded processes beat one two-threaded one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sipo.demo.onpolicy import OnPolicySettings
from sipo.demo.pairs import PairSettings
from sipo.demo.pretrain import PretrainSettings
from sipo.demo.settings import AUTO_SUFFIX, FIELD_METHODS, demo_config_path, setup_torch
from sipo.errors import SipoError

#: the paper's reading (SPEC 4a) and the project's first reading of C&M and SIPO
METHODS = ("dpo", "dpo-cm", "sipo", "dpo-cm-outside", "sipo-outside")
#: the three methods of the final line
HEADLINE_METHODS = ("dpo", "dpo-cm", "sipo")
#: pair sources: "mixed" = real digits vs early samples; "offpolicy" = early samples only
SOURCES = ("mixed", "offpolicy")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; the fine-tuning hyperparameters themselves live in configs/demo.yaml."""

    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    pairs: PairSettings = field(default_factory=PairSettings)
    #: the second, strongly off-policy pair source: both sides early-checkpoint samples, none real
    offpolicy_pairs: PairSettings = field(default_factory=lambda: PairSettings(real_fraction=0.0))
    sources: tuple[str, ...] = SOURCES
    #: claim 1: every method, every source, at the default beta (configs/demo.yaml's objective.beta)
    methods: tuple[str, ...] = METHODS
    #: claim 2: the beta sweep (spans 10x) for these methods on these sources
    betas: tuple[float, ...] = (1000.0, 3000.0, 10000.0)
    sensitivity_methods: tuple[str, ...] = HEADLINE_METHODS
    sensitivity_sources: tuple[str, ...] = ("mixed",)
    #: claim 3: these methods run stability_factor x longer at the default beta on these sources
    stability_methods: tuple[str, ...] = ("dpo", "sipo")
    stability_sources: tuple[str, ...] = ("mixed",)
    stability_factor: int = 3
    #: claim 3's held-out pairs per source (its test accuracy): drawn like the source's training
    #: pairs but from generator seed ``held_out_seed`` and from the real digits no training pair
    #: shows; the long runs validate on them every ``eval_every`` steps (``data.validation_path``)
    held_out_pairs: int = 256
    held_out_seed: int = 1
    #: "which objective": these presets, each at its own defaults (objective.beta=null), on these sources
    objective_methods: tuple[str, ...] = ()
    objective_sources: tuple[str, ...] = SOURCES
    #: auto beta vs claim 2: these methods with objective.beta_mode=auto, started from each of `betas`,
    #: on `sensitivity_sources` (labelled e.g. "dpo-auto")
    auto_beta_methods: tuple[str, ...] = ()
    #: on-policy pairs (issue 27): K samples per prompt from the pretrained digits model, best vs worst
    #: by the reward (sipo.demo.onpolicy); drawn only when one of the three arms below runs
    onpolicy_pairs: OnPolicySettings = field(default_factory=OnPolicySettings)
    #: these methods on the on-policy pairs, at the default beta and train.max_steps
    onpolicy_methods: tuple[str, ...] = ()
    #: these methods on the on-policy pairs with objective.noise=stored (each side from its own x_T);
    #: skipped, with a line in the report, while the library has no objective.noise
    stored_noise_methods: tuple[str, ...] = ()
    #: these methods as iterative DPO: iterative_rounds rounds, each sampling its pairs from the
    #: current policy, totalling train.max_steps (sipo.demo.iterative)
    iterative_methods: tuple[str, ...] = ()
    iterative_rounds: int = 2
    #: evaluation interval of the long runs (the short runs are evaluated once, at their end)
    eval_every: int = 100
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    #: None: configs/demo.yaml's train.max_steps
    max_steps: int | None = None
    #: evaluation prompts per digit (fixed prompts and initial noise, shared by every model)
    eval_per_class: int = 20
    eval_seed: int = 1234
    #: DDIM steps of every evaluation sample
    sampling_steps: int = 25
    #: pairs used for the w(t) profile
    profile_pairs: int = 200
    profile_buckets: int = 20
    #: pairs for `sipo analyze` on the base model (per-bucket gradient variance; its plots go in the report)
    analysis_pairs: int = 32
    reward_seed: int = 0
    #: fine-tuning processes (one torch thread each)
    workers: int = 2


QUICK = DemoSettings(
    pretrain=PretrainSettings(steps=200, batch_size=64, early_step=40),
    pairs=PairSettings(num_pairs=128, sampling_steps=10),
    offpolicy_pairs=PairSettings(num_pairs=128, sampling_steps=10, real_fraction=0.0),
    methods=HEADLINE_METHODS,
    betas=(3000.0,),
    sensitivity_methods=(),
    seeds=(0,),
    max_steps=6,
    eval_every=6,
    eval_per_class=4,
    sampling_steps=10,
    held_out_pairs=32,
    profile_pairs=16,
    profile_buckets=10,
    analysis_pairs=4,
    workers=1,
)


#: `sipo demo` (`make demo`): claim 1 for the three headline methods on the mixed pairs, 5 seeds.
#: Measured on the 2-core machine, the fine-tunes run ~3.5 steps/s on 2 workers, so 15 runs of 100
#: steps fit the 15-minute budget; the beta sweep (claim 2), the 3x longer runs (claim 3), the
#: off-policy pairs and the project's reading (80 runs, ~50 minutes) are `--full`'s.
DEFAULT = DemoSettings(
    sources=("mixed",), methods=HEADLINE_METHODS, sensitivity_methods=(), stability_methods=(),
)


#: the on-policy question's arms (issue 27): the headline methods on on-policy pairs, DPO and SIPO with
#: stored noise, iterative DPO (2 rounds)
ONPOLICY_ARMS = dict(onpolicy_methods=HEADLINE_METHODS, stored_noise_methods=("dpo", "sipo"), iterative_methods=("dpo",))


#: `sipo demo --full`: every claim for every method on both pair sources, long runs evaluated every
#: 50 steps, and the on-policy arms
FULL = DemoSettings(
    sensitivity_methods=METHODS, sensitivity_sources=SOURCES,
    stability_methods=METHODS, stability_sources=SOURCES, eval_every=50,
    objective_methods=FIELD_METHODS, auto_beta_methods=("dpo",), **ONPOLICY_ARMS,
)


#: claim 3 alone, with `--full`'s settings for it, for the three headline methods on the mixed pairs
#: (15 runs of 300 steps, reward and held-out accuracy every 50 steps):
#: ``python -m sipo.demo.run --claim3 --output-dir runs/claim3``; claim 1's rows come from the same runs
CLAIM3 = replace(FULL, sources=("mixed",), methods=HEADLINE_METHODS, sensitivity_methods=(),
                 stability_methods=HEADLINE_METHODS, stability_sources=("mixed",), objective_methods=(),
                 auto_beta_methods=())


#: "does SIPO beat on-policy pairs?" alone: the headline methods on the mixed, off-policy and
#: on-policy pairs, stored vs shared noise, iterative DPO; 5 seeds, 100 steps (50 runs; 60 once
#: objective.noise exists):
#: ``python -m sipo.demo.run --onpolicy --output-dir runs/onpolicy``
ONPOLICY = DemoSettings(methods=HEADLINE_METHODS, sensitivity_methods=(), stability_methods=(), **ONPOLICY_ARMS)


# ----------------------------------------------------------------------------- one fine-tune
@dataclass
class RunJob:
    method: str
    beta: float
    seed: int
    config_path: str
    overrides: list[str]
    base_dir: str
    run_dir: str
    eval_every: int
    eval_per_class: int
    eval_seed: int
    sampling_steps: int
    reward_seed: int
    #: extra label of a variant (the defaults sweep, the pair source), part of the name
    variant: str = ""
    #: which pairs (claims): "mixed", "offpolicy", "onpolicy", "onpolicy-stored" or "iterative"
    source: str = "mixed"
    #: rounds of iterative DPO (1: one fine-tune on fixed pairs); rounds after the first sample their
    #: pairs from the policy with ``onpolicy`` (OnPolicySettings as a dict; sipo.demo.iterative)
    rounds: int = 1
    onpolicy: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        prefix = f"{self.variant}-" if self.variant else ""
        return f"{prefix}{self.method}-beta{self.beta:g}-seed{self.seed}"


_WORKER: dict[str, Any] = {}


def _context(job: RunJob):
    """Per-process cache of the base model, the reward and the eval set (built once per worker)."""
    from sipo.demo.evaluate import EvalSet
    from sipo.demo.reward import DigitReward
    from sipo.models.digits import DigitsAdapter

    key = (job.base_dir, job.reward_seed, job.eval_per_class, job.eval_seed)
    if _WORKER.get("key") != key:
        base = DigitsAdapter.from_pretrained(job.base_dir)
        _WORKER.update(
            key=key, base=base, reward=DigitReward(job.reward_seed),
            eval_set=EvalSet.make(job.eval_per_class, base.resolution, job.eval_seed),
        )
    return _WORKER["base"], _WORKER["reward"], _WORKER["eval_set"]


class Evaluation:
    """The ``step_callback`` of a demo fine-tune: samples and scores the eval set every ``eval_every``
    steps and at ``last_step``; ``curve`` holds every evaluation, ``policy`` the adapter it last saw."""

    def __init__(self, job: RunJob, reward, eval_set, last_step: int, tick=None):
        self.job, self.reward, self.eval_set, self.last_step, self.tick = job, reward, eval_set, last_step, tick
        self.curve: list[dict[str, Any]] = []
        self.images = self.rewards = self.policy = None
        #: step -> the eval set's pictures then (the compare shows a long run's at the short runs' step)
        self.images_at: dict[int, Any] = {}

    def __call__(self, step: int, adapter) -> None:
        from sipo.demo.evaluate import sample_and_score

        if self.tick is not None:
            self.tick()
        self.policy = adapter
        if step % self.job.eval_every == 0 or step == self.last_step:
            self.images, self.rewards = sample_and_score(adapter, self.reward, self.eval_set, self.job.sampling_steps)
            self.images_at[step] = self.images
            self.curve.append({"step": step, "mean_reward": float(self.rewards.mean()), "rewards": self.rewards.tolist()})


def train_quietly(config, evaluation: Evaluation, base, log: io.StringIO, resume: bool = False):
    """:func:`sipo.train.train` from a copy of ``base`` (or resumed), its "data: ..." lines into ``log``."""
    from sipo.train import train

    with contextlib.redirect_stdout(log):  # the trainer's per-run "data: ..." lines go to train.log
        return train(config, step_callback=evaluation, progress=False, adapter=copy.deepcopy(base),
                     overwrite=not resume, resume=resume)


def run_one(job: RunJob, tick=None) -> dict[str, Any]:
    """Fine-tune one (method, beta, seed) from the base and evaluate it; ``tick()`` after each step.
    A job of several rounds is iterative DPO (:func:`sipo.demo.iterative.run_rounds`)."""
    from sipo.config import load_config

    if job.rounds > 1:
        import sys

        from sipo.demo.iterative import run_rounds

        return run_rounds(job, tick, runner=sys.modules[__name__])
    started = time.perf_counter()
    base, reward, eval_set = _context(job)
    config = load_config(job.config_path, job.overrides)
    evaluation = Evaluation(job, reward, eval_set, config.train.max_steps, tick)
    log = io.StringIO()
    result = train_quietly(config, evaluation, base, log)
    return finish_run(job, config, evaluation, result.history, result.steps, log.getvalue(), started)


def finish_run(job: RunJob, config, evaluation: Evaluation, history, steps: int, log: str, started: float,
               **extra: Any) -> dict[str, Any]:
    """The run's record (its numbers, ``extra`` beside them) into ``run_dir/result.json``, and returned with its images."""
    from sipo.validation import VALIDATION_LOG

    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(job.run_dir) / "train.log").write_text(log)
    validation_log = Path(config.train.output_dir) / VALIDATION_LOG  # the held-out curve, when it validated
    validation = [json.loads(line) for line in validation_log.read_text().splitlines() if line.strip()] \
        if validation_log.is_file() else []
    record = {
        "method": job.method, "beta": job.beta, "seed": job.seed, "name": job.name, "variant": job.variant,
        "source": job.source,
        "curve": evaluation.curve, "rewards": evaluation.rewards.tolist(),
        "history": history, "steps": steps, "wall_seconds": time.perf_counter() - started,
        "validation": validation, **extra,
    }
    # each run's numbers on disk as soon as it ends, so an interrupted sweep keeps what it finished
    (Path(job.run_dir) / "result.json").write_text(json.dumps(record, default=float))
    return {**record, "images": evaluation.images, "images_at": evaluation.images_at}


def run_cell(jobs: dict[str, RunJob], cell, tick=None) -> dict[str, Any]:
    """The demo's work for one cell of :func:`sipo.sweep.run_cells`: its job, in one torch thread."""
    setup_torch(1)
    _quiet()
    return run_one(jobs[cell.name], tick=tick)


def _quiet() -> None:
    import warnings

    from sipo.models import quiet_libraries

    quiet_libraries()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def job_cell(job: RunJob):
    """The job as a cell of the library's sweep (:class:`sipo.sweep.Cell`): its configuration is the pair
    source with the method and beta (what the compare pools over seeds), its overrides the job's."""
    from sipo.sweep import Cell

    return Cell(job.name, f"{job.variant or 'mixed'}/{job.method}-beta{job.beta:g}", tuple(job.overrides), job.seed)


def run_sweep(jobs: list[RunJob], workers: int, progress: bool = True) -> list[dict[str, Any]]:
    """Every job, as the cells of :func:`sipo.sweep.run_cells` (``workers`` processes, one bar over all
    their steps), in the order of ``jobs``."""
    from sipo.sweep import run_cells

    cells = [job_cell(job) for job in jobs]
    done = run_cells(cells, functools.partial(run_cell, {job.name: job for job in jobs}),
                     {job.name: load_steps(job) for job in jobs}, workers=workers, progress=progress,
                     description=f"fine-tune {len(jobs)} runs")
    return [done[job.name] for job in jobs]


def load_steps(job: RunJob) -> int:
    for override in job.overrides:
        if override.startswith("train.max_steps="):
            return int(override.split("=", 1)[1])
    from sipo.config import load_config

    return load_config(job.config_path).train.max_steps


# ----------------------------------------------------------------------------- the whole demo
def run_demo(output_dir: Path, quick: bool = False, settings: DemoSettings | None = None,
             progress: bool = True, config_overrides: list[str] | None = None, full: bool = False) -> dict[str, Any]:
    """Run the demo into ``output_dir``; prints the table and, last, the machine-readable line.

    ``config_overrides`` (``key=value``) apply to configs/demo.yaml for every fine-tune, e.g.
    ``["objective.beta=1000"]`` to make 1000 the default beta of a custom ``settings.betas``.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    settings = settings or (QUICK if quick else FULL if full else DEFAULT)
    setup_torch(1)
    _quiet()
    import torch

    from sipo.config import load_config
    from sipo.demo import report
    from sipo.demo.evaluate import EvalSet, sample_and_score
    from sipo.demo.pairs import make_pairs
    from sipo.demo.pretrain import load_digit_images, pretrain
    from sipo.demo.profile import weight_profile
    from sipo.demo.reward import DigitReward
    from sipo.models.digits import DigitsAdapter

    started = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = demo_config_path()
    config_overrides = list(config_overrides or [])
    config = load_config(config_path, list(config_overrides))
    default_beta = float(config.objective.beta)
    if default_beta not in settings.betas:
        raise SipoError(f"the default beta {default_beta:g} of {config_path} is not in the demo's sweep {settings.betas}")
    max_steps = settings.max_steps or config.train.max_steps
    timings: dict[str, float] = {}

    # 1. base + early models (cached)
    phase = time.perf_counter()
    pretrained = pretrain(settings.pretrain, progress=progress)
    timings["pretrain"] = time.perf_counter() - phase
    base_dir = output_dir / "base"
    shutil.rmtree(base_dir, ignore_errors=True)
    shutil.copytree(pretrained.base_dir, base_dir)
    base = DigitsAdapter.from_pretrained(base_dir)
    early = DigitsAdapter.from_pretrained(pretrained.early_dir)

    # 2. reward, 3. pairs: the demo's mixed pairs and the strongly off-policy ones
    phase = time.perf_counter()
    reward = DigitReward(settings.reward_seed)
    real_images, real_labels = load_digit_images(base.resolution)
    pair_sets = {}
    for source in settings.sources:
        pairs_dir = output_dir / ("pairs" if source == "mixed" else f"pairs_{source}")
        shutil.rmtree(pairs_dir, ignore_errors=True)
        pair_settings = settings.pairs if source == "mixed" else settings.offpolicy_pairs
        pair_sets[source] = make_pairs(early, reward, real_images, real_labels, pairs_dir, pair_settings, progress=progress)
    if settings.onpolicy_methods or settings.stored_noise_methods or settings.iterative_methods:
        from sipo.demo.onpolicy import make_onpolicy_pairs

        onpolicy_dir = output_dir / "pairs_onpolicy"
        shutil.rmtree(onpolicy_dir, ignore_errors=True)
        pair_sets["onpolicy"] = make_onpolicy_pairs(base, reward, onpolicy_dir, settings.onpolicy_pairs, progress=progress)
    pairs = pair_sets.get("mixed") or next(iter(pair_sets.values()))
    held_out_sets = held_out_pairs(settings, early, reward, real_images, real_labels, pair_sets, output_dir, progress)
    timings["pairs"] = time.perf_counter() - phase

    # base and early on the evaluation prompts
    phase = time.perf_counter()
    eval_set = EvalSet.make(settings.eval_per_class, base.resolution, settings.eval_seed)
    base_images, base_rewards = sample_and_score(base, reward, eval_set, settings.sampling_steps)
    _, early_rewards = sample_and_score(early, reward, eval_set, settings.sampling_steps)

    # 4. w(t) profile: the demo's pairs vs the base model's own samples (and the off-policy source)
    n = min(settings.profile_pairs, len(pairs.prompts))
    generator = torch.Generator().manual_seed(settings.eval_seed + 1)
    labels = pairs.labels[:n]
    own_w = base.sample_labels(labels, generator=generator, num_inference_steps=settings.sampling_steps)
    own_l = base.sample_labels(labels, generator=generator, num_inference_steps=settings.sampling_steps)
    profile_options = dict(weight_norm=config.objective.weight_norm, pair_weight=config.objective.pair_weight)
    profile_off = weight_profile(base, labels, pairs.chosen[:n], pairs.rejected[:n], settings.profile_buckets, seed=0,
                                 **profile_options)
    profile_on = weight_profile(base, labels, own_w, own_l, settings.profile_buckets, seed=0, **profile_options)
    source_weights = {}
    for source, pair_set in pair_sets.items():
        m = min(settings.profile_pairs, len(pair_set.prompts))
        profile = weight_profile(base, pair_set.labels[:m], pair_set.chosen[:m], pair_set.rejected[:m],
                                 settings.profile_buckets, seed=0, **profile_options)
        source_weights[source] = _weight_summary(profile, config.objective.tau)
    source_weights["base_own_samples"] = _weight_summary(profile_on, config.objective.tau)
    timings["base eval + w(t) profile"] = time.perf_counter() - phase

    # 4b. `sipo analyze` on the base model and the demo's pairs: the same study a user runs on theirs
    phase = time.perf_counter()
    from sipo.analysis import run_analysis

    analysis_config = load_config(config_path, [*config_overrides, f"model.pretrained_path={base_dir.resolve()}",
                                                f"data.path={pairs.manifest.resolve()}"])
    analysis = run_analysis(analysis_config, num_pairs=settings.analysis_pairs, num_buckets=settings.profile_buckets,
                            output_dir=output_dir / "analysis", progress=progress, verbose=False)
    timings["sipo analyze"] = time.perf_counter() - phase

    # 5. the fine-tunes of the three claims (docs/demo.md): one run per (source, method, beta, seed);
    # the long runs of claim 3 also give claim 1 its numbers at step max_steps (constant lr: their
    # first max_steps steps are the short run's).
    phase = time.perf_counter()
    long_steps = max_steps * settings.stability_factor
    jobs = []
    for source in settings.sources:
        for beta in settings.betas:
            for seed in settings.seeds:
                for method in settings.methods:
                    swept = method in settings.sensitivity_methods and source in settings.sensitivity_sources
                    if beta != default_beta and not swept:
                        continue
                    long = beta == default_beta and method in settings.stability_methods and source in settings.stability_sources
                    steps = long_steps if long else max_steps
                    # claim 3's long runs log held-out accuracy at each reward evaluation (no randomness
                    # taken from training: their first max_steps steps stay the short run's, claim 1's)
                    validation = [f"data.validation_path={held_out_sets[source].manifest.resolve()}",
                                  f"train.validate_every={settings.eval_every}"] if long else []
                    name = f"{method}-beta{beta:g}-seed{seed}"
                    run_dir = output_dir / "runs" / (name if source == "mixed" else f"{source}/{name}")
                    jobs.append(RunJob(
                        method=method, beta=beta, seed=seed, config_path=str(config_path),
                        overrides=[
                            *config_overrides,
                            f"model.pretrained_path={base_dir.resolve()}",
                            f"data.path={pair_sets[source].manifest.resolve()}",
                            f"objective.name={method}", f"objective.beta={beta}", f"train.seed={seed}",
                            f"train.max_steps={steps}", f"train.output_dir={run_dir.resolve()}", *validation,
                        ],
                        base_dir=str(base_dir.resolve()), run_dir=str(run_dir),
                        eval_every=settings.eval_every if long else max_steps,
                        eval_per_class=settings.eval_per_class, eval_seed=settings.eval_seed,
                        sampling_steps=settings.sampling_steps, reward_seed=settings.reward_seed,
                        variant="" if source == "mixed" else source, source=source,
                    ))
    jobs += field_jobs(settings, config_path, config_overrides, base_dir, pair_sets, output_dir, max_steps)
    arm_jobs, onpolicy_notes = onpolicy_jobs(settings, config_path, config_overrides, base_dir, pair_sets, output_dir,
                                             max_steps, default_beta)
    jobs += arm_jobs
    # the default-beta runs first (claims 1 and 3), seed by seed so that an interrupted sweep leaves
    # every arm of its first seeds (paired comparisons need the same seeds), longest first; then the beta sweep
    jobs.sort(key=lambda job: (job.beta != default_beta, job.seed, -load_steps(job)))
    results = run_sweep(jobs, settings.workers, progress=progress)
    timings["fine-tune + evaluate"] = time.perf_counter() - phase

    # 6. report
    phase = time.perf_counter()
    from sipo.demo import claims as claims_module

    for result in results:
        result["curve"].insert(0, {"step": 0, "mean_reward": float(base_rewards.mean()), "rewards": base_rewards.tolist()})
    # every run against the base through the library's compare, per pair source, at step max_steps
    compares = report.write_compares(
        output_dir, results, base_images, base_rewards, eval_set, max_steps,
        f"the demo's {len(eval_set)} evaluation prompts, each from its own fixed initial noise (the seed shown), DDIM "
        f"{settings.sampling_steps} steps; every run at step {max_steps}; reward: the digit reader", settings.methods)
    # the mixed pairs' runs at step max_steps (the long runs' curves cut there), for the report's plots
    at_max = [dict(result, rewards=claims_module.rewards_at(result, max_steps).tolist(),
                   curve=[p for p in result["curve"] if p["step"] <= max_steps])
              for result in results if result["source"] == "mixed" and not result["variant"]]
    claims = {
        "win_rate": claims_module.claim_win_rate(results, base_rewards, settings.sources, settings.methods, default_beta, max_steps),
        "beta_sensitivity": claims_module.claim_beta_sensitivity(
            results, base_rewards, settings.sensitivity_sources, settings.sensitivity_methods, settings.betas, max_steps)
        if settings.sensitivity_methods else {},
        "stability": claims_module.claim_stability(results, settings.stability_sources, settings.stability_methods,
                                                   default_beta, long_steps, max_steps),
    }
    claims.update(claims_module.claim_field(results, base_rewards, settings, default_beta, max_steps))
    if "onpolicy" in pair_sets:
        claims["onpolicy"] = claims_module.claim_onpolicy(results, base_rewards, default_beta, max_steps, onpolicy_notes)
    timings["report"] = time.perf_counter() - phase
    wall = time.perf_counter() - started
    context = {
        "quick": quick,
        "settings": _jsonable(asdict(settings)),
        "config_path": str(config_path),
        "config_overrides": config_overrides,
        "config": config.to_dict(),
        "default_beta": default_beta,
        "max_steps": max_steps,
        "long_steps": long_steps,
        "betas": list(settings.betas),
        "wall_seconds": wall,
        "timings": timings,
        "fine_tune_steps": sum(load_steps(job) for job in jobs),
        "fine_tunes": len(jobs),
        "pretrain_cached": pretrained.cached,
        "pretrain_info": pretrained.info,
        "reward_held_out_accuracy": reward.held_out_accuracy(),
        "pairs": pairs.summary(),
        "pair_sources": {source: pair_set.summary() for source, pair_set in pair_sets.items()},
        "held_out_pair_sources": {source: pair_set.summary() for source, pair_set in held_out_sets.items()},
        "pair_source_weights": source_weights,
        "base_mean_reward": float(base_rewards.mean()),
        "early_mean_reward": float(early_rewards.mean()),
        "eval_samples": len(eval_set),
        "machine": {
            "cpu_count": os.cpu_count(), "torch_threads_per_process": 1, "workers": settings.workers,
            "load_average_at_start": load_start,
            "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
            "python": platform.python_version(), "torch": torch.__version__,
        },
    }
    context["report_path"] = str(output_dir / "report.md")
    report.write_report(output_dir, context, at_max, compares, profile_off, profile_on, analysis=analysis)
    claims_text = claims_module.claims_markdown(claims, context)
    claim_files = claims_module.plot_claims(output_dir, claims, context)
    weights_text = "\n".join(
        f"| {source} | {w['mean_log_w']:.4f} | {w['masked_fraction']:.3f} |" for source, w in source_weights.items())
    with open(output_dir / "report.md", "a") as handle:
        handle.write("\n" + claims_text + "\n")
        handle.write("\n".join(f"![{key}]({Path(path).name})" for key, path in claim_files.items()) + "\n\n")
        handle.write("How off-policy each pair source is (base model's pair weights, all timestep buckets):\n\n"
                     f"| pairs | mean log w | masked at tau {config.objective.tau:g} |\n|---|---|---|\n{weights_text}\n")
    (output_dir / "claims.json").write_text(json.dumps(_jsonable(claims), indent=2))
    main_source = "mixed" if "mixed" in settings.sources else settings.sources[0]
    print(report.printed_table(compares[main_source], context))
    print(claims_text)
    line = report.final_line(compares[main_source], HEADLINE_METHODS, default_beta)
    print(claims_module.penultimate_line(claims, main_source))
    print(line)
    return {"compare": {source: c.summary for source, c in compares.items()}, "claims": claims, "context": context,
            "final_line": line, "report": str(output_dir / "report.md")}


def field_jobs(settings: DemoSettings, config_path, config_overrides, base_dir: Path, pair_sets, output_dir: Path,
               max_steps: int) -> list[RunJob]:
    """The "which objective" runs (each preset at its own defaults) and the auto-beta runs of ``settings``."""
    from sipo.config import load_config

    jobs = []

    def job(method: str, label: str, beta: float, seed: int, source: str, objective: list[str]) -> RunJob:
        name = f"{label}-beta{beta:g}-seed{seed}"
        run_dir = output_dir / "runs" / "field" / (name if source == "mixed" else f"{source}/{name}")
        return RunJob(
            method=label, beta=beta, seed=seed, config_path=str(config_path),
            overrides=[*config_overrides, f"model.pretrained_path={base_dir.resolve()}",
                       f"data.path={pair_sets[source].manifest.resolve()}", f"objective.name={method}", *objective,
                       f"train.seed={seed}", f"train.max_steps={max_steps}", f"train.output_dir={run_dir.resolve()}"],
            base_dir=str(base_dir.resolve()), run_dir=str(run_dir), eval_every=max_steps,
            eval_per_class=settings.eval_per_class, eval_seed=settings.eval_seed, sampling_steps=settings.sampling_steps,
            reward_seed=settings.reward_seed, variant="field" if source == "mixed" else f"field-{source}", source=source,
        )

    for source in (s for s in settings.objective_sources if s in pair_sets):
        for method in settings.objective_methods:
            beta = float(load_config(config_path, [*config_overrides, f"objective.name={method}", "objective.beta=null"]).objective.beta)
            jobs += [job(method, method, beta, seed, source, ["objective.beta=null"]) for seed in settings.seeds]
    for source in (s for s in settings.sensitivity_sources if s in pair_sets):
        for method in settings.auto_beta_methods:
            for beta in settings.betas:
                jobs += [job(method, method + AUTO_SUFFIX, beta, seed, source, [f"objective.beta={beta}", "objective.beta_mode=auto"])
                         for seed in settings.seeds]
    return jobs


def onpolicy_jobs(settings: DemoSettings, config_path, config_overrides, base_dir: Path, pair_sets, output_dir: Path,
                  max_steps: int, beta: float) -> tuple[list[RunJob], list[str]]:
    """The on-policy question's runs (issue 27), all on the base's on-policy pairs at ``beta`` and
    ``max_steps``: ``onpolicy_methods`` as they are, ``stored_noise_methods`` with
    ``objective.noise=stored`` (source "onpolicy-stored"; when this sipo has no such key, none, and a
    note for the report), ``iterative_methods`` as ``iterative_rounds`` rounds (source "iterative")."""
    from sipo.demo.settings import STORED_NOISE_SKIP, stored_noise_available

    if "onpolicy" not in pair_sets:
        return [], []
    notes = []
    stored = settings.stored_noise_methods
    if stored and not stored_noise_available():
        notes.append(f"{STORED_NOISE_SKIP} (this sipo has no objective.noise; the arm would run "
                     f"{', '.join(stored)} with `objective.noise=stored` on pairs_onpolicy, whose rows carry both seeds)")
        stored = ()
    arms = [(m, "onpolicy", [], 1) for m in settings.onpolicy_methods]
    arms += [(m, "onpolicy-stored", ["objective.noise=stored"], 1) for m in stored]
    arms += [(m, "iterative", [], settings.iterative_rounds) for m in settings.iterative_methods]
    jobs = []
    for seed in settings.seeds:
        for method, source, extra, rounds in arms:
            run_dir = output_dir / "runs" / source / f"{method}-beta{beta:g}-seed{seed}"
            jobs.append(RunJob(
                method=method, beta=beta, seed=seed, config_path=str(config_path),
                overrides=[*config_overrides, f"model.pretrained_path={base_dir.resolve()}",
                           f"data.path={pair_sets['onpolicy'].manifest.resolve()}", f"objective.name={method}",
                           f"objective.beta={beta}", f"train.seed={seed}", f"train.max_steps={max_steps}",
                           f"train.output_dir={run_dir.resolve()}", *extra],
                base_dir=str(base_dir.resolve()), run_dir=str(run_dir), eval_every=max_steps,
                eval_per_class=settings.eval_per_class, eval_seed=settings.eval_seed,
                sampling_steps=settings.sampling_steps, reward_seed=settings.reward_seed, variant=source, source=source,
                rounds=rounds, onpolicy=asdict(settings.onpolicy_pairs) if rounds > 1 else None,
            ))
    return jobs, notes


def held_out_pairs(settings: DemoSettings, early, reward, real_images, real_labels, pair_sets, output_dir: Path,
                   progress: bool = True) -> dict[str, Any]:
    """Claim 3's held-out pairs for each source its long runs train on (none when there are none):
    the source's pair settings with ``held_out_pairs`` pairs and seed ``held_out_seed``, its real
    sides drawn only from digits no training pair of that source shows."""
    from sipo.demo.pairs import make_pairs

    if not settings.stability_methods or settings.stability_factor <= 1:
        return {}
    out = {}
    for source in (s for s in settings.stability_sources if s in pair_sets):
        pair_settings = settings.pairs if source == "mixed" else settings.offpolicy_pairs
        if settings.held_out_seed == pair_settings.seed:
            raise SipoError(f"DemoSettings.held_out_seed={settings.held_out_seed} is the training pairs' seed; "
                            "give the held-out pairs another one")
        held_dir = output_dir / ("pairs_heldout" if source == "mixed" else f"pairs_{source}_heldout")
        shutil.rmtree(held_dir, ignore_errors=True)
        out[source] = make_pairs(early, reward, real_images, real_labels, held_dir,
                                 replace(pair_settings, num_pairs=settings.held_out_pairs, seed=settings.held_out_seed),
                                 progress=progress, exclude_real=pair_sets[source].real_indices())
    return out


def _weight_summary(profile, tau: float) -> dict[str, float]:
    """Mean log w of the pair over every defined bucket, and the fraction of pairs the mask drops."""
    import numpy as np

    values = np.asarray(profile.log_w_pair, dtype=float)
    return {"mean_log_w": float(np.nanmean(values)), "masked_fraction": float(np.mean(profile.masked_fraction(tau)))}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))



if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sipo.demo.run", description="the demo, or a part of it")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--claim3", action="store_true", help="claim 3 alone (CLAIM3: --full's claim-3 runs, mixed pairs)")
    part.add_argument("--onpolicy", action="store_true",
                      help="the on-policy question alone (ONPOLICY: dpo/dpo-cm/sipo on mixed, off-policy and on-policy "
                           "pairs, stored vs shared noise, iterative DPO)")
    parser.add_argument("--output-dir", default=None, help="default: runs/claim3 or runs/onpolicy")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="fine-tuning steps of every run (default: configs/demo.yaml's train.max_steps)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs of every training pair source (mixed, off-policy, on-policy; default 2000 each)")
    args = parser.parse_args()
    chosen = ONPOLICY if args.onpolicy else CLAIM3 if args.claim3 else DEFAULT
    if args.max_steps is not None:
        chosen = replace(chosen, max_steps=args.max_steps)
    if args.pairs is not None:
        chosen = replace(chosen, pairs=replace(chosen.pairs, num_pairs=args.pairs),
                         offpolicy_pairs=replace(chosen.offpolicy_pairs, num_pairs=args.pairs),
                         onpolicy_pairs=replace(chosen.onpolicy_pairs, num_pairs=args.pairs))
    default_dir = "runs/onpolicy" if args.onpolicy else "runs/claim3"
    run_demo(Path(args.output_dir or default_dir), settings=chosen)

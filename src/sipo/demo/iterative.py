"""Iterative DPO on the demo: rounds of "sample pairs from the current policy, rank, train N more steps".

Round 1 trains on the base model's on-policy pairs (the ``onpolicy`` source, ``data.path`` of the
job: with the same training seed, round 1 is exactly the first N steps of the single-round on-policy
run, so iterative vs single-round isolates what round 2 changes); round ``r > 1`` samples its pairs
from the policy round ``r - 1`` ended with (:func:`sipo.demo.onpolicy.make_onpolicy_pairs`, seed
``round_pair_seed``, as many pairs as its steps train on: ``round_pairs``) and *resumes* the same
run for N more steps: one LoRA, one optimizer state, the reference is the base throughout
(``--reference base``), and the total is the single-round arms' ``train.max_steps``. Nothing here
trains but :func:`sipo.train.train`; when ``sipo iterate`` (``sipo.iterate``) lands, :func:`run_rounds`
is the place to route through it.

A resumed run refuses new data (``data.files`` is part of its fingerprint, sipo.checkpoints) because
for a single run that would be a mistake; here a new round's data is the point, so each round after
the first resumes with ``train.resume_new_data=true``, as ``sipo iterate`` does.
"""

from __future__ import annotations

import io
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

#: round r's pairs for training seed s use OnPolicySettings.seed = ROUND_SEED_STRIDE * r + s (r >= 1):
#: never the base's set (seed 0 of the on-policy source), never another seed's or round's
ROUND_SEED_STRIDE = 1000


def round_pair_seed(round_index: int, train_seed: int) -> int:
    """The pair-set seed of round ``round_index`` (0-based; round 0 uses the base's pairs) of ``train_seed``."""
    return ROUND_SEED_STRIDE * round_index + train_seed


def round_steps(total_steps: int, rounds: int) -> list[int]:
    """``train.max_steps`` at the end of each round: ``total_steps`` split as evenly as it goes."""
    return [total_steps * (r + 1) // rounds for r in range(rounds)]


def round_pairs(steps: int, batch_size: int) -> int:
    """Pairs a later round samples: the ones its steps train on, each once (sampling K pictures per
    prompt costs more than the training steps; the base's set of round 1 is the shared on-policy one)."""
    return steps * batch_size


def run_rounds(job, tick=None, *, runner) -> dict[str, Any]:
    """``job.rounds`` rounds of DPO (the job's objective) totalling ``train.max_steps`` steps; the
    record is a single run's (its curve over every step), plus each round's pairs summary. ``runner``
    is the module that runs one fine-tune (sipo.demo.run, which calls this): its ``Evaluation``,
    ``_context``, ``finish_run`` and ``train_quietly``, passed in rather than imported (no import circle)."""
    from sipo.config import load_config
    from sipo.demo.onpolicy import OnPolicySettings, make_onpolicy_pairs

    Evaluation, _context, finish_run, train_quietly = (runner.Evaluation, runner._context, runner.finish_run,
                                                       runner.train_quietly)

    started = time.perf_counter()
    base, reward, eval_set = _context(job)
    config = load_config(job.config_path, job.overrides)
    ends = round_steps(config.train.max_steps, job.rounds)
    pair_settings = OnPolicySettings(**(job.onpolicy or {}))
    data_path, history, rounds_info = config.data.path, [], []
    log = io.StringIO()
    evaluation = Evaluation(job, reward, eval_set, ends[0], tick)  # one curve over every round
    for round_index, end in enumerate(ends):
        if round_index > 0:  # this round's pairs, sampled from the policy the last round ended with
            pairs = make_onpolicy_pairs(
                evaluation.policy, reward, Path(job.run_dir) / f"round{round_index + 1}_pairs",
                replace(pair_settings, seed=round_pair_seed(round_index, job.seed),
                        num_pairs=round_pairs(end - ends[round_index - 1], config.train.batch_size)), progress=False)
            data_path = str(pairs.manifest.resolve())
            rounds_info.append({"round": round_index + 1, "pairs": pairs.summary()})
        config = load_config(job.config_path, [*job.overrides, f"data.path={data_path}", f"train.max_steps={end}",
                                               "train.resume_new_data=true"])
        evaluation.last_step = end  # each round ends evaluated
        result = train_quietly(config, evaluation, base, log, resume=round_index > 0)
        history += result.history
    return finish_run(job, config, evaluation, history, result.steps, log.getvalue(), started,
                      rounds=[{"round": 1, "data": job_data_path(job)}, *rounds_info], round_ends=ends)


def job_data_path(job) -> str:
    """The ``data.path`` override of ``job`` (round 1's pairs)."""
    return next((o.split("=", 1)[1] for o in reversed(job.overrides) if o.startswith("data.path=")), "")

"""The objectives as pure functions on tensors (SPEC 2-5 and 9), one namespace: ``sipo.objectives``.

- ``core``: Diffusion-DPO (SPEC 2), the step-wise importance weight (SPEC 3), DPO-C&M (SPEC 4) and
  SIPO's timestep-aware reweighting (SPEC 5). Per-pair quantities come first (``dpo_logits``,
  ``log_importance_weight``, ``pair_log_weight``); turning them into one scalar is a separate, named
  step (``importance_mask``, ``clip_weight``, ``reduce_pair_losses``, composed by ``preference_loss``); the
  ``*_sums`` forms return the loss as the two sums (``LossSums``) that the trainer totals over the
  optimizer step's whole batch before its one normaliser (``step_loss``).
- ``field``: the field's other offline objectives (SPEC 9: hinge, IPO, smoothed DPO, DMPO, alpha-DPO,
  KTO, MaPO, DSPO, element-wise SIPO, SFT) and the automatic beta.

Nothing here reads a config, a file or a clock, and nothing draws random numbers: the caller draws
``t``, ``eps`` and ``x_prev``. Shapes: batch first; per-pair results are float32 ``[B]``.
"""

from sipo.objectives.core import (  # noqa: F401
    PAIR_WEIGHT_MODES,
    WEIGHT_PLACEMENTS,
    WEIGHT_NORMS,
    NORMALIZE_MODES,
    per_sample_error,
    dpo_logits,
    weighted_dpo_logits,
    dpo_loss_per_pair,
    gaussian_posterior,
    log_importance_weight,
    pair_log_weight,
    importance_mask,
    clip_weight,
    LossSums,
    step_loss,
    pair_loss_sums,
    reduce_pair_losses,
    preference_loss_sums,
    preference_loss,
    trust_region_bounds,
    inside_preference_loss_sums,
    inside_preference_loss,
    timestep_bucket,
    update_timestep_ema,
    _check_pair_shapes,
)

from sipo.objectives.field import (  # noqa: F401
    hinge_loss,
    ipo_loss,
    smoothed_dpo_loss,
    dmpo_loss,
    alpha_dpo_loss,
    adaptive_alpha,
    kto_loss,
    kto_reference_point,
    mapo_loss,
    DSPO_VARIANTS,
    dspo_loss,
    winner_safeguard_scale,
    safeguarded_error,
    elementwise_sipo_logits,
    elementwise_sipo_loss,
    sft_loss,
    abs_margin_for_beta,
    auto_beta,
    update_abs_margin_ema,
)

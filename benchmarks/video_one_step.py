"""Relative error of `adapter.predict` against the family pipeline's own one-step call, on fresh tiny models.

    python benchmarks/video_one_step.py        # ltx2 and hunyuanvideo15, t = 100 and 700, policy and reference

The comparison is the tests' own (`pipeline_one_step` of tests/test_models_ltx2.py and
tests/test_models_hunyuanvideo15.py, which assert <= 1e-5); this prints the figures docs/models.md quotes.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import test_models_hunyuanvideo15 as hunyuan
    import test_models_ltx2 as ltx2
    from family_contract import inject_lora

    from sipo.models import load_adapter, lora_disabled
    from sipo.models.hunyuanvideo15 import HunyuanVideo15Adapter
    from sipo.models.ltx2 import LTX2Adapter

    families = (("ltx2", LTX2Adapter, ltx2, (1, 8, 3, 2, 2), "a cat"),
                ("hunyuanvideo15", HunyuanVideo15Adapter, hunyuan, (1, 4, 3, 2, 2), 'a "sign" and a cat'))
    with tempfile.TemporaryDirectory() as root:
        for family, cls, module, shape, prompt in families:
            adapter = load_adapter(family, str(cls.build_random_pipeline(Path(root) / family)))
            adapter.freeze_encoders()
            adapter.denoiser.eval()
            inject_lora(adapter)
            cond = adapter.encode_prompts([prompt])
            for t in (100, 700):
                x_t = torch.randn(*shape, generator=torch.Generator().manual_seed(t))
                sigma = float(adapter.schedule.b[t])
                for reference in (False, True):
                    with torch.no_grad(), lora_disabled(adapter.denoiser) if reference else contextlib.nullcontext():
                        ours = x_t - sigma * adapter.predict(x_t, torch.tensor([t]), cond)
                        theirs = module.pipeline_one_step(adapter, x_t, sigma, prompt)
                    error = float((ours - theirs).norm() / theirs.norm())
                    print(f"{family:15s} t={t:4d} {'reference' if reference else 'policy':9s} relative error {error:.1e}")


if __name__ == "__main__":
    main()

"""The embedded demo: a tiny digits diffusion model, its reward, off-policy pairs, and the
DPO vs DPO-C&M vs SIPO comparison (`sipo demo`; docs/demo.md)."""

import os

# Tiny models on a shared 2-core CPU: OpenMP workers that spin while waiting made steps up to 10x
# slower under load (measured, docs/demo.md). Only effective if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sipo.demo.run import FULL, QUICK, DemoSettings, run_demo  # noqa: E402

__all__ = ["DemoSettings", "FULL", "QUICK", "run_demo"]

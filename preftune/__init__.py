"""preftune: tune language models on preference data — the whole DPO family behind one trainer.

Public API:
    train(config=None, overrides=None) -> TrainResult   (run directory + final metrics)
    build_config(source, overrides) -> Config
    losses.compute(name, logps, **hparams), losses.LOSSES
    report.write_report(run_dir), report.compare_runs(run_dirs, out)
    claims.run_claim(name, overrides, out) -> result.md   (`preftune claim dpop|ipo|beta_dpo`)
    diagnostics.pair_diagnostics(...), segment_sums(...)  (per-pair metrics the trainer logs)
"""

from preftune.config import Config, ConfigError, build_config

__version__ = "0.1.0"


def train(config=None, overrides=None):
    """Run the offline trainer; see preftune.train.trainer.train."""
    from preftune.train.trainer import train as _train

    return _train(config, overrides)


__all__ = ["Config", "ConfigError", "build_config", "train", "__version__"]

"""preftune: tune language models on preference data — the whole DPO family behind one trainer.

Public API:
    train(config=None, overrides=None) -> TrainResult   (run directory + final metrics)
    train_online(config=None, overrides=None), train_reward(config=None, overrides=None)
    build_config(source, overrides) -> Config
    UserError: what every mistake a user can fix raises (exit code 2 from the CLI)
    losses.compute(name, logps, **hparams), losses.LOSSES
    report.write_report(run_dir), report.compare_runs(run_dirs, out)
    claims.run_claim(name, overrides, out) -> result.md   (`preftune claim dpop|ipo|beta_dpo`)
    diagnostics.pair_diagnostics(...), segment_sums(...)  (per-pair metrics the trainer logs)
"""

# The subpackage preftune.train is imported before the function of the same name is bound:
# Python sets a package's attribute to a subpackage when that is first imported, which would
# otherwise replace `preftune.train` with the module on the first run (and a second call would
# find a module). Importing the subpackage is cheap: its names load on first use.
import preftune.train  # noqa: F401
from preftune.api import train, train_online, train_reward
from preftune.config import Config, ConfigError, build_config
from preftune.errors import UserError

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "UserError",
    "build_config",
    "train",
    "train_online",
    "train_reward",
    "__version__",
]

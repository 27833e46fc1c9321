"""Bad inputs end in one line, `preftune: error: <what>, <where>; <what to do>`, with exit code 2,
no traceback, before training, and leave every existing run directory as it was.

Each row of CASES is one bad input: the command line (a config file first, then key=value
overrides that follow the tiny-run defaults in BASE), a `setup(tmp, tiny)` that writes what the
row needs under `tmp`, and words the message must hold (what was wrong and where). `{tmp}` and
`{tiny}` in a row's strings name that folder and the tiny model (other braces are doubled: they
go through str.format). To add a row, append a Case.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from preftune.cli import main

BASE = [
    "model={tiny}",
    "output_dir={tmp}/runs",
    "report_to=none",
    "eval_before=false",
    "num_task_eval=0",
    "max_steps=1",
    "batch_size=2",
    "--quiet",
]
PAIR = {"prompt": "Q: 1 + 1?", "chosen": " 2", "rejected": " 3"}
CONV = {
    "prompt": [{"role": "user", "content": "What is 1 + 1?"}],
    "chosen": [{"role": "assistant", "content": "2"}],
    "rejected": [{"role": "assistant", "content": "3"}],
}


@dataclass
class Case:
    id: str
    args: list[str]  # key=value overrides after BASE (later keys win), or other arguments
    setup: Callable[[Path, Path], object] | None = None  # (tmp, tiny) -> writes what it needs
    expect: tuple[str, ...] = ()  # words the message holds: what was wrong, and where
    command: str = "train"
    config: str | None = None  # a config file, given before the overrides
    base: bool = True  # whether BASE comes first


# ---- what the rows write ---------------------------------------------------------------------
def saved_run(name: str, pickle_file: str | None = None, lock: bool = False):
    """A run folder `saved/name` whose config.yaml is a real one (the tiny model, arithmetic_edit),
    with a pickle file at `pickle_file` and a live process's lock if asked."""

    def write(tmp: Path, tiny: Path) -> None:
        from preftune.config import build_config

        run = tmp / "saved" / name
        run.mkdir(parents=True)
        cfg = {"model": str(tiny), "data": "arithmetic_edit", "output_dir": str(tmp / "saved"),
               "run_name": name, "quiet": True, "report_to": "none"}  # fmt: skip
        build_config(cfg).save(run / "config.yaml")
        if pickle_file:
            (run / pickle_file).parent.mkdir(parents=True)
            (run / pickle_file).write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
        if lock:  # the parent of this process: alive for as long as the test runs
            (run / ".lock").write_text(
                json.dumps({"pid": os.getppid(), "host": socket.gethostname()})
            )

    return write


def lines(name: str, *rows, raw: bytes = b""):
    """A setup writing `name` under tmp: each row a dict (as JSON) or a str (as is), then `raw`."""

    def write(tmp: Path, tiny: Path) -> None:
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        (tmp / name).write_bytes(text.encode() + raw)

    return write


def pairs(name: str, n: int):
    return lines(name, *({**PAIR, "prompt": f"Q: {i} + 1?"} for i in range(n)))


def text(name: str, content: str | bytes):
    def write(tmp: Path, tiny: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return write


def model_copy(name: str, change: Callable[[Path], object]):
    """A copy of the tiny model folder as `name`, changed by `change(folder)`."""

    def write(tmp: Path, tiny: Path) -> None:
        shutil.copytree(tiny, tmp / name)
        change(tmp / name)

    return write


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # the name is enough


def _needs_own_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mycustom", auto_map={"AutoModelForCausalLM": "modeling_my.MyLM"})
    (folder / "config.json").write_text(json.dumps(config))


def _no_chat_template(folder: Path) -> None:
    (folder / "chat_template.jinja").unlink()


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()


def _adapter_only(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "adapter_config.json").write_text("{}")


def _saved_dataset_without_train(tmp: Path, tiny: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"test": Dataset.from_list([PAIR] * 3)}).save_to_disk(str(tmp / "saved"))


def both(*setups):
    def write(tmp: Path, tiny: Path) -> None:
        for s in setups:
            s(tmp, tiny)

    return write


# fmt: off
CASES = [
    # ---- data files ----
    Case("data-missing-file", ["data={tmp}/nope.jsonl"], None, ("nope.jsonl", "no such file")),
    Case("data-bare-name", ["data=mydata"], None, ("data=mydata", "no such file or folder")),
    Case("data-hub-id", ["data=no-such-owner/no-such-data"], None, ("no-such-owner/no-such-data", "hub")),
    Case("data-not-utf8", ["data={tmp}/d.jsonl"], lines("d.jsonl", PAIR, raw=b'{"prompt": "caf\xe9"}\n'),
         ("d.jsonl:2", "not UTF-8", "--skip-invalid")),
    Case("data-bad-json", ["data={tmp}/d.jsonl"], lines("d.jsonl", PAIR, "{not json"), ("d.jsonl:2", "not valid JSON")),
    Case("data-json-array", ["data={tmp}/d.json"], text("d.json", "[\n" + json.dumps(PAIR) + "\n]\n"),
         ("d.json:1", "one JSON object")),
    Case("data-missing-field", ["data={tmp}/d.jsonl"], lines("d.jsonl", {"prompt": "x", "chosen": "a"}),
         ("d.jsonl:1", "'rejected'")),
    Case("data-not-an-object", ["data={tmp}/d.jsonl"], lines("d.jsonl", PAIR, "[1, 2]"), ("d.jsonl:2", "object")),
    Case("data-chosen-is-rejected", ["data={tmp}/d.jsonl"],
         lines("d.jsonl", PAIR, {"prompt": "x", "chosen": "a", "rejected": "a"}), ("d.jsonl:2", "identical")),
    Case("data-chosen-is-rejected-implicit", ["data={tmp}/d.jsonl"],
         lines("d.jsonl", {"chosen": "Q: a", "rejected": "Q: a"}), ("d.jsonl:1", "identical")),
    Case("data-empty-file", ["data={tmp}/d.jsonl"], text("d.jsonl", ""), ("d.jsonl", "no valid records")),
    Case("data-label-not-bool", ["data={tmp}/d.jsonl", "loss=kto"],
         lines("d.jsonl", {"prompt": "p", "completion": "c", "label": "yes"}), ("d.jsonl:1", "label")),
    Case("data-mixed-kinds", ["data={tmp}/d.jsonl"],
         lines("d.jsonl", PAIR, {"prompt": "p", "completion": "c", "label": True}), ("d.jsonl", "mixes")),
    Case("data-unpaired-for-dpo", ["data={tmp}/d.jsonl"],
         lines("d.jsonl", *[{"prompt": f"p{i}", "completion": "c", "label": True} for i in range(5)]),
         ("loss 'dpo'", "loss=kto")),
    Case("data-bad-margin", ["data={tmp}/d.jsonl"], lines("d.jsonl", {**PAIR, "margin": "big"}),
         ("d.jsonl:1", "margin")),
    Case("data-conversational-no-chat-template", ["data={tmp}/d.jsonl", "model={tmp}/nct"],
         both(lines("d.jsonl", *[CONV] * 4), model_copy("nct", _no_chat_template)),
         ("d.jsonl:", "chat template")),
    Case("data-prompt-longer-than-max-length", ["data={tmp}/d.jsonl", "max_length=32", "max_prompt_length=64"],
         lines("d.jsonl", *[{**PAIR, "prompt": "word " * 80}] * 4), ("d.jsonl:", "max_length=32")),
    Case("data-folder-not-a-dataset", ["data={tmp}/folder"], lambda tmp, tiny: (tmp / "folder").mkdir(),
         ("folder", "cannot be read")),
    Case("data-corrupt-parquet", ["data={tmp}/d.parquet"], text("d.parquet", b"PAR1 not really"), ("d.parquet", "Parquet")),
    Case("data-dataset-without-train-split", ["data={tmp}/saved"], _saved_dataset_without_train, ("saved", "'train'")),
    Case("eval-data-missing", ["data={tmp}/d.jsonl", "eval_data={tmp}/nope.jsonl"], pairs("d.jsonl", 8),
         ("eval_data=", "nope.jsonl")),
    Case("eval-data-unpaired-for-dpo", ["data={tmp}/d.jsonl", "eval_data={tmp}/e.jsonl"],
         both(pairs("d.jsonl", 8), lines("e.jsonl", {"prompt": "p", "completion": "c", "label": True})),
         ("eval_data=", "e.jsonl", "loss=kto")),
    Case("batch-size-above-data", ["data={tmp}/d.jsonl", "batch_size=64"], pairs("d.jsonl", 10),
         ("d.jsonl", "batch_size=64")),
    # ---- config ----
    Case("config-missing", [], None, ("nope.yaml", "does not exist"), config="{tmp}/nope.yaml"),
    Case("config-is-a-folder", [], lambda tmp, tiny: (tmp / "c.yaml").mkdir(), ("c.yaml", "folder"), config="{tmp}/c.yaml"),
    Case("config-bad-yaml", [], text("c.yaml", "lr: 1e-5\nbeta: [0.1\nloss: dpo\n"), ("c.yaml:", "YAML"),
         config="{tmp}/c.yaml"),
    Case("config-not-a-mapping", [], text("c.yaml", "- lr\n- beta\n"), ("c.yaml", "mapping"), config="{tmp}/c.yaml"),
    Case("config-not-utf8", [], text("c.yaml", b"lr: 1e-5\nrun_name: caf\xe9\n"), ("c.yaml", "UTF-8"),
         config="{tmp}/c.yaml"),
    Case("config-loss-args-not-a-mapping", [], text("c.yaml", "loss_args: 5\n"), ("loss_args",), config="{tmp}/c.yaml"),
    Case("config-section-not-flat", [], text("c.yaml", "data:\n  data: x.jsonl\n"), ("'data'", "flat"),
         config="{tmp}/c.yaml"),
    Case("config-unknown-key", ["learning_rate=1e-5"], None, ("learning_rate", "did you mean 'lr'")),
    Case("config-override-without-equals", ["lr"], text("c.yaml", "lr: 1e-5\n"), ("'lr'", "key=value"),
         config="{tmp}/c.yaml", base=False),
    Case("config-not-a-number", ["lr=fast"], None, ("'lr'", "number")),
    Case("config-beta-negative", ["beta=-1"], None, ("beta",)),
    Case("config-unknown-loss", ["loss=dpp"], None, ("dpp", "did you mean")),
    Case("config-num-eval-negative", ["num_eval=-1"], None, ("num_eval",)),
    Case("config-unknown-optimizer", ["optimizer=adam"], None, ("optimizer", "adamw")),
    Case("config-calibration-not-a-number", ["beta_calibration={{alpha: high}}"], None, ("beta_calibration.alpha",)),
    # ---- models ----
    Case("model-missing-folder", ["model={tmp}/nope"], None, ("nope", "no such folder")),
    Case("model-hub-id", ["model=no-such-owner/no-such-model"], None, ("no-such-owner/no-such-model", "hub")),
    Case("model-is-a-file", ["model={tmp}/w.bin"], text("w.bin", "x"), ("w.bin", "is a file")),
    Case("model-folder-without-config", ["model={tmp}/empty"], lambda tmp, tiny: (tmp / "empty").mkdir(),
         ("empty", "config.json")),
    Case("model-pickle-weights-only", ["model={tmp}/pk"], model_copy("pk", _pickle_only),
         ("pk", "pickle", "safetensors")),
    Case("model-needs-own-code", ["model={tmp}/rc"], model_copy("rc", _needs_own_code),
         ("rc", "trust_remote_code=true")),
    Case("model-config-not-json", ["model={tmp}/bad"],
         model_copy("bad", lambda f: (f / "config.json").write_text("{oops")), ("config.json", "not valid JSON")),
    Case("model-without-tokenizer", ["model={tmp}/nt"], model_copy("nt", _no_tokenizer), ("nt", "tokenizer")),
    Case("model-corrupt-safetensors", ["model={tmp}/cs"],
         model_copy("cs", lambda f: (f / "model.safetensors").write_bytes(b"\x08" * 64)), ("cs", "cannot be loaded")),
    Case("model-lora-adapter-folder", ["model={tmp}/ad"], model_copy("ad", _adapter_only), ("ad", "LoRA adapter")),
    Case("model-lora-targets-nothing", ["lora=true", "lora_target_modules=no_such_proj", "data=arithmetic_edit",
                                        "num_train=4"], None, ("lora_target_modules=no_such_proj",)),
    # ---- folders ----
    Case("output-dir-under-a-file", ["output_dir={tmp}/f.txt/runs"], text("f.txt", "x"), ("f.txt", "is a file")),
    # ---- the other run commands ----
    Case("reward-data-missing", ["data={tmp}/nope.jsonl"], None, ("nope.jsonl",), command="reward"),
    Case("online-data-not-utf8", ["data={tmp}/d.jsonl"], lines("d.jsonl", PAIR, raw=b'{"prompt": "\xff"}\n'),
         ("d.jsonl:2", "UTF-8"), command="online"),
    Case("online-judge-missing", ["judge={tmp}/no-rm", "data=arithmetic_edit", "num_train=4"], None,
         ("no-rm",), command="online"),
    # ---- run directories and resume targets ----
    Case("run-name-taken", ["run_name=old"], None, ("runs/old", "already holds a run", "resume=")),
    Case("run-name-a-path", ["run_name=../elsewhere"], None, ("run_name='../elsewhere'", "plain folder")),
    Case("resume-no-such-folder", ["--resume", "{tmp}/runs/nope", "--quiet"], None,
         ("runs/nope", "no such folder"), base=False),
    Case("resume-not-a-run", ["--resume", "{tmp}", "--quiet"], None, ("not a preftune run",), base=False),
    Case("resume-config-unreadable", ["--resume", "{tmp}/runs/old", "--quiet"], None,
         ("runs/old", "config.yaml cannot be read", "a mapping of config keys expected"), base=False),
    Case("resume-pickle-in-checkpoint", ["--resume", "{tmp}/saved/pk", "--quiet"],
         saved_run("pk", "checkpoints/step-1/trainer.pt"), ("trainer.pt", "pickle"), base=False),
    Case("resume-changes-beta", ["--resume", "{tmp}/saved/cb", "beta=0.5"], saved_run("cb"),
         ("beta=0.5", "differs from the run's beta=0.1"), base=False),
    # ---- preftune compare ----
    Case("compare-not-a-run", ["{tmp}/saved/nm"], saved_run("nm"),
         ("saved/nm", "not a preftune run directory"), command="compare", base=False),
    Case("compare-damaged-metrics", ["{tmp}/bad"],
         text("bad/metrics.jsonl", '{"step": 1, "lo\n{"step": 2}\n'),
         ("bad/metrics.jsonl:1", "not a JSON row"), command="compare", base=False),
    Case("compare-same-names", ["{tmp}/a/r", "{tmp}/b/r"],
         both(text("a/r/metrics.jsonl", '{"step": 1}\n'), text("b/r/metrics.jsonl", '{"step": 1}\n')),
         ("share a folder name",), command="compare", base=False),
    Case("resume-run-in-use", ["--resume", "{tmp}/saved/lk", "--quiet"], saved_run("lk", lock=True),
         ("saved/lk", "being written by another preftune run"), base=False),
]
# fmt: on


def argv_of(case: Case, tmp: Path, tiny: Path) -> list[str]:
    args = ([case.config] if case.config else []) + (BASE if case.base else []) + case.args
    return [case.command] + [a.format(tmp=tmp, tiny=tiny) for a in args]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


@pytest.fixture
def workdir(tmp_path):
    """tmp_path with runs/old holding a finished run's files, as a user's runs folder would."""
    old = tmp_path / "runs" / "old"
    (old / "checkpoints" / "step-1").mkdir(parents=True)
    (old / "final").mkdir()
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/step-1/state.json",
        "final/model.safetensors",
    ):
        (old / name).write_text(name)
    return tmp_path


def check_one_line(err: str, case: Case, tmp: Path) -> None:
    assert "Traceback" not in err
    lines_ = err.strip().splitlines()
    assert len(lines_) == 1, err
    assert lines_[0].startswith("preftune: error: "), err
    for word in case.expect:
        assert word.format(tmp=tmp) in lines_[0], (word, lines_[0])


def existing_runs(tmp: Path) -> dict[str, dict]:
    """What the run folders a row starts with hold: runs/old and the rows' saved/ runs."""
    return {str(p): snapshot(p) for p in [tmp / "runs" / "old", tmp / "saved"] if p.exists()}


def check_runs_untouched(tmp: Path, before: dict) -> None:
    runs = tmp / "runs"
    assert existing_runs(tmp) == before, "an existing run directory changed"
    for run in runs.iterdir():  # nothing trained: no new run holds a checkpoint or a model
        assert run.name == "old" or not ({"checkpoints", "final"} & {p.name for p in run.iterdir()})


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, workdir, tiny_dir, capsys):
    if case.setup:
        case.setup(workdir, tiny_dir)
    before = existing_runs(workdir)
    capsys.readouterr()
    assert main(argv_of(case, workdir, tiny_dir)) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out
    check_one_line(captured.err, case, workdir)
    check_runs_untouched(workdir, before)


SUBPROCESS = ["model-missing-folder", "data-not-utf8", "config-bad-yaml"]


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_bad_input_through_a_real_process(case_id, workdir, tiny_dir):
    """The same rows through `python -m preftune.cli`: the exit status is the process's own."""
    case = next(c for c in CASES if c.id == case_id)
    if case.setup:
        case.setup(workdir, tiny_dir)
    before = existing_runs(workdir)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "preftune.cli", *argv_of(case, workdir, tiny_dir)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    check_one_line(proc.stderr, case, workdir)
    check_runs_untouched(workdir, before)


def test_skip_invalid_skips_and_counts_a_non_utf8_line(workdir, tiny_dir, capsys):
    lines(
        "d.jsonl",
        *[{**PAIR, "prompt": f"Q: {i}?"} for i in range(4)],
        raw=b'{"prompt": "caf\xe9"}\n',
    )(workdir, tiny_dir)
    from preftune.data.records import load_records

    records, report = load_records(workdir / "d.jsonl", skip_invalid=True)
    assert len(records) == 4 and sum(report.skipped.values()) == 1
    assert "1 skipped (1 not UTF-8" in report.summary()


def test_options_and_overrides_in_any_order():
    from preftune.cli import parse

    args = parse(["train", "lr=1e-5", "--quiet", "beta=0.2", "--skip-invalid", "loss=ipo"])
    assert (
        args.overrides == ["lr=1e-5", "beta=0.2", "loss=ipo"] and args.quiet and args.skip_invalid
    )
    for command in ("reward", "online"):
        args = parse([command, "lr=1e-5", "--quiet", "beta=0.2"])
        assert args.overrides == ["lr=1e-5", "beta=0.2"] and args.quiet
    with pytest.raises(SystemExit):
        parse(["train", "lr=1e-5", "--no-such-option"])

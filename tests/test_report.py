import json

from preftune.report import compare_runs, write_report


def fake_run(path, slope):
    path.mkdir(parents=True)
    rows = [{"step": s, "loss": 0.69 - slope * s, "logps/chosen": -10 - s, "logps/rejected": -12 - 2 * s,
             "rewards/margins": slope * s, "beta": 0.1 + 0.01 * s} for s in range(1, 6)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"loss": rows[-1]["loss"]}))
    return path


def test_report_and_compare_write_plots(tmp_path):
    a, b = fake_run(tmp_path / "a", 0.05), fake_run(tmp_path / "b", 0.1)
    page = write_report(a).read_text()
    assert "plots/logps.png" in page and (a / "plots" / "beta.png").stat().st_size > 1000
    out = compare_runs([str(a), str(b)], tmp_path / "cmp.html")
    assert "cmp_plots/margins.png" in out.read_text()
    assert (tmp_path / "cmp_plots" / "loss.png").exists()

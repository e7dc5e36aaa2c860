"""What a person sees: the status line's engine field and the run plot's utilisation panel."""

import json
import struct

from streamrl.config import default_args
from streamrl.metrics import MetricsLogger, eval_steps, plot_run


def row(step, t, wait, busy, its, rows):
    return {"step": step, "time": t, "reward": 0.5, "samples_per_s": 10.0, "buffer_fill": 3, "buffer_capacity": 8,
            "staleness_mean": 0.5, "staleness_max": 1, "trainer_wait_frac": 0.1, "version": step,
            "trainer_wait_time": wait, "engine_busy_time": busy, "engine_iterations": its, "engine_rows": rows,
            "engine_count": 2}


def test_status_line_engine_field_over_the_interval(tmp_path):
    log = MetricsLogger(default_args(), tmp_path, total_steps=3)
    first = log.status_line(row(1, 10.0, 1.0, 5.0, 100, 1000))
    assert "engine" not in first  # no interval yet
    # 10 s later: 2 engines busy 18 s in all = 90% each; 24000 rows in 100 iterations
    line = log.status_line(row(2, 20.0, 1.5, 23.0, 200, 25000))
    assert line.endswith("| engine  90% busy, 240 rows/it"), line
    # an engine died: the sums now cover one engine (less busy time than before): no figure, never a negative %
    dead = {**row(3, 30.0, 2.0, 20.0, 250, 26000), "engine_count": 1}
    assert "engine" not in log.status_line(dead).split("|")[-1]
    log.close()


def test_plot_has_a_utilisation_panel_when_counters_are_logged(tmp_path):
    rows = [row(1, 10.0, 1.0, 5.0, 100, 1000), row(2, 20.0, 1.5, 23.0, 200, 25000), row(3, 30.0, 2.0, 41.0, 300, 50000)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_util = plot_run(tmp_path).read_bytes()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if "engine" not in k})
                                                    + "\n" for r in rows))
    without = plot_run(tmp_path).read_bytes()
    height = lambda png: struct.unpack(">I", png[20:24])[0]  # noqa: E731  (PNG IHDR)
    assert height(with_util) == 850 and height(without) == 600  # three panels vs two (figure inches x 100 dpi)


def test_plot_has_a_mismatch_panel_when_buckets_are_logged(tmp_path):
    rows = [row(1, 10.0, 1.0, 5.0, 100, 1000), row(2, 20.0, 1.5, 23.0, 200, 25000)]
    rows[0].update({"mismatch/s0/kl": 0.0, "mismatch/s1/kl": 0.2})
    rows[1].update({"mismatch/s0/kl": 0.001, "mismatch/s2/kl": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    height = struct.unpack(">I", plot_run(tmp_path).read_bytes()[20:24])[0]
    assert height == 1100  # reward, staleness, utilisation, KL(µ‖π_prox) per staleness bucket


def test_evals_are_plotted_at_the_step_of_their_weights_and_the_run_keeps_its_flags(tmp_path):
    evals = [{"step": 0, "eval/version": 0.0}, {"step": 12, "eval/version": 5.0}, {"step": 30}]
    assert eval_steps(evals, interval=2) == [0.0, 10.0, 30]  # version 5 = the weights after step 10
    MetricsLogger(default_args(update_weights_interval=2, prompt_data="data/sort/train.jsonl"), tmp_path, 3).close()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["update_weights_interval"] == 2 and cfg["prompt_data"] == "data/sort/train.jsonl"

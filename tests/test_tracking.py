"""MLflow helpers: batched metric logging, the loss-curve PNG, the store location, the gate's rules."""

from __future__ import annotations

import math

import pytest

from gptcore.config import config_from_dict
from tasks import tracking


class RecordingClient:
    """Stands in for MlflowClient.log_batch: records each call."""

    def __init__(self):
        self.batches = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.batches.append((run_id, list(metrics)))


def test_metric_buffer_batches_rows_and_keeps_every_value():
    c = RecordingClient()
    buf = tracking.MetricBuffer(c, "r1", every=10)
    for step in range(1, 26):
        buf("log", {"step": step, "loss": 10.0 / step, "lr": 1e-3, "tokens_per_s": 5e3, "mfu": 0.1, "note": "x"})
    buf("checkpoint", {"step": 25, "path": "p"})  # not a metric row
    assert len(c.batches) == 2  # 10 + 10 rows so far; 5 pending
    buf("eval", {"step": 25, "val_loss": 2.5, "val_bpb": float("nan")})
    buf("end", {})
    assert len(c.batches) == 3
    metrics = [m for _, ms in c.batches for m in ms]
    losses = [(m.step, m.value) for m in metrics if m.key == "loss"]
    assert losses == [(s, 10.0 / s) for s in range(1, 26)]
    assert {m.key for m in metrics} == {"loss", "lr", "tokens_per_s", "mfu", "val_loss"}  # nan and text dropped
    assert all(run_id == "r1" for run_id, _ in c.batches)


def test_metric_buffer_splits_batches_at_mlflows_limit():
    c = RecordingClient()
    buf = tracking.MetricBuffer(c, "r", every=10_000)
    for step in range(600):
        buf("log", {"step": step, "a": 1.0, "b": 2.0})
    buf.flush()
    assert [len(ms) for _, ms in c.batches] == [1000, 200]


def test_metric_buffer_without_tracking_is_a_no_op():
    buf = tracking.MetricBuffer(None, None)
    buf("log", {"step": 1, "loss": 1.0})
    buf.flush()
    assert buf.rows == [("log", {"step": 1, "loss": 1.0})]


def test_plot_curves_writes_a_png(tmp_path):
    rows = [{"step": s, "loss": 5 - s / 10} for s in range(1, 20)] + [{"step": 19, "val_loss": 3.5}]
    path = tracking.plot_curves(rows, tmp_path / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tracking.plot_curves([{"step": 1, "lr": 0.1}], tmp_path / "none.png") is None


def test_tracking_uri_defaults_to_an_absolute_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(config_from_dict({})) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(config_from_dict({})) == "http://127.0.0.1:5999"
    cfg = config_from_dict({"tracking": {"tracking_uri": "sqlite:///x/m.db"}})
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path}/x/m.db"


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    """One sqlite MLflow store for the module (creating one costs seconds)."""
    return tracking.client(f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/m.db")


def _logged(c, run_id: str) -> str:
    """A (content-free) MLflow logged model of `run_id`, as a stage logs its model: what a version points at."""
    return c.create_logged_model(c.get_run(run_id).info.experiment_id, source_run_id=run_id).model_id


def test_promotion_gate_rules(c):
    exp = tracking.experiment_id(c, "gate")
    assert tracking.experiment_id(c, "gate") == exp
    run_id = tracking.start_run(c, exp, "r")
    v1, new = tracking.register_version(c, "m", _logged(c, run_id), run_id, "sha1", "val_bpb", 2.0)
    assert new and v1 == "1"
    assert tracking.register_version(c, "m", _logged(c, run_id), run_id, "sha1", "val_bpb", 2.0) == ("1", False)
    assert tracking.promotion_gate(c, "m", v1, "val_bpb", 2.0) == (True, "promoted: first champion (val_bpb=2.0000)")
    v2, _ = tracking.register_version(c, "m", _logged(c, run_id), run_id, "sha2", "val_bpb", 2.0)
    promoted, why = tracking.promotion_gate(c, "m", v2, "val_bpb", 2.0)  # a tie does not promote
    assert not promoted and why == "kept champion: val_bpb 2.0000 >= champion v1's 2.0000"
    v3, _ = tracking.register_version(c, "m", _logged(c, run_id), run_id, "sha3", "val_bpb", 1.5)
    assert tracking.promotion_gate(c, "m", v3, "val_bpb", 1.5)[0]
    assert str(c.get_model_version_by_alias("m", "champion").version) == v3
    assert str(c.get_model_version_by_alias("m", "candidate").version) == v3
    assert c.get_model_version("m", v2).tags["promotion"].startswith("kept champion")
    assert math.isclose(float(c.get_model_version("m", v3).tags["val_bpb"]), 1.5)


def _register_seeds(c, name, recipe, values, run_id):
    """One registered version per seed of `recipe`, each gated with gate_seeds=3; the last decision."""
    out = None
    for v in values:
        ver, _ = tracking.register_version(c, name, _logged(c, run_id), run_id, f"{recipe}-{v}", "val_bpb", v, recipe=recipe)
        out = tracking.promotion_gate(c, name, ver, "val_bpb", v, seeds=3, p=0.05, recipe=recipe)
    return out


def test_statistical_gate_refuses_noise_and_accepts_a_clear_win(c):
    """gate_seeds=3: a recipe moves the champion only if its mean is lower at Welch p < gate_p."""
    run_id = tracking.start_run(c, tracking.experiment_id(c, "stat-gate"), "r")
    promoted, why = _register_seeds(c, "s", "base", [1.80], run_id)
    assert not promoted and "1 of the 3 seeds" in why  # too few seeds: not even a first champion
    promoted, why = _register_seeds(c, "s", "base", [1.82, 1.78], run_id)
    assert promoted and "first champion" in why and "over 3 seeds" in why
    champion = str(c.get_model_version_by_alias("s", "champion").version)

    # better mean (1.79 < 1.80) but within the seed noise (std 0.02): refused, and the reason says why
    promoted, why = _register_seeds(c, "s", "noisy", [1.77, 1.81, 1.79], run_id)
    assert not promoted and why.startswith("kept champion") and "Welch p=" in why and ">= 0.05" in why
    assert str(c.get_model_version_by_alias("s", "champion").version) == champion
    # clearly better (1.70 ± 0.005): accepted
    promoted, why = _register_seeds(c, "s", "clear", [1.700, 1.705, 1.695], run_id)
    assert promoted and why.startswith("promoted") and "< 0.05" in why
    winner = str(c.get_model_version_by_alias("s", "champion").version)
    assert winner != champion and c.get_model_version("s", winner).tags["promotion"] == why


def test_welch_p_matches_the_formula():
    """Welch's t and Welch–Satterthwaite df written out, the tail from the t distribution's CDF."""
    from scipy.stats import t as student_t

    from gptcore.evaluation.stats import mean_std, welch_p

    a, b = [1.77, 1.81, 1.79, 1.80], [1.80, 1.83, 1.78]
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa ** 2 / len(a), sb ** 2 / len(b)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    assert welch_p(a, b) == pytest.approx(2 * student_t.sf(abs(t), df))
    assert welch_p(a, b, "less") == pytest.approx(student_t.cdf(t, df))
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert math.isnan(welch_p([1.0], [2.0, 3.0]))


def test_log_params_accepts_more_than_one_batch(c):
    run_id = tracking.start_run(c, tracking.experiment_id(c, "p"), "r")
    params = {f"k{i}": i for i in range(250)}
    tracking.log_params(c, run_id, params)
    assert c.get_run(run_id).data.params == {k: str(v) for k, v in params.items()}


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_sqlite_store_keeps_artifacts_beside_the_database(c, tmp_path):
    """Artifacts go to mlruns/ next to the .db file, never into whatever folder the process runs in."""
    from pathlib import Path

    exp = c.get_experiment(tracking.experiment_id(c, "where-artifacts-go"))
    db = Path(c.tracking_uri[len("sqlite:///"):])
    assert exp.artifact_location == (db.parent / "mlruns" / "where-artifacts-go").as_uri()
    run_id = tracking.start_run(c, exp.experiment_id, "r")
    f = tmp_path / "note.txt"
    f.write_text("hello")
    c.log_artifact(run_id, str(f))
    assert (db.parent / "mlruns" / "where-artifacts-go" / run_id / "artifacts" / "note.txt").read_text() == "hello"

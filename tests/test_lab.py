"""Tests of jaxnorm.lab and the ``jaxnorm lab`` command (quick mode, one shared run)."""

import dataclasses
import html
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

import jaxnorm
from jaxnorm import lab
from jaxnorm.lab import _util, cli, report

# One quick run serves the whole module: with `pytest -n ... --dist loadgroup` the module's tests
# stay on one worker (with plain --dist load each worker runs its own quick run).
pytestmark = pytest.mark.xdist_group("lab")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The documented fields of each experiment's result (the contract of its NamedTuple).
FIELDS = {
    "activations": (
        lab.ActivationCurves,
        "x names values derivatives properties measured agreement max_sigmoid_derivative",
    ),
    "convergence": (
        lab.Convergence,
        "activations init epoch_accuracy target epochs_to_target seconds_per_epoch "
        "seconds_to_target epoch_ratio_to_tanh time_ratio_to_tanh widths learning_rate "
        "batch_size epochs num_seeds depths depth_epoch_accuracy depth_epochs_to_target "
        "depth_width depth_epochs depth_seeds",
    ),
    "init": (
        lab.InitStatistics,
        "labels activation init layer_mean layer_std saturated_fraction dead_fraction "
        "hist_counts hist_edges std_ratio num_layers width num_examples",
    ),
    "preprocessing": (
        lab.PreprocessingViews,
        "stages points mean cov var_population digit_images digit_zca digit_pca "
        "digit_offdiag_corr "
        "digit_distance zca_eps notes",
    ),
    "batchnorm": (
        lab.BatchNormGrid,
        "learning_rates init_stds accuracy diverged threshold max_good_lr init_spread num_good "
        "widths num_steps batch_size",
    ),
    "gradcheck": (
        lab.GradientCheck,
        "passed leaves report control_passed control_failed_leaves",
    ),
    "babysitting": (
        lab.Babysitting,
        "initial_loss expected_loss initial_loss_ok loss_with_regularisation overfit_passed "
        "overfit_steps overfit_loss overfit_accuracy learning_rates update_ratio median_ratio "
        "final_loss best_lr best_median_ratio diverged trains ratio_band",
    ),
    "search": (
        lab.Search,
        "learning_rate weight_decay val_accuracy round diverged spaces best round_median "
        "round_best at_border notes num_steps",
    ),
    "regularization": (
        lab.Regularization,
        "num_train l2_strengths l2_train l2_val dropout_rates dropout_train dropout_val "
        "max_norms max_norm_train max_norm_val learning_rate high_learning_rates "
        "chosen_max_norm high_lr_val high_lr_diverged gap best best_val widths num_steps "
        "batch_size num_seeds",
    ),
    "updates": (
        lab.Updates,
        "methods digits_learning_rates loss final_loss val_accuracy surface_learning_rate "
        "ravine_path ravine_final saddle_path saddle_escape schedules schedule_loss "
        "schedule_final schedule_val_accuracy widths num_steps surface_steps batch_size "
        "num_seeds",
    ),
    "ensembles": (
        lab.Ensembles,
        "member_accuracy member_loss ensemble_accuracy ensemble_loss ensemble_gain "
        "lecture_gain polyak_accuracy polyak_loss polyak_stale_accuracy polyak_stale_loss "
        "ema_decay train_loss num_members num_steps learning_rate",
    ),
}
STATUSES = {"agrees", "partly agrees", "disagrees", "inconclusive"}


def _reject_constant(name):
    raise ValueError(f"results.json contains the non-JSON constant {name}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One in-process ``jaxnorm lab --quick`` run shared by the tests; records the outcomes."""
    out = tmp_path_factory.mktemp("lab") / "report"
    outcomes = {}
    original = lab.run_experiment

    def recording(*args, **kwargs):
        outcome = original(*args, **kwargs)
        outcomes[outcome.name] = outcome
        return outcome

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lab, "run_experiment", recording)
        rc = cli.main(["lab", "--quick", "--quiet", "--out", str(out)])
    return types.SimpleNamespace(out=out, rc=rc, outcomes=outcomes)


def test_quick_run_succeeds(quick_run):
    errors = {n: o.error for n, o in quick_run.outcomes.items() if o.error}
    assert not errors, errors
    assert quick_run.rc == 0
    assert list(quick_run.outcomes) == list(lab.EXPERIMENTS)


def test_index_html_is_self_contained(quick_run):
    page = (quick_run.out / "index.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("data:image/png;base64,") == len(lab.EXPERIMENTS)
    # Nothing loaded or linked from outside: no http(s) or protocol-relative src/href.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page.lower()
    for name in lab.EXPERIMENTS:
        assert f'id="{name}"' in page
    assert not list(quick_run.out.glob("*.tmp")) and not list(quick_run.out.glob(".*.tmp"))


def test_results_json_has_every_experiment(quick_run):
    text = (quick_run.out / "results.json").read_text(encoding="utf-8")
    data = json.loads(text, parse_constant=_reject_constant)
    assert data["quick"] is True and data["seed"] == 0
    assert list(data["experiments"]) == list(lab.EXPERIMENTS)
    for name, entry in data["experiments"].items():
        assert entry["status"] == "ok", (name, entry["error"])
        assert entry["verdict"]["status"] in STATUSES
        assert entry["verdict"]["checks"], name
        assert entry["table"]["columns"] and entry["table"]["rows"], name
        assert set(FIELDS[name][1].split()) == set(entry["result"]), name


def test_page_numbers_are_in_results_json(quick_run):
    page = (quick_run.out / "index.html").read_text(encoding="utf-8")
    data = json.loads((quick_run.out / "results.json").read_text(encoding="utf-8"))
    for name, entry in data["experiments"].items():
        assert html.escape(entry["verdict"]["text"]) in page, name
        for row in entry["table"]["rows"]:
            for cell in row:
                assert html.escape(cell) in page, (name, cell)


@pytest.mark.parametrize("name", list(FIELDS))
def test_experiment_returns_documented_fields(quick_run, name):
    cls, fields = FIELDS[name]
    result = quick_run.outcomes[name].result
    assert isinstance(result, cls)
    assert result._fields == tuple(fields.split())
    for field in result._fields:  # every field is documented in the class docstring
        assert re.search(rf"\b{field}\b", cls.__doc__), (name, field)
    for value in result:  # host data only, no device arrays
        assert not type(value).__module__.startswith("jax"), (name, type(value))
    assert lab.EXPERIMENTS[name].verdict(result).status in STATUSES


def test_experiment_values(quick_run):
    r = {n: o.result for n, o in quick_run.outcomes.items()}
    a = r["activations"]
    assert a.values.shape == a.derivatives.shape == (len(a.names), a.x.shape[0])
    # The derivative curves are jax.grad's: compare with a centred difference of the values.
    numeric = np.gradient(a.values, a.x, axis=1)
    i = a.names.index("tanh")
    np.testing.assert_allclose(a.derivatives[i, 1:-1], numeric[i, 1:-1], atol=2e-3)
    init = r["init"]
    assert init.layer_std.shape == (5, 10) and init.hist_counts.shape[:2] == (5, 10)
    np.testing.assert_array_equal(init.hist_counts.sum(-1), init.num_examples * init.width)
    p = r["preprocessing"]
    assert p.points.shape[0] == len(p.stages) == 6
    np.testing.assert_allclose(p.cov[-1], np.eye(2), atol=1e-3)  # ZCA: identity covariance
    assert r["gradcheck"].passed
    bn = r["batchnorm"]
    assert bn.accuracy.shape == (2, len(bn.learning_rates), len(bn.init_stds))
    b = r["babysitting"]
    assert abs(b.initial_loss - np.log(10)) < 0.1 * np.log(10)
    s = r["search"]
    assert s.learning_rate.shape == s.weight_decay.shape == s.val_accuracy.shape
    e = r["ensembles"]
    assert e.member_accuracy.shape == e.polyak_accuracy.shape == (e.num_members,)


def test_only_in_a_subprocess(tmp_path):
    out = tmp_path / "only"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxnorm",
            "lab",
            "--quick",
            "--only",
            "activations",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr
    assert "[1/1] activations" in proc.stderr and "agrees" in proc.stderr
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(data["experiments"]) == ["activations"]
    assert "data:image/png;base64," in (out / "index.html").read_text(encoding="utf-8")


def test_importing_the_lab_does_not_import_pyplot():
    code = (
        "import sys, jaxnorm, jaxnorm.lab; "
        "print('matplotlib' in sys.modules, 'matplotlib.pyplot' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_plots_return_figures_without_pyplot(quick_run):
    from matplotlib.figure import Figure

    had_pyplot = "matplotlib.pyplot" in sys.modules
    for name, outcome in quick_run.outcomes.items():
        fig = lab.EXPERIMENTS[name].plot(outcome.result)
        assert isinstance(fig, Figure), name
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_unknown_only_lists_known_names(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        cli.main(["lab", "--only", "activations", "nonsense", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nonsense" in err
    for name in lab.EXPERIMENTS:
        assert name in err
    assert not out.exists()  # nothing done before the error


def test_unwritable_out_fails_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def forbidden(*args, **kwargs):
        raise AssertionError("an experiment ran before --out was checked")

    monkeypatch.setattr(lab, "run_experiment", forbidden)
    with pytest.raises(SystemExit) as exc:
        cli.main(["lab", "--quick", "--out", str(blocker / "report")])
    assert exc.value.code == 2
    assert "cannot write the report" in capsys.readouterr().err


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_failed_rendering_leaves_no_index_html(quick_run, tmp_path, monkeypatch, exc_type):
    out = tmp_path / "report"
    out.mkdir()
    (out / "index.html").write_text("previous report")
    monkeypatch.setattr(lab, "run_experiment", lambda name, *a, **k: quick_run.outcomes[name])
    calls = []
    original = report._render_section

    def failing(outcome, plot):
        calls.append(outcome.name)
        if len(calls) == 2:  # the page is half written
            raise exc_type("simulated failure while rendering")
        return original(outcome, plot)

    monkeypatch.setattr(report, "_render_section", failing)
    args = ["lab", "--quick", "--quiet", "--only", "activations", "gradcheck", "--out", str(out)]
    if exc_type is KeyboardInterrupt:
        assert cli.main(args) == 1
    else:
        with pytest.raises(RuntimeError, match="simulated"):
            cli.main(args)
    assert (out / "index.html").read_text() == "previous report"
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "results.json"]


def test_verdicts_follow_the_numbers(quick_run):
    """A result changed to contradict the lecture gets a verdict (and a page) that says so."""
    init = quick_run.outcomes["init"].result
    he_collapses = init._replace(std_ratio=np.asarray([1e-6, 1.0, 0.4, 0.04, 1e-3]))
    v = lab.EXPERIMENTS["init"].verdict(he_collapses)
    assert v.status == "partly agrees"
    assert v.checks["relu + He keeps the scale (within 2x)"] is False

    ens = quick_run.outcomes["ensembles"].result
    worse = ens._replace(
        ensemble_accuracy=0.0,
        ensemble_loss=1e3,
        polyak_accuracy=ens.member_accuracy - 0.1,
        polyak_loss=ens.member_loss + 1.0,
    )
    v = lab.EXPERIMENTS["ensembles"].verdict(worse)
    assert v.status == "disagrees"
    outcome = quick_run.outcomes["ensembles"]._replace(result=worse, verdict=v)
    section = report._render_section(outcome, None)
    assert "Disagrees with the lecture" in section


def test_json_safe_conversion():
    @dataclasses.dataclass
    class D:
        a: float

    data = _util.to_jsonable(
        {
            "x": np.asarray([1.0, np.nan, np.inf]),
            "y": float("nan"),
            "d": D(np.float32(2.0)),
            1: (np.int64(3), np.bool_(True)),
        }
    )
    assert data == {"x": [1.0, None, None], "y": None, "d": {"a": 2.0}, "1": [3, True]}
    json.dumps(data, allow_nan=False)


def test_experiment_key_is_independent_of_selection():
    import jax

    a = jax.random.key_data(lab.experiment_key(3, "init"))
    b = jax.random.key_data(lab.experiment_key(3, "init"))
    c = jax.random.key_data(lab.experiment_key(3, "search"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="known"):
        lab.run_experiment("nonsense")


# ---------------------------------------------------------------------------------------------
# Verdict rules, labels and formatting (the audit's findings)


def test_verdict_from_checks_never_counts_a_skipped_check_as_a_pass():
    def status(*values):
        checks = {f"check {i}": v for i, v in enumerate(values)}
        return _util.verdict_from_checks("claim", checks, "text").status

    assert status(True, True) == "agrees"
    assert status(True, None) == "partly agrees"  # the quick gradcheck's case
    assert status(True, False) == "partly agrees"
    assert status(True, False, None) == "partly agrees"
    assert status(False, None) == "disagrees"
    assert status(False, False) == "disagrees"
    assert status(None, None) == "inconclusive"
    assert status() == "inconclusive"
    v = _util.verdict_from_checks("c", {"a": np.bool_(True), "b": None}, "t")
    assert v.checks == {"a": True, "b": None} and type(v.checks["a"]) is bool


def test_quick_gradcheck_is_partly_checked_and_the_page_says_so(quick_run):
    outcome = quick_run.outcomes["gradcheck"]
    assert outcome.result.control_passed is None  # the control is skipped in quick mode
    assert outcome.verdict.status == "partly agrees"
    section = report._render_section(outcome, None)
    assert (
        "Partly agrees with the lecture: some checks could not be made (marked ? below)." in section
    )
    assert "some checks fail" not in section
    assert "(not checked)</li>" in section
    page = (quick_run.out / "index.html").read_text(encoding="utf-8")
    assert "some checks could not be made" in page


def test_report_lead_names_failures_and_gaps():
    v = _util.verdict_from_checks("claim", {"a": True, "b": False, "c": None}, "text")
    lead = report._verdict_html(v)
    assert (
        "some checks fail (marked ✗ below); some checks could not be made (marked ? below)" in lead
    )
    assert (
        "<li>✓ a</li>" in lead and "<li>✗ b</li>" in lead and "<li>? c (not checked)</li>" in lead
    )


def test_fmt_number():
    f = _util.fmt_number
    assert f(3306257754291601991293468672.0) == "3.31e+27"
    assert f(2.302585) == "2.3026" and f(0.1474) == "0.1474" and f(-12.5) == "-12.5000"
    assert f(2e-5) == "2e-05" and f(1e5) == "1e+05" and f(0.0) == "0"
    assert f(float("nan")) == "nan" and f(float("inf")) == "inf" and f(float("-inf")) == "-inf"


def test_batchnorm_text_when_no_learning_rate_reaches_the_threshold(quick_run):
    r = quick_run.outcomes["batchnorm"].result
    v = lab.EXPERIMENTS["batchnorm"].verdict(r._replace(max_good_lr=(None, 3.0)))
    assert "None" not in v.text
    assert "without BN none (no learning rate reaches it), with BN 3;" in v.text
    v = lab.EXPERIMENTS["batchnorm"].verdict(r._replace(max_good_lr=(0.1, None)))
    assert "without BN 0.1, with BN none (no learning rate reaches it);" in v.text


def test_activation_ranges_have_the_right_brackets(quick_run):
    # Independent reference: which ends of each range the function reaches (a closed bracket)
    # and which it only approaches (open), from the functions' definitions.
    expected = {
        "sigmoid": "(0, 1)",
        "tanh": "(-1, 1)",
        "relu": "[0, ∞)",  # relu(x) = 0 for every x <= 0
        "leaky_relu": "(-∞, ∞)",
        "elu": "(-1, ∞)",  # -1 only as x -> -inf
        "selu": "(-1.76, ∞)",
        "gelu": "[-0.17, ∞)",  # its minimum, at x = -0.75
        "silu": "[-0.278, ∞)",  # its minimum, at x = -1.28
        "softplus": "(0, ∞)",
    }
    columns, rows = lab.EXPERIMENTS["activations"].table(quick_run.outcomes["activations"].result)
    assert columns[1].startswith("range")
    got = {row[0]: row[1] for row in rows}
    assert {k: got[k] for k in expected} == expected


def _text_everywhere(outcome):
    columns, rows = outcome.table
    v = outcome.verdict
    return [v.claim, v.text, *v.checks, *columns, *(c for row in rows for c in row)]


def test_xavier_always_says_which_initializer(quick_run):
    """The lecture's "Xavier" (1/sqrt(fan_in), lecun_normal) and Glorot's xavier_normal are told
    apart wherever the lab prints an initializer."""
    lecture = "1/sqrt(fan_in) (lecture's 'Xavier', = lecun_normal)"
    init = quick_run.outcomes["init"].result
    assert init.init == (
        "small_normal(0.01)",
        "small_normal(1.0)",
        lecture,
        lecture,
        "He (he_normal)",
    )
    assert init.labels[2] == f"tanh, {lecture}" and init.labels[3] == f"relu, {lecture}"
    conv = quick_run.outcomes["convergence"]
    assert conv.result.init == ("he_normal", "xavier_normal", "xavier_normal")
    assert [row[1] for row in conv.table[1][:3]] == [
        "He (he_normal)",
        "Glorot (xavier_normal)",
        "Glorot (xavier_normal)",
    ]
    for name in ("init", "convergence"):
        for text in _text_everywhere(quick_run.outcomes[name]):
            rest = text.replace("lecture's 'Xavier'", "").replace("Glorot (xavier_normal)", "")
            assert "xavier" not in rest.lower(), (name, text)


def test_convergence_timing_excludes_the_first_call(quick_run, monkeypatch):
    """Every compiled program is called once untimed before the timed runs."""
    from jaxnorm.lab import training_experiments as te

    timed, calls = [], []
    original = te.compile_all

    def counting(lowered):
        def wrap(compiled):
            def call(*args):
                calls.append(len(timed))
                return compiled(*args)

            return call

        return [wrap(c) for c in original(lowered)]

    class Clock:
        def __init__(self):
            timed.append(len(calls))

        def __call__(self):
            return 1.0

    monkeypatch.setattr(te, "compile_all", counting)
    monkeypatch.setattr(te, "Stopwatch", Clock)
    # The depth sweep reports epochs only (no timing): left out here.
    sweep = {
        "depths": (4,),
        "depth_epoch_accuracy": np.zeros((2, 1, 1, 3)),
        "depth_epochs_to_target": ((None,), (None,)),
        "depth_width": 16,
        "depth_epochs": 3,
        "depth_seeds": 1,
    }
    monkeypatch.setattr(te, "_depth_sweep", lambda *args: sweep)
    te.relu_convergence(0, quick=True)
    # Per activation: an untimed call (no clock started since the previous program's), then
    # one clock started right before each timed call.
    assert calls == [0, 1, 1, 2, 2, 3]
    assert timed == [1, 3, 5]


def test_python_api_reproduces_the_command_line(quick_run):
    from jaxnorm.lab import report as report_module

    cli_result = quick_run.outcomes["init"].result
    again = lab.init_statistics(lab.experiment_key(0, "init"), quick=True)
    np.testing.assert_array_equal(again.layer_std, cli_result.layer_std)
    plain = lab.init_statistics(0, quick=True)  # key(0) itself: other numbers
    assert not np.array_equal(plain.layer_std, cli_result.layer_std)
    for name in ("write_html", "write_json", "results_dict", "atomic_writer"):
        assert callable(getattr(report_module, name))


def _overlaps(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_init_figure_text_does_not_overlap(quick_run):
    fig = lab.plots.plot_init_statistics(quick_run.outcomes["init"].result)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    top, hists = axes[:2], axes[2:]
    boxes = [ax.xaxis.label.get_window_extent(renderer) for ax in top]
    boxes += [t.get_window_extent(renderer) for ax in top for t in ax.get_xticklabels()]
    titles = [ax.title.get_window_extent(renderer) for ax in hists if ax.get_title()]
    assert len(titles) == 10  # "layer 1" .. "layer 10" over the first row of histograms
    for title in titles:
        assert not any(_overlaps(title, box) for box in boxes)
    # Tick labels of neighbouring histograms in a row do not run into each other.
    num_layers = quick_run.outcomes["init"].result.num_layers
    for i in range(len(hists) - 1):
        if (i + 1) % num_layers == 0:  # the next panel starts a new row
            continue
        a = hists[i].get_xticklabels()[-1].get_window_extent(renderer)
        b = hists[i + 1].get_xticklabels()[0].get_window_extent(renderer)
        assert a.x1 <= b.x0, (i, a, b)


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"jaxnorm {jaxnorm.__version__} (jax ")


# ---------------------------------------------------------------------------------------------
# Issue 18: the new experiments, ties, displayed numbers, figures


def test_experiments_in_the_lectures_order():
    assert list(lab.EXPERIMENTS) == [
        "activations",
        "convergence",
        "init",
        "preprocessing",
        "batchnorm",
        "regularization",  # set-up: ... weight initialization, regularization, gradient checking
        "gradcheck",
        "babysitting",
        "updates",  # dynamics: babysitting, parameter updates, hyperparameter optimization
        "search",
        "ensembles",
    ]


def test_new_experiments_in_results_json(quick_run):
    data = json.loads((quick_run.out / "results.json").read_text(encoding="utf-8"))
    for name in ("regularization", "updates"):
        entry = data["experiments"][name]
        assert entry["status"] == "ok", entry["error"]
        assert entry["verdict"]["checks"]
    reg = data["experiments"]["regularization"]["verdict"]
    assert "0.002" in reg["text"]  # the tie threshold is stated
    upd = data["experiments"]["updates"]["verdict"]
    assert "within 1% of each other are ties" in upd["text"]
    methods = quick_run.outcomes["updates"].result.methods
    assert methods == ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")


def test_a_tie_is_not_support():
    b = _util.beats
    assert b(0.989, 0.989) == _util.TIE and b(0.99, 0.98) is True and b(0.98, 0.99) is False
    assert b(1.0, 1.005, tol=0.01) == _util.TIE and b(None, 1.0) is None
    assert b(0.1, 0.2, higher_is_better=False) is True

    def status(*values):
        checks = {f"check {i}": v for i, v in enumerate(values)}
        return _util.verdict_from_checks("claim", checks, "text").status

    assert status(True, _util.TIE) == "partly agrees"
    assert status(_util.TIE, _util.TIE) == "disagrees"
    assert status(_util.TIE, None) == "disagrees"
    v = _util.verdict_from_checks("c", {"a": True, "b": _util.TIE}, "t")
    html_text = report._verdict_html(v)
    assert "<li>= b (tie: not support)</li>" in html_text and "ties" in html_text


def _fake(cls, **fields):
    """A result NamedTuple with the given fields (the rest None): verdict rules need no run."""
    return cls(**{f: fields.get(f) for f in cls._fields})


def test_search_and_ensembles_call_equal_numbers_a_tie():
    s = _fake(
        lab.Search,
        round_median=np.asarray([0.9, 0.95, 0.97]),
        round_best=np.asarray([0.989, 0.99, 0.989]),
        best={"learning_rate": 0.05, "weight_decay": 1e-4, "val_accuracy": 0.99},
        at_border={},
    )
    v = lab.EXPERIMENTS["search"].verdict(s)
    assert v.checks["the last round's best beats the coarse round's best"] == "tie"
    assert v.status == "partly agrees" and "ties the coarse round's" in v.text
    acc = np.asarray([0.95, 0.96, 0.97])
    e = _fake(
        lab.Ensembles,
        member_accuracy=acc,
        member_loss=np.asarray([0.2, 0.2, 0.2]),
        ensemble_accuracy=0.98,
        ensemble_loss=0.1,
        ensemble_gain=2.0,
        lecture_gain=2.0,
        polyak_accuracy=acc.copy(),  # equal for every member: a tie, not "at least as good"
        polyak_loss=np.asarray([0.19, 0.19, 0.19]),
        polyak_stale_accuracy=acc.copy(),
        polyak_stale_loss=np.asarray([0.3, 0.3, 0.3]),
        num_members=3,
        ema_decay=0.99,
    )
    v = lab.EXPERIMENTS["ensembles"].verdict(e)
    assert v.checks["Polyak-averaged parameters are more accurate than the final ones"] == "tie"
    assert v.status == "partly agrees" and "a tie, not support" in v.text
    assert "+2.00 points against the lecture's ~2, 0.00 points" in v.text


def test_ensembles_measure_the_lectures_two_percent(quick_run):
    e = quick_run.outcomes["ensembles"].result
    np.testing.assert_allclose(
        e.ensemble_gain, 100 * (e.ensemble_accuracy - np.mean(e.member_accuracy)), rtol=1e-6
    )
    assert e.lecture_gain == 2.0
    text = quick_run.outcomes["ensembles"].verdict.text
    assert f"{e.ensemble_gain:+.2f} points against the lecture's ~2" in text
    assert f"{abs(2.0 - e.ensemble_gain):.2f} points" in text
    rows = quick_run.outcomes["ensembles"].table[1]
    assert rows[-1][0] == "ensemble gain (points)"
    # update_batch_stats gave the averaged parameters their own statistics (a BN model).
    assert e.polyak_stale_accuracy.shape == e.polyak_accuracy.shape


def test_shown_accuracies_agree_with_the_threshold_counts():
    assert _util.fmt_floor(0.8996) == "0.899" and _util.fmt_floor(0.9) == "0.900"
    assert _util.fmt_floor(0.8996, 2) == "0.89" and _util.fmt_floor(float("nan")) == "nan"
    lrs, stds = np.asarray([1e-2, 1e-1, 1.0]), np.asarray([1e-2, 1.0])
    acc = np.full((2, 3, 2), 0.5)
    acc[0, 0, 0] = 0.8996  # below 90%: must not read 0.90 / 0.900
    acc[1, 0, 0] = 0.9
    div = np.zeros((2, 3, 2), bool)
    div[0, -1, -1] = True
    acc[0, -1, -1] = np.nan
    r = _fake(lab.BatchNormGrid, learning_rates=lrs, init_stds=stds, accuracy=acc, diverged=div)
    _, rows = lab.EXPERIMENTS["batchnorm"].table(r)
    assert rows[0][1] == "0.899" and rows[0][3] == "0.900"
    assert rows[-1][2] == "diverged"
    fig = lab.plots.plot_batchnorm_grid(r)
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert "0.89" in texts and "0.90" in texts and "diverged" in texts and "NaN" not in texts


def _babysitting(**kw):
    base = dict(
        initial_loss=2.303,
        expected_loss=float(np.log(10)),
        initial_loss_ok=True,
        loss_with_regularisation=190.0,
        overfit_passed=True,
        overfit_steps=11,
        ratio_band=(1e-4, 1e-2),
    )
    return _fake(lab.Babysitting, **{**base, **kw})


def test_babysitting_ratio_check_separates_training_rates():
    # The default run's numbers: lr 1e-3 has a ratio of 1.3e-3 but does not train.
    r = _babysitting(
        learning_rates=np.asarray([1e-4, 1e-3, 1e-2, 1e-1, 1.0]),
        median_ratio=np.asarray([9.8e-5, 1.26e-3, 3.7e-3, 1.3e-3, 0.18]),
        final_loss=np.asarray([2.30, 2.23, 0.133, 0.070, 2.34e28]),
        best_lr=0.1,
        best_median_ratio=1.3e-3,
    )
    v = lab.EXPERIMENTS["babysitting"].verdict(r)
    name = next(k for k in v.checks if k.startswith("the ratio separates"))
    assert v.checks[name] is False
    assert "misclassifies learning rate(s) 0.001" in v.text and "diverged: 1;" in v.text
    columns, rows = lab.EXPERIMENTS["babysitting"].table(r)
    assert rows[-1][columns.index("validation loss")] == "diverged"  # 2.34e+28
    assert [row[columns.index("trains")] for row in rows] == ["no", "no", "yes", "yes", "diverged"]
    good = r._replace(median_ratio=np.asarray([1e-5, 5e-5, 3.7e-3, 1.3e-3, 0.18]))
    assert lab.EXPERIMENTS["babysitting"].verdict(good).checks[name] is True


def test_babysitting_table_calls_huge_losses_diverged():
    r = _babysitting(
        learning_rates=np.asarray([1e-2, 1e-1, 1.0]),
        median_ratio=np.asarray([1e-3, 1e-2, 0.5]),
        final_loss=np.asarray([0.1474, 3306257754291601991293468672.0, np.nan]),
        best_lr=None,
        best_median_ratio=None,
    )
    columns, rows = lab.EXPERIMENTS["babysitting"].table(r)
    assert [row[columns.index("validation loss")] for row in rows] == [
        "0.1474",
        "diverged",
        "diverged",
    ]
    text = lab.EXPERIMENTS["babysitting"].verdict(r).text
    assert "None" not in text and "no best learning rate (every run diverged)" in text


def _regularization(**kw):
    seeds = 2
    ones = np.ones((1, seeds))
    base = dict(
        num_train=150,
        l2_strengths=np.asarray([0.0, 1e-3, 1e-2]),
        l2_train=np.ones((3, seeds)),
        l2_val=np.asarray([[0.90], [0.91], [0.93]]) * ones,
        dropout_rates=np.asarray([0.0, 0.5]),
        dropout_train=np.ones((2, seeds)),
        dropout_val=np.asarray([[0.90], [0.92]]) * ones,
        max_norms=np.asarray([3.0, 1.0]),
        max_norm_train=np.ones((2, seeds)),
        max_norm_val=np.asarray([[0.90], [0.925]]) * ones,
        learning_rate=0.05,
        high_learning_rates=np.asarray([3.0, 30.0]),
        chosen_max_norm=1.0,
        high_lr_val=np.asarray([[[0.45] * seeds, [0.1] * seeds], [[0.92] * seeds, [0.1] * seeds]]),
        high_lr_diverged=np.zeros((2, 2, seeds), bool),
        gap={"none": 0.10, "l2": 0.07, "dropout": 0.08, "max_norm": 0.075},
        best={"l2": 1e-2, "dropout": 0.5, "max_norm": 1.0},
        best_val={"none": 0.90, "l2": 0.93, "dropout": 0.92, "max_norm": 0.925},
        num_seeds=seeds,
    )
    return _fake(lab.Regularization, **{**base, **kw})


def test_regularization_verdict_rules():
    verdict = lab.EXPERIMENTS["regularization"].verdict
    r = _regularization()
    v = verdict(r)
    assert v.status == "agrees" and len(v.checks) == 7
    check = next(k for k in v.checks if k.startswith("max-norm (c"))
    # Equal numbers (within 0.002) are ties, never support.
    same = r._replace(
        best_val={k: 0.90 + 0.001 * (k != "none") for k in r.best_val},
        gap={k: 0.10 for k in r.gap},
    )
    v = verdict(same)
    assert sum(c == "tie" for c in v.checks.values()) == 6 and v.status == "partly agrees"
    # No learning rate too high for the plain net: nothing to show, not a pass.
    fine = r._replace(high_lr_val=np.full_like(r.high_lr_val, 0.9))
    assert verdict(fine).checks[check] is None
    # Max-norm failing too where the plain net fails: the check fails.
    both = r._replace(high_lr_val=np.full_like(r.high_lr_val, 0.1))
    assert verdict(both).checks[check] is False
    hv = r.high_lr_val.copy()
    hv[0, 0] = np.nan
    div = np.isnan(hv)
    _, rows = lab.EXPERIMENTS["regularization"].table(
        r._replace(high_lr_val=hv, high_lr_diverged=div)
    )
    assert rows[-2][3] == "diverged / 0.920"


def _updates(**kw):
    methods = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
    base = dict(
        methods=methods,
        digits_learning_rates=(1e-2, 1e-2, 1e-2, 1e-2, 1e-3, 1e-3),
        final_loss=np.asarray([0.6, 0.07, 0.07, 0.14, 0.09, 0.19]),
        val_accuracy=np.asarray([[0.83], [0.97], [0.97], [0.95], [0.97], [0.96]]),
        surface_learning_rate=0.1,
        ravine_final=np.asarray([0.4, 1e-5, 1e-6, 0.3, 1e-5, 0.04]),
        saddle_escape=(67, 25, 22, 7, 1, 6),
        schedules=("constant", "1/t"),
        schedule_final=np.asarray([0.002, 0.006]),
        num_steps=300,
        surface_steps=100,
        num_seeds=1,
    )
    return _fake(lab.Updates, **{**base, **kw})


def test_updates_verdict_rules():
    verdict = lab.EXPERIMENTS["updates"].verdict
    assert verdict(_updates()).status == "agrees"
    momentum = "momentum and Nesterov reach a lower training loss than SGD on the digits"
    # Within 1% of SGD's loss: a tie, not support.
    v = verdict(_updates(final_loss=np.asarray([0.6, 0.597, 0.5, 0.1, 0.1, 0.1])))
    assert v.checks[momentum] == "tie" and v.status == "partly agrees"
    never = verdict(_updates(saddle_escape=(None,) * 6))
    assert never.checks["every other method escapes the saddle sooner than SGD"] == "tie"
    late = verdict(_updates(saddle_escape=(5, 25, 22, 7, 1, 6)))
    assert late.checks["every other method escapes the saddle sooner than SGD"] is False
    adam = next(k for k in v.checks if k.startswith("Adam"))
    assert verdict(_updates(val_accuracy=np.asarray([[0.8]] * 5 + [[0.7]]))).checks[adam] is False


def _convergence(**kw):
    base = dict(
        activations=("relu", "tanh", "sigmoid"),
        epochs_to_target=(3, 3, 23),
        epoch_ratio_to_tanh=(1.0, 1.0, 7.7),
        target=0.95,
        epochs=25,
        num_seeds=3,
        depths=(2, 5, 8),
        depth_epochs_to_target=((3, 3, 3), (3, 3, 3)),
        depth_width=64,
        depth_epochs=10,
        depth_seeds=2,
    )
    return _fake(lab.Convergence, **{**base, **kw})


def test_convergence_depth_sweep_rules():
    verdict = lab.EXPERIMENTS["convergence"].verdict
    deepest = (
        "without batch norm, ReLU reaches the target in fewer epochs than tanh at the deepest depth"
    )
    grows = "ReLU's advantage over tanh grows with depth (deepest > shallowest)"
    v = verdict(_convergence())
    assert v.checks[deepest] == "tie" and v.checks[grows] == "tie"
    v = verdict(_convergence(depth_epochs_to_target=((3, 3, 2), (3, 4, None))))
    assert v.checks[deepest] is True and v.checks[grows] is True
    assert "8 layers 2 / never" in v.text
    v = verdict(_convergence(depth_epochs_to_target=((3, 4, 5), (3, 3, 3))))
    assert v.checks[deepest] is False and v.checks[grows] is False
    quick = verdict(_convergence(depths=(), depth_epochs_to_target=((), ())))
    assert quick.checks[deepest] is None and "not run (quick mode)" in quick.text


def test_figures_are_readable_at_page_width(quick_run):
    from jaxnorm.lab import plots

    for name, outcome in quick_run.outcomes.items():
        fig = lab.EXPERIMENTS[name].plot(outcome.result)
        fig.canvas.draw()
        floor = plots.MIN_FONT_PT / min(1.0, plots.displayed_scale(fig))
        for ax in fig.axes:
            for label in ax.get_xticklabels() + ax.get_yticklabels():
                if label.get_text() and label.get_visible():
                    assert label.get_fontsize() >= floor - 1e-6, (name, label.get_text())
            # A panel with several labelled curves has a legend.
            labelled = [
                ln for ln in ax.get_lines() if ln.get_label() and not ln.get_label().startswith("_")
            ]
            if len(labelled) > 1 and ax.get_legend() is None:
                twins = [o for o in fig.axes if o is not ax and o.bbox.bounds == ax.bbox.bounds]
                assert any(o.get_legend() is not None for o in twins) or "colours" in (
                    ax.get_title()
                ), (name, ax.get_title())
    data = report.figure_png_base64(
        lab.plots.plot_gradient_check(quick_run.outcomes["gradcheck"].result)
    )
    import base64
    import struct

    png = base64.b64decode(data)
    width = struct.unpack(">I", png[16:20])[0]
    assert width == (7 * 150)  # 150 dpi


def test_hidden_curves_get_a_note():
    from jaxnorm.lab import plots

    fig = plots.new_figure(4, 3)
    ax = fig.subplots()
    x = np.linspace(0, 1, 50)
    a, b, c = x, x + 1e-4, 1 - x
    for y, lab_ in ((a, "a"), (b, "b"), (c, "c")):
        ax.plot(x, y, label=lab_)
    pairs = plots.note_hidden_curves(ax, [a, b, c], ["a", "b", "c"])
    assert pairs == [("b", "a")]
    assert any("b lies under a" in t.get_text() for t in ax.texts)


def test_preprocessing_shows_pca_whitened_digits(quick_run):
    p = quick_run.outcomes["preprocessing"].result
    assert p.digit_pca.shape == p.digit_zca.shape == p.digit_images.shape
    fig = lab.plots.plot_preprocessing_views(p)
    labels = {ax.get_ylabel() for ax in fig.axes}
    assert "PCA-\nwhitened" in labels and "ZCA-\nwhitened" in labels

"""One family of user errors, library messages in Python's words, and a new user's findings.

- no string literal of the library (every ``dask_em`` module but ``cli.py``) names a
  command-line option; messages name parameters as fields that the CLI renders with its
  option names, and the CLI has an option for every field;
- a bug raising a plain ``ValueError`` inside a real ``dask-em fit`` exits 1 with a
  traceback (only a `UserError` is bad input, exit 2);
- hyper-parameters, zero weight sums and ill-defined covariances raise one class each,
  with one wording;
- ``restart=True`` discards a checkpoint and fits under one holding of its lock;
- `load_model` restores no run settings (``checkpoint_dir``, ``verbose``, ...): a loaded
  model refits on new data without a checkpoint mismatch;
- ``dask-em info`` on a data array says it is data; every option has help text;
- array-API input (``array_api_dispatch=True``) fits like NumPy input;
- ``predict_proba`` keeps float32 input's dtype, as scikit-learn's; ``score_samples`` is
  float64.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from cli_helpers import LOCAL, assert_usage_error, dask_em_command, mixture, run_cli, write_array
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dask_em
from dask_em import checkpoint as checkpoint_module
from dask_em.checkpoint import LOCK, Checkpoint, CheckpointDamaged, CheckpointMismatch
from dask_em.cli import OPTION_NAMES, build_parser
from dask_em.errors import (
    PYTHON_WORDS,
    CheckpointError,
    DataError,
    IllDefinedCovarianceError,
    ParameterError,
    UserError,
)
from dask_em.params import GMMParams
from dask_em.stats import ZERO_WEIGHT_SUM

LIBRARY = Path(dask_em.__file__).parent


# ------------------------------------------------------------ messages in Python's words
def external_command_arguments(tree: ast.AST) -> set[int]:
    """Ids of the string constants that are single options in the literal argv of another
    program (a list or tuple whose first item names it, e.g. ``["sbatch", "--test-only"]``):
    options of that program, not of ``dask-em``, and no message."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.List | ast.Tuple) and node.elts:
            first = node.elts[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                if first.value and not first.value.startswith("-") and " " not in first.value:
                    ids.update(
                        id(e)
                        for e in node.elts[1:]
                        if isinstance(e, ast.Constant)
                        and isinstance(e.value, str)
                        and re.fullmatch(r"--?[a-z][a-z-]*(=\S*)?", e.value)
                    )
    return ids


def test_no_library_string_names_a_command_line_option() -> None:
    found = []
    for path in sorted(LIBRARY.glob("*.py")):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        argv = external_command_arguments(tree)
        for node in ast.walk(tree):
            if id(node) in argv:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", node.value):
                    found.append(f"{path.name}:{node.lineno}: {option}")
    assert found == []


def test_the_cli_names_an_option_for_every_message_field() -> None:
    assert set(OPTION_NAMES) == set(PYTHON_WORDS)
    assert all(option.startswith("--") for option in OPTION_NAMES.values())


def test_a_message_reads_in_python_words_and_renders_with_options(tmp_path: Path) -> None:
    X = mixture(300, 2, 2, seed=1)
    ckpt = tmp_path / "ckpt"
    dask_em.GaussianMixture(2, max_iter=2, random_state=0, checkpoint_dir=ckpt).fit(X)
    with pytest.raises(CheckpointMismatch) as raised:
        dask_em.GaussianMixture(3, max_iter=2, random_state=0, checkpoint_dir=ckpt).fit(X)
    err = raised.value
    assert isinstance(err, CheckpointError) and err.parameter == "checkpoint_dir"
    assert str(err).endswith("use another checkpoint_dir, or fit(..., restart=True) to discard it.")
    assert err.render(OPTION_NAMES).endswith(
        "use another --checkpoint-dir, or --restart to discard it."
    )


# ------------------------------------------------------------------ exit status of bugs
SHIM = '''
"""Injects a bug: the M-step raises a plain ValueError (not a dask-em UserError)."""
import dask_em.em


def m_step(*args, **kwargs):
    raise ValueError("injected bug in the M-step")


dask_em.em.m_step = m_step
'''


def test_a_plain_value_error_inside_a_fit_exits_1_with_a_traceback(tmp_path: Path) -> None:
    data = write_array(tmp_path / "data.zarr", mixture(500, 2, 2, seed=3), (100, 2))
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent(SHIM))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]),
    }
    model = tmp_path / "model.zarr"
    result = subprocess.run(
        [*dask_em_command(), "fit", str(data), "--n-components", "2", "--output", str(model)]
        + ["--quiet", *LOCAL],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: injected bug in the M-step" in result.stderr
    assert "internal error (a bug" in result.stderr.splitlines()[-1]
    assert not model.exists()


# ------------------------------------------------------------------ one class, one wording
def test_hyper_parameters_are_parameter_errors_naming_the_parameter() -> None:
    X = mixture(100, 2, 2, seed=0)
    cases = {
        "tol": {"tol": -1.0},
        "covariance_type": {"covariance_type": "bogus"},
        "init_params": {"init_params": "bogus"},
        "acceleration": {"acceleration": "bogus"},
        "chunk_rows": {"chunk_rows": 0},
        "split_every": {"split_every": 1},
    }
    for name, params in cases.items():
        with pytest.raises(ParameterError, match=rf"^Invalid value for '{name}': ") as raised:
            dask_em.GaussianMixture(2, **params).fit(X)
        assert raised.value.parameter == name


def test_a_zero_weight_sum_is_one_data_error_in_memory_and_lazy() -> None:
    X = mixture(200, 2, 2, seed=0)
    for weights in (np.zeros(200), da.zeros(200, chunks=50)):
        with pytest.raises(DataError) as raised:
            dask_em.GaussianMixture(2, random_state=0).fit(X, sample_weight=weights)
        assert str(raised.value) == ZERO_WEIGHT_SUM
        assert raised.value.parameter == "sample_weight"


def test_an_ill_defined_covariance_is_one_class_naming_reg_covar() -> None:
    with pytest.raises(IllDefinedCovarianceError, match="increase reg_covar") as raised:
        GMMParams.from_covariances(np.ones(1), np.zeros((1, 2)), np.zeros((1, 2, 2)), "full")
    assert raised.value.parameter == "reg_covar" and isinstance(raised.value, UserError)
    X = np.repeat(np.eye(2), 50, axis=0)  # two points, one component each: zero covariance
    with pytest.raises(IllDefinedCovarianceError):
        dask_em.GaussianMixture(2, reg_covar=0.0, means_init=np.eye(2)).fit(X)


# ------------------------------------------------------------------ restart
def test_restart_discards_and_fits_under_one_holding_of_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    X = mixture(300, 2, 2, seed=2)
    ckpt = tmp_path / "ckpt"
    dask_em.GaussianMixture(3, max_iter=2, random_state=0, checkpoint_dir=ckpt).fit(X)
    holdings = []
    key = ckpt.absolute()
    discard, save = checkpoint_module.discard, Checkpoint.save

    def recording_discard(directory: object) -> None:
        holdings.append(checkpoint_module._held[key])
        discard(directory)

    def recording_save(self: Checkpoint, *args: object) -> None:
        holdings.append(checkpoint_module._held[key])
        save(self, *args)

    monkeypatch.setattr(checkpoint_module, "discard", recording_discard)
    monkeypatch.setattr(Checkpoint, "save", recording_save)
    gm = dask_em.GaussianMixture(2, max_iter=3, tol=0.0, random_state=0, checkpoint_dir=ckpt)
    with pytest.warns(Warning):  # not converged
        gm.fit(X, restart=True)  # a 3-component checkpoint: a mismatch without restart
    assert len(holdings) >= 2 and all(h is holdings[0] for h in holdings)
    assert not (ckpt / LOCK).exists()
    fresh = dask_em.GaussianMixture(2, max_iter=3, tol=0.0, random_state=0)
    with pytest.warns(Warning):
        fresh.fit(X)
    np.testing.assert_array_equal(gm.means_, fresh.means_)


def test_restart_needs_a_checkpoint_dir_and_never_deletes_foreign_files(tmp_path: Path) -> None:
    X = mixture(100, 2, 2, seed=0)
    with pytest.raises(ParameterError, match=r"restart=True\) discards a checkpoint"):
        dask_em.GaussianMixture(2).fit(X, restart=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.csv").write_text("keep me")
    with pytest.raises(CheckpointDamaged, match="refusing to delete"):
        dask_em.GaussianMixture(2, checkpoint_dir=foreign).fit(X, restart=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["results.csv"]


# ------------------------------------------------------------------ load_model
def test_a_loaded_model_refits_new_data_without_a_checkpoint_mismatch(tmp_path: Path) -> None:
    """The run settings are recorded in the model but not restored."""
    X, Y = mixture(300, 2, 2, seed=5), mixture(400, 2, 2, seed=6)
    gm = dask_em.GaussianMixture(
        2, random_state=0, checkpoint_dir=tmp_path / "ckpt", verbose=2, verbose_interval=3
    ).fit(X)
    gm.save(tmp_path / "model.zarr")
    loaded = dask_em.load_model(tmp_path / "model.zarr")
    defaults = dask_em.GaussianMixture().get_params()
    for name in ("checkpoint_dir", "verbose", "verbose_interval", "chunk_rows"):
        assert loaded.get_params()[name] == defaults[name], name
    assert loaded.get_params()["random_state"] == 0 and loaded.n_components == 2
    loaded.fit(Y)  # no checkpoint of X's fit is resumed or refused
    expected = dask_em.GaussianMixture(2, random_state=0).fit(Y)
    np.testing.assert_array_equal(loaded.means_, expected.means_)


# ------------------------------------------------------------------ CLI edges
def test_info_on_a_data_array_says_it_is_data(tmp_path: Path) -> None:
    data = write_array(tmp_path / "data.zarr", mixture(50, 2, 2, seed=0), (10, 2))
    assert_usage_error(run_cli("info", data), "is a Zarr array (data), not a dask-em model")


def test_every_option_of_every_command_has_help_text() -> None:
    parser = build_parser()
    [commands] = [a for a in parser._actions if a.choices and a.dest == "command"]
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not action.help
    ]
    assert missing == []


# ------------------------------------------------------------------ array API, dtypes
ARRAY_API_SCRIPT = """
import numpy as np, sklearn, array_api_strict as xp
from dask_em import GaussianMixture
X = np.random.default_rng(0).normal(size=(300, 2))
X[:150] += 5.0
with sklearn.config_context(array_api_dispatch=True):
    gm = GaussianMixture(2, random_state=0).fit(xp.asarray(X))
    labels = gm.predict(xp.asarray(X))
reference = GaussianMixture(2, random_state=0).fit(X)
assert type(labels) is np.ndarray, type(labels)
np.testing.assert_array_equal(gm.means_, reference.means_)
np.testing.assert_array_equal(labels, reference.predict(X))
print("same")
"""


def test_array_api_input_fits_like_numpy_input() -> None:
    """Under ``array_api_dispatch=True`` (which needs ``SCIPY_ARRAY_API=1`` before SciPy is
    imported: a fresh interpreter), an ``array_api_strict`` array fits as NumPy does."""
    result = subprocess.run(
        [sys.executable, "-c", ARRAY_API_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SCIPY_ARRAY_API": "1"},
    )
    assert result.returncode == 0 and result.stdout.strip() == "same", result.stderr


def test_probabilities_keep_float32_as_in_scikit_learn_and_log_likelihoods_are_float64() -> None:
    """``predict_proba`` of float32 input is float32 (scikit-learn's dtype), for NumPy and
    Dask input alike (the lazy array's declared dtype is its chunks' dtype);
    ``score_samples`` is float64, the dtype the log-likelihood is accumulated in."""
    X = mixture(400, 3, 2, seed=7).astype(np.float32)
    gm = dask_em.GaussianMixture(2, random_state=0).fit(X)
    sk = SkGaussianMixture(2, random_state=0).fit(X)
    assert gm.predict_proba(X).dtype == sk.predict_proba(X).dtype == np.float32
    lazy = gm.predict_proba(da.from_array(X, chunks=(100, 3)))
    assert lazy.dtype == lazy.compute().dtype == np.float32
    np.testing.assert_allclose(lazy.compute(), gm.predict_proba(X), atol=1e-6)
    assert gm.score_samples(X).dtype == np.float64
    lazy = gm.score_samples(da.from_array(X, chunks=(100, 3)))
    assert lazy.dtype == lazy.compute().dtype == np.float64
    assert gm.predict_proba(X.astype(np.float64)).dtype == np.float64
